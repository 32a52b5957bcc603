"""Errors meant for the person running detexp: the message names the key or file and
what is wrong, and the command line prints it as one line instead of a traceback."""

from detexp.data.voc import DatasetError


class DetexpError(Exception):
    """Base of user-facing errors."""


class ConfigError(DetexpError, ValueError):
    """A config value that cannot work (names the key)."""


class ResourceError(DetexpError):
    """More workers, CPUs or GPUs asked for than the Ray cluster has."""


class TrackingError(DetexpError):
    """The MLflow tracking server cannot be reached."""


USER_ERRORS = (DetexpError, DatasetError)
