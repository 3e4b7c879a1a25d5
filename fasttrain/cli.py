"""What every command-line tool shares: an argument parser whose errors are one line."""
from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2 (argparse also
    prints the usage block), like every other user error of the tools."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message}\n")
