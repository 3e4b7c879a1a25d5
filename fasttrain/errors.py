"""User errors: bad recipes, data, checkpoints or run directories.

Command-line tools catch `UserError`, print its one-line message and exit with status 2; every
other exception is a bug and keeps its traceback. Importing this module does not import torch,
so a tool can report a bad recipe before paying for the torch import.
"""


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the file, key and value."""


class ConfigError(UserError, ValueError):
    """A recipe or override is invalid."""


class DatasetError(UserError, RuntimeError):
    """The data set is missing or malformed."""


class ShardError(DatasetError):
    """A problem in this rank's share of the data, which the other ranks do not see: under
    torchrun every rank reports its own (other user errors are raised alike on every rank and
    reported once, by rank 0)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read or does not fit the model."""


class RunError(UserError, RuntimeError):
    """The run directory or resume target is unusable."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite loss, checkpoint write failure); the message says
    where it stopped and what is safe on disk."""
