"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class MedistillError(Exception):
    """An error caused by user input or the environment, with a message meant for the user."""


class DataError(MedistillError):
    """A dataset is unknown, missing, unreadable or fails its MD5 check."""


class ConfigError(MedistillError):
    """An option, method, model or IPC value is not valid."""
