"""What every command-line tool shares: an argument parser whose errors are one line."""
from __future__ import annotations

import argparse
import math
from typing import Callable


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2 (argparse also
    prints the usage block), like every other user error of the tools."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message}\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= `minimum` ("expected an integer >= 1, got 0")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


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
