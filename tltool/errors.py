"""Errors a user can fix. The CLI turns each into a message on stderr and exit code 2."""

from __future__ import annotations


class TLError(Exception):
    """Base class: a problem with the user's input (config, data, run folder, arguments)."""

    exit_code = 2


class ConfigError(TLError):
    """The config file or an override is invalid."""


class DataError(TLError):
    """A data set, column or row is unusable."""


class RunError(TLError):
    """A run folder is missing, incomplete or incompatible."""


class CheckpointError(TLError):
    """A checkpoint does not fit the model it is loaded into."""


class TrainingDiverged(TLError):
    """The loss became NaN or infinite: the run stops (marked failed) instead of saving junk."""


class NoSpace(TLError):
    """The disk filled up while a file was written: the run stops (marked failed)."""

    exit_code = 1


def no_space(exc: BaseException) -> bool:
    """Whether an exception says the device is full (an OSError, or torch.save's writer)."""
    import errno

    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("No space left" in text or
                                               "failed writing" in text)
