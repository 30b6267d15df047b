"""What every other package shares, importing nothing else of torchslim's.

* :mod:`torchslim.core.masks`: the ``weight_orig`` / ``weight_mask`` mask convention.
* :mod:`torchslim.core.transforms`: the transform log a ``.slim`` file replays on
  load (channels removed, masks, ...), and the registry of replay functions.

(``torchslim.errors`` and ``torchslim.atomic`` are leaf modules core may use.)
"""
