"""What every command-line tool shares: an argument parser whose errors are one line."""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from .errors import UserError


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` names each option's default ("(default: 100)") unless its help already speaks
    of one; argparse's ArgumentDefaultsHelpFormatter also prints "(default: None)" and
    "(default: False)" and skips options without a help text."""

    @staticmethod
    def shown_default(action: argparse.Action) -> str | None:
        default = action.default
        if (not action.option_strings or default is None or default is False
                or default == argparse.SUPPRESS
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
                or "default" in (action.help or "").lower()):
            return None
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        if str(default) == "":  # an empty list or name: nothing to show
            return None
        return str(default).replace("%", "%%")  # argparse %-formats help texts

    def add_argument(self, action: argparse.Action) -> None:
        shown = self.shown_default(action)
        if shown is not None and action.help is None:
            action.help = f"default: {shown}"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        shown = self.shown_default(action)
        if shown is None or help_text == f"default: {shown}":
            return help_text
        return f"{help_text} (default: {shown})"


class _StoreOnce(argparse._StoreAction):
    """argparse's default action, refusing an option given twice: argparse keeps the last
    value silently, so `--checkpoint a.pt ... --checkpoint b.pt` measured b.pt alone and
    `--json x --json y` wrote one file. Options meant to repeat say so (action="extend")."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = getattr(parser, "_options_given", None)
        if option_string is not None and given is not None:
            if self.dest in given:
                parser.error(f"{'/'.join(self.option_strings)} given twice ({given[self.dest]} "
                             f"and {option_string} {_shown_values(values)}); give it once")
            given[self.dest] = f"{option_string} {_shown_values(values)}"
        super().__call__(parser, namespace, values, option_string)


def _shown_values(values) -> str:
    values = values if isinstance(values, list) else [values]
    return " ".join(str(v) for v in values)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2 (argparse also
    prints the usage block), like every other user error of the tools, an option that takes a
    value may be given once (`_StoreOnce`), and `--help` names the defaults
    (`DefaultsHelpFormatter`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def parse_known_args(self, args=None, namespace=None):
        self._options_given: dict[str, str] = {}
        try:
            return super().parse_known_args(args, namespace)
        finally:
            self._options_given = None

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message}\n")


def check_cifar_only(flag: str, models: Iterable[str]) -> None:
    """Refuse `flag` (an option of CIFAR ResNets, such as --shortcut) for any other model.

    Raises:
        UserError: names the models that are not CIFAR ResNets.
    """
    other = [m for m in models if not m.startswith("cifar_")]
    if other:
        raise UserError(f"{flag} applies to CIFAR ResNets (cifar_*) only, not {', '.join(other)}")


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer >= `minimum` ("expected an integer >= 1, got 0") and, with
    `maximum`, <= it (sizes and counts a typo makes absurd: thousands of processes or threads,
    allocations that get the process killed)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"expected an integer <= {maximum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def printable_paths() -> None:
    """File names that are not UTF-8 (surrogate-escaped by Python) print with their bytes
    escaped instead of raising UnicodeEncodeError on a strict (non-C-locale) stdout."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


# What a table's symbols become on a stream that cannot encode them (PYTHONIOENCODING=ascii,
# a Latin-1 locale).
ASCII_STAND_INS = {"±": "+/-", "−": "-", "–": "-", "Δ": "delta", "≈": "~"}


def printable(text: str, stream=None) -> str:
    """`text` as `stream` (default: sys.stdout) can show it: a symbol its encoding lacks becomes
    its ASCII stand-in (± +/-, − and – -, Δ delta, ≈ ~), any other character it lacks a
    backslash escape, as printable_paths would print it. For table cells and headers: rich
    measures the text it is given, so an escape made only when writing (`\\xb1`) widened the
    row past the table's frame."""
    encoding = getattr(stream or sys.stdout, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
        return text
    except UnicodeEncodeError:
        pass
    except LookupError:  # an encoding Python does not know: leave it to the stream
        return text
    for symbol, plain in ASCII_STAND_INS.items():
        try:
            symbol.encode(encoding)
        except UnicodeEncodeError:
            text = text.replace(symbol, plain)
    return text.encode(encoding, "backslashreplace").decode(encoding)


def sigterm_as_interrupt() -> None:
    """Make SIGTERM (`timeout`, a batch scheduler's time limit) raise KeyboardInterrupt, so a
    measuring script keeps what it measured as it does on Ctrl-C (the GPU checklist cuts long
    steps this way). For a script's `__main__` only: it replaces the process's handler."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def first_repeat(items: list) -> Any:
    """The first item of `items` that an earlier one equals; None when all differ."""
    return next((v for i, v in enumerate(items) if v in items[:i]), None)


def nonempty(text: str) -> str:
    """argparse type: a path that is not empty (an unset shell variable: "" is no path, and
    would otherwise mean "not given" or the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    return text


def nonempty_value(text: str) -> str:
    """argparse type: a value (a name, a choice) that is not empty: an unset shell variable
    otherwise ran as the option's default, unsaid."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty value")
    return text


def user_path(text: str) -> str:
    """argparse type: a non-empty path, a leading `~` expanded. The shell leaves `~` as typed
    after `=` (`--out=~/m.pt`): unexpanded, it named a folder called `~` in the current one."""
    return os.path.expanduser(nonempty(text))


def finite_float(ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """argparse type: a finite float for which `ok` holds; `expected` completes "expected ..."
    in the one-line error (e.g. "a finite number >= 0"). inf and nan never pass: a tolerance or
    a target of inf is always a typo, and would fail later with a traceback."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


def not_stdout(path: str | Path | None, name: str) -> None:
    """Refuse `-` as an output file: the tools print their results on stdout, so `-` cannot
    mean stdout there (it wrote a file named `-`), and outputs are written by a rename, which
    a stream cannot take (see check_output, which calls this). `name` starts the message
    ("--json -").

    Raises:
        UserError: `path` is `-`.
    """
    if path is not None and str(path) == "-":
        raise UserError(f"{name}: writes a file, not stdout (where the results are printed); "
                        f"name a file")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether writing `b` would overwrite `a`: the same path once links and `..` are resolved,
    or a hard link to it. False when either does not exist yet (and the paths differ)."""
    try:
        return Path(a).resolve() == Path(b).resolve() or Path(a).samefile(b)
    except OSError:
        return False


def check_output(path: str | Path, name: str, *, folder: bool = False,
                 inputs: Iterable[str | Path | None] = ()) -> Path:
    """Make sure an output can be written before the work that produces it starts (a sweep, a
    pruning, a benchmark run: minutes lost otherwise): `path` is not a folder (with `folder`:
    is one or can be made), its folder is created, and a file can be created in it. `name`
    starts each one-line message ("--json rows.json", "output x.pt"). `inputs`: files the
    tool reads (None for an absent option), which the output must not replace.

    A probe file, not os.access: root passes os.access on read-only mounts and /proc. For a
    file, the probe's name is as long as the longest name the tools write it under first
    (`.NAME.tmp-PID`, `STEM.parity-failed.SUFFIX`): a name near the file system's limit passed
    the check and failed after the work.

    Raises:
        UserError: the path cannot be written; the message names it and why.
    """
    try:
        return _check_output(Path(path), name, folder, inputs)
    except OSError as e:  # a stat of the path: a name too long, a loop of links
        raise UserError(f"{name}: {e.strerror or e}") from None


def _check_output(path: Path, name: str, folder: bool,
                  inputs: Iterable[str | Path | None]) -> Path:
    if folder:
        if path.exists() and not path.is_dir():
            raise UserError(f"{name}: exists and is not a folder")
        where = path
    else:
        not_stdout(path, name)
        if path.is_dir():
            raise UserError(f"{name}: is a folder; name the file to write")
        # Written atomically, by a rename over the path: a device (/dev/null) or a pipe would
        # be replaced by a plain file, and so would a symbolic link (/dev/stdout), not its
        # target.
        if path.is_symlink():
            raise UserError(f"{name}: is a symbolic link (to {os.readlink(path)}); name the "
                            f"file itself")
        if path.exists() and not path.is_file():
            raise UserError(f"{name}: exists and is not a regular file (a device or a pipe); "
                            f"name a file to write")
        if path.exists() and not os.access(path, os.W_OK):
            raise UserError(f"{name}: not writable")
        read = next((source for source in inputs if source and same_file(source, path)), None)
        if read is not None:
            raise UserError(f"{name}: is the input {read}; name another file to write")
        where = path.parent
    existing = next(a for a in (where, *where.parents) if a.exists())
    if not existing.is_dir():
        raise UserError(f"{name}: {existing} is not a folder")
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{name}: cannot write in {where} ({e.strerror or e})") from None
    try:
        if folder:
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=where)
        else:
            probe = str(where / f".{path.name}.probe-{os.getpid():09d}")  # +16 bytes
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG and not folder:
            size = len(os.fsencode(path.name))
            raise UserError(f"{name}: file name too long ({size} bytes; it is written under a "
                            f"temporary name 16 bytes longer, over this folder's limit)"
                            ) from None
        raise UserError(f"{name}: cannot write in {where} ({e.strerror or e})") from None
    return path


@contextlib.contextmanager
def new_folders_removed_on_error(path: str | Path, *, folder: bool = False) -> Iterator[None]:
    """Run the block; if it raises, remove again the folders on the way to `path` (with
    `folder`: `path` itself too) that did not exist when it started and are still empty, so a
    tool that fails after `check_output` made its output folder leaves nothing behind."""
    where = Path(path) if folder else Path(path).parent
    missing = [a for a in (where, *where.parents) if not a.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for made in missing:
            try:
                made.rmdir()
            except OSError:  # not empty (something was written there), or not made
                break
        raise


# The status of a process killed by SIGPIPE in the shell's convention (128 + 13): what `cmd |
# head` gives for a C tool, and what a script with `set -o pipefail` tells from a failure.
STDOUT_CLOSED = 141

Main = TypeVar("Main", bound=Callable[..., int])


def drop_output(stream) -> None:
    """Point `stream`'s file descriptor at /dev/null, for a stream whose reader has gone (the
    Python docs' "Note on SIGPIPE"): later writes, and the interpreter's flush at exit, go
    nowhere instead of raising BrokenPipeError. A stream without a descriptor is left."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a stand-in stream without one
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class _ClosableStdout:
    """sys.stdout while a tool runs: a write or flush that finds the reader gone (`| head -3`)
    points the file descriptor at /dev/null (the Python docs' "Note on SIGPIPE"), so that the
    rest of the output is dropped, not raised, and the interpreter's own flush at exit does not
    fail either. Everything else is the stream's."""

    def __init__(self, stream):
        self.stream = stream
        self.reader_gone = False

    def _gone(self) -> None:
        self.reader_gone = True
        drop_output(self.stream)

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._gone()
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._gone()
            with contextlib.suppress(BrokenPipeError):  # the text still buffered: to /dev/null
                self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def stdout_may_close(main: Main) -> Main:
    """Decorate a tool's `main(argv) -> int`: when the reader of stdout goes away before the
    tool has printed everything (`| head -3`, `| grep -m1`, a killed tee), the rest of what it
    prints is dropped and the tool carries on: it still writes the files it was asked for.
    The status is then STDOUT_CLOSED (141) instead of 0; any other status keeps its meaning
    (2 an error, said on stderr; a tool's 1), since only success is in doubt when part of
    the output was not read. Without this, rich turned the BrokenPipeError into a silent
    exit 1 before the outputs were written."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        guard = _ClosableStdout(sys.stdout)
        sys.stdout = guard
        try:
            status = main(argv)
        finally:
            guard.flush()  # here, not at exit: a pipe's buffered text meets the closed reader
            sys.stdout = guard.stream
        return STDOUT_CLOSED if guard.reader_gone and status == 0 else status

    return run  # type: ignore[return-value]


def print_table(console, table) -> None:
    """Print a rich Table with every cell whole: when it is wider than the console (or the
    console is a pipe or a file), it is printed at its natural width, each row one line (a
    terminal wraps the long lines; a log stays greppable). Left to itself, rich shrank the
    columns to fit 80 columns, cutting numbers to "…" or folding them inside their cells (even
    in columns marked no_wrap: it shrinks those last, not never)."""
    from rich.measure import Measurement

    natural = Measurement.get(console, console.options.update_width(1_000_000), table).maximum
    if console.is_terminal and natural <= console.width:
        console.print(table)
        return
    width = table.width
    table.width = natural
    try:
        console.print(table, crop=False)
    finally:
        table.width = width
