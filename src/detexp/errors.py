"""Errors meant for the person running detexp: the message names the key or file and
what is wrong, and the command line prints it as one line instead of a traceback.

This module imports nothing of detexp, so every layer may raise these."""


class DetexpError(Exception):
    """Base of user-facing errors."""


class ConfigError(DetexpError, ValueError):
    """A config value that cannot work (names the key)."""


class DatasetError(DetexpError, ValueError):
    """A dataset that cannot be used; the message names the file or key and what is wrong."""


class ResourceError(DetexpError):
    """More workers, CPUs or GPUs asked for than the Ray cluster has."""


class TrackingError(DetexpError):
    """The MLflow tracking server cannot be reached."""


class WorkerStalledError(DetexpError):
    """A Train worker made no progress for trainer.stall_timeout_s (the message says why)."""


class TrainingDivergedError(DetexpError):
    """The loss became NaN or infinite."""


class MissingDependencyError(DetexpError):
    """An optional extra a command needs is not installed (the message says which to install)."""


class ParityError(DetexpError):
    """An exported model predicts differently from the PyTorch model (the message gives by how much)."""


USER_ERRORS = (DetexpError,)
