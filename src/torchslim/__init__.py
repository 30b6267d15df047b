"""torchslim: make trained PyTorch models smaller and faster.

Knowledge distillation, pruning, int8 quantization and weight sharing, alone or chained,
measured and exported::

    import torchslim as ts
    teacher = ts.models.create("fmnist_teacher")
    student = ts.models.create("fmnist_student")
    ts.distill(student, teacher, splits.train, ts.KDConfig(temperature=4.0, alpha=0.1), epochs=5)
    ts.prune_(student, ts.MagnitudePruning(sparsity=0.9, scope="global"))
    print(ts.profile(student, splits.test.x[:1]))
    ts.save(student, "model.slim")
"""

# ``distill`` is the package torchslim.distill, which is callable: ts.distill(...) is the
# verb and ``import torchslim.distill`` the package, whatever the import order (see its docstring).
from torchslim import data, distill, export, measure, models, pipeline, prune, quant, search, train  # noqa: F401
from torchslim.config import Config, config_from_dict
from torchslim.distill import AttentionConfig, DistillConfig, DKDConfig, HintConfig, KDConfig, derive_student
from torchslim.errors import ConfigError, DataError, ExportError, ModelError, TorchSlimError, TrainingError
from torchslim.export import export_onnx, load, save
from torchslim.measure import profile
from torchslim.pipeline import Recipe, load_recipe, resume_run, run_recipe
from torchslim.prune import MagnitudePruning, UnstructuredPruning, finalize_, prune_
from torchslim.prune.structured import ChannelPruning, prune_channels
from torchslim.quant import Int8Config, PackConfig, QATConfig, WeightSharing, pack, qat, quantize, share_weights_
from torchslim.search import Budget, SearchSpace
from torchslim.train import LoggerConfig, TrainConfig, evaluate, fit, make_logger

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig", "Budget", "ChannelPruning", "Config", "ConfigError", "DKDConfig", "DataError", "DistillConfig",
    "ExportError", "HintConfig", "Int8Config", "KDConfig", "MagnitudePruning", "ModelError", "Recipe", "TorchSlimError",
    "TrainConfig", "TrainingError", "UnstructuredPruning", "config_from_dict", "data", "derive_student", "distill",
    "evaluate",
    "export", "export_onnx", "finalize_", "fit", "load", "load_recipe", "make_logger", "measure", "models", "pipeline",
    "PackConfig", "QATConfig", "WeightSharing", "qat", "pack", "profile", "prune", "prune_", "prune_channels", "quant", "quantize",
    "resume_run", "run_recipe", "save", "search", "SearchSpace", "share_weights_", "train",
]
