"""
What every mcp-bastion command shares: the version, argument errors on one line, and the exit statuses.

    0  done (or: nothing to report)
    1  the command ran and found something: problems, refusals, a check that failed
    2  the command could not run: a bad argument, a missing or unreadable file, a peer unreachable

A command never ends with a Python traceback: `run()` turns what escapes `main` into one line on
stderr (BASTION_DEBUG=1 shows the traceback of an unexpected error instead).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

DIST = "mcp-bastion"  # the project name in pyproject.toml
CANNOT_RUN = 2
DEBUG_ENV = "BASTION_DEBUG"


def version() -> str:
    """The package's version: one source, pyproject.toml, as installed (or read from the checkout)."""
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[3] / "pyproject.toml"
        try:
            found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.M)
        except OSError:
            found = None
        return found.group(1) if found else "unknown"


class CannotRun(Exception):
    """The command could not run (exit status 2); the message is the one line it prints."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `--version` and a bad argument said on one line (exit status 2), not a usage block."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.add_help:
            self.add_argument("--version", action="version", version=f"%(prog)s ({DIST}) {version()}",
                              help="print the version and exit")

    def error(self, message: str) -> NoReturn:
        self.exit(CANNOT_RUN, f"{self.prog}: {message} (see {self.prog} --help)\n")


def positive(kind: type) -> Callable[[str], float | int]:
    """An argparse type: an int or float above 0."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not 0 < value < float("inf"):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be more than 0: {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def oserror(e: OSError) -> str:
    """`PATH: No such file or directory`, without errno numbers."""
    what = e.strerror or str(e)
    return f"{e.filename}: {what}" if e.filename is not None else what


def check_readable(path: str | os.PathLike, what: str = "file") -> None:
    """Raise CannotRun unless `path` is a file this process can open for reading."""
    if os.path.isdir(path):
        raise CannotRun(f"{what} {path} is a directory")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise CannotRun(f"cannot read {what} {path}: {e.strerror or e}") from None


def check_writable(path: str | os.PathLike, what: str = "file") -> None:
    """Raise CannotRun if `path` cannot be written (a directory, or in a directory that does not exist or
    refuses us), before a long run that writes it at the end. Nothing is created."""
    p = Path(path)
    if p.is_dir():
        raise CannotRun(f"{what} {path} is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise CannotRun(f"cannot write {what} {path}: {parent} {why}")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise CannotRun(f"cannot write {what} {path}: permission denied")


def fail(prog: str, message: str, status: int = CANNOT_RUN) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(status)


def run(main: Callable[[], int | None], prog: str) -> NoReturn:
    """Run a command's `main` and exit with its status; whatever escapes it becomes one line on stderr."""
    try:
        status = main()
    except CannotRun as e:
        fail(prog, str(e))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # the reader stopped early (`| head`): the shell's SIGPIPE status, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
    except OSError as e:
        fail(prog, oserror(e))
    except (SystemExit, GeneratorExit):
        raise
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        fail(prog, f"unexpected error: {type(e).__name__}: {e} (set {DEBUG_ENV}=1 for the traceback)")
    raise SystemExit(status or 0)
