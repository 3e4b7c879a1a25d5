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


class RankError(UserError):
    """A problem one rank meets and the others do not (its share of the data, its node's
    disk): under torchrun every rank reports its own at once (other user errors are raised
    alike on every rank and reported once, by rank 0)."""


class ShardError(DatasetError, RankError):
    """A problem in this rank's share of the data, which the other ranks do not see."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read or does not fit the model."""


class UnsharedCheckpointError(CheckpointError, RankError):
    """The checkpoint rank 0 found is not on this rank's disk (another node's)."""


class RunError(UserError, RuntimeError):
    """The run directory or resume target is unusable."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite loss, checkpoint write failure); the message says
    where it stopped and what is safe on disk."""


def first_problem(e: BaseException) -> str:
    """One line for an exception whose first line is only a heading, as load_state_dict's
    "Error(s) in loading state_dict for X:" is: the heading, the first problem under it (the
    key and shapes) and how many more there are."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    if len(lines) == 1 or not lines[0].endswith(":"):
        return _few_keys(lines[0])
    more = f" (+{len(lines) - 2} more)" if len(lines) > 2 else ""
    return f"{lines[0]} {_few_keys(lines[1])}{more}"


def _few_keys(line: str, shown: int = 3) -> str:
    """load_state_dict's 'Missing key(s) in state_dict: "a", "b", ...' with its first keys
    and a count: every key of a network is thousands of characters on one line."""
    head, sep, keys = line.partition(" in state_dict: ")
    names = keys.rstrip(". ").split(", ")
    if not sep or len(names) <= shown:
        return line
    return f"{head}{sep}{', '.join(names[:shown])}, ... ({len(names)} keys)."


def one_line(text: str) -> str:
    """`text` with its control characters (newline, tab, escape, ...) as backslash escapes: a
    file name holding a newline otherwise printed as two report lines, the second one forged
    by the name ("bad\\nproblem: fake.jpg"), and a count of lines no longer matched the
    report's. A non-UTF-8 byte (a surrogate escape) is left to `printable_paths`."""
    return "".join(c if c.isprintable() or "\udc80" <= c <= "\udcff"
                   else c.encode("unicode_escape").decode("ascii") for c in text)
