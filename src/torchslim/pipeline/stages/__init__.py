"""Stage kinds of the pipeline, one file each, registered by kind.

Adding a kind is one new file here (a :class:`StageConfig` subclass with
``kind: Literal["<kind>"]`` and a :class:`Stage` subclass decorated with
:func:`register_stage`), its import below, and its tests.
"""

from torchslim.pipeline.stages.base import STAGES, Stage, StageConfig, StageResult, register_stage
from torchslim.pipeline.stages import (  # noqa: F401  (each import registers its kind)
    train, distill, finetune, prune, prune_channels, evaluate, export,
)
from torchslim.pipeline.stages import share_weights, pack  # noqa: F401,E402  (Deep Compression stages)
from torchslim.pipeline.stages import quantize  # noqa: F401  (int8 in ONNX Runtime)

__all__ = ["STAGES", "Stage", "StageConfig", "StageResult", "register_stage"]
