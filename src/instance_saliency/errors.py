"""Exceptions raised by instance-saliency.

Every error meant for a user is an :class:`InstanceSaliencyError`; the command line prints its
message on one line and exits with status 2.
"""


class InstanceSaliencyError(Exception):
    """Base class of all errors that the command line reports as a one-line message."""


class InputError(InstanceSaliencyError, ValueError):
    """An input file or array is missing, unreadable or inconsistent."""


class DataError(InstanceSaliencyError):
    """A public scan cannot be fetched, or its checksum does not match."""


class ModelError(InstanceSaliencyError):
    """A checkpoint folder is missing, corrupted or does not match its configuration."""


class OutputError(InstanceSaliencyError):
    """An output location cannot be used (exists without ``--overwrite``, not writable)."""


class DistributedError(InstanceSaliencyError):
    """A ``torchrun`` launch cannot start (bad rank variables, the ranks cannot meet), or another
    rank failed or did not answer in time."""


class ModelWarning(UserWarning):
    """Something about a model the user should know (e.g. its custom nnU-Net trainer class is
    not installed, so the network was built as the base trainer builds it). The command line
    prints these itself, as ``instance-saliency: warning: ...``."""
