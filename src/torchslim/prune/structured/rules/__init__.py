"""Channel rules: what each layer, function and method does to channels.

One module per kind of op; importing this package fills the tables of
:mod:`torchslim.prune.structured.registry`:

* :mod:`~torchslim.prune.structured.rules.layers`: conv, linear, BatchNorm, LayerNorm, PReLU;
* :mod:`~torchslim.prune.structured.rules.attention`: multi-head attention (heads);
* :mod:`~torchslim.prune.structured.rules.elementwise`: arithmetic, activations, pooling,
  reductions, softmax;
* :mod:`~torchslim.prune.structured.rules.reshape`: flatten, view/reshape, transpose, permute, squeeze;
* :mod:`~torchslim.prune.structured.rules.cat`: cat, stack, split, indexing.

A rule for a layer of your own: :func:`torchslim.prune.structured.register_channel_rule`.
"""

from torchslim.prune.structured.rules import attention, cat, elementwise, layers, reshape  # noqa: F401  (register)
from torchslim.prune.structured.rules.elementwise import passthrough
from torchslim.prune.structured.rules.layers import per_channel_layer

__all__ = ["passthrough", "per_channel_layer"]
