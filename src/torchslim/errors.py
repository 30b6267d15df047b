"""Exception types raised by torchslim.

Every error a user can cause (bad data, a wrong recipe key, a model that
cannot be traced, a NaN loss) is raised as a subclass of
:class:`TorchSlimError`, with a message that names the problem and what to do.
"""


class TorchSlimError(Exception):
    """Base class of every error torchslim raises on purpose."""


class DataError(TorchSlimError, ValueError):
    """A dataset file is missing, corrupt or inconsistent."""


class ConfigError(TorchSlimError, ValueError):
    """A config value or recipe key is unknown, of the wrong type or out of range."""


class ModelError(TorchSlimError, ValueError):
    """A model cannot be built, loaded, or does not fit its weights or inputs."""


class TrainingError(TorchSlimError, RuntimeError):
    """Training cannot go on (a NaN/Inf loss, a checkpoint from another run)."""


class ExportError(TorchSlimError, RuntimeError):
    """A model cannot be saved, loaded or exported."""


class TrainingInterrupted(TorchSlimError):
    """Training stopped on Ctrl-C or SIGTERM after writing a resumable checkpoint."""
