"""Argument checking shared by the command-line entry points (run, tokenize, accuracy, bench, perf_model, the kernels
CLI).

Every value is checked while the command line is parsed, before any model is opened: the ``type=`` converters below
raise ``argparse.ArgumentTypeError`` for a bad value, and :class:`ArgumentParser` prints that as one line,
``error: argument -n/--n-predict: must be an integer >= 0 (got '-1')``, and exits with status 2. :func:`fail` is the
same one-line exit for what only shows after parsing (a combination of arguments, a command that needs a GPU on a
machine without one). Exit status 2 always means "could not run as asked"; nothing was computed.

Standard library only, so that any layer's command line may use it (the kernels CLI included).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, NoReturn

USAGE_ERROR = 2  # the exit status of every refusal below (argparse's own)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as written in the docstrings (descriptions keep their line breaks), each option's default appended
    as ``(default: X)`` unless its help already speaks of the default or there is none to show."""

    def _get_help_string(self, action):
        h = action.help or ""
        if ("default" in h or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return h
        return h + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``error: MESSAGE (see PROG --help)``, exit status 2,
    and whose help uses :class:`HelpFormatter`.

    (argparse's own prints the whole usage first; for a user who typed one wrong value, the one line is the point.)
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    """Print ``error: MESSAGE`` as one line on stderr and exit with ``code`` (default 2)."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(code)


def int_at_least(lo: int) -> Callable[[str], int]:
    """``type=`` converter: an integer >= lo."""

    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo} (got {s!r})") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo} (got {s!r})")
        return v

    conv.__name__ = f"integer >= {lo}"
    return conv


def float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False,
             what: str = "") -> Callable[[str], float]:
    """``type=`` converter: a finite number in the interval [lo, hi], ``lo_open`` / ``hi_open`` excluding an end.
    NaN and infinities are refused (NaN passes no comparison later, so it would slip through a plain range check)."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    if hi == math.inf:
        rng = what or f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        rng = what or f"a number in {left}{lo:g}, {hi:g}{right}"

    def conv(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rng} (got {s!r})") from None
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not math.isfinite(v) or not ok:
            raise argparse.ArgumentTypeError(f"must be {rng} (got {s!r})")
        return v

    conv.__name__ = rng
    return conv


def existing_file(s: str) -> str:
    """``type=`` converter: a path to a readable regular file (a directory or a missing path says which)."""
    if not s:
        raise argparse.ArgumentTypeError("empty path")
    if not os.path.exists(s):
        raise argparse.ArgumentTypeError(f"{s}: no such file")
    if os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s}: is a directory, not a file")
    if not os.access(s, os.R_OK):
        raise argparse.ArgumentTypeError(f"{s}: not readable (permission denied)")
    return s


def input_file_or_stdin(s: str) -> str:
    """``type=`` converter: ``-`` (stdin) or :func:`existing_file`."""
    return s if s == "-" else existing_file(s)


def writable_path(s: str) -> str:
    """``type=`` converter: a file path whose directory exists (the file itself is created or replaced)."""
    if not s:
        raise argparse.ArgumentTypeError("empty path")
    if os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s}: is a directory, not a file")
    d = os.path.dirname(os.path.abspath(s))
    if not os.path.isdir(d):
        raise argparse.ArgumentTypeError(f"{s}: directory {d} does not exist")
    return s


def nonempty_text(s: str) -> str:
    """``type=`` converter: a non-empty string."""
    if s == "":
        raise argparse.ArgumentTypeError("must not be empty")
    return s


def require_gpu(prog: str, what: str = "this command") -> None:
    """Exit with one line (status 2) unless a CUDA GPU is usable; ``what`` names what needs it."""
    if os.environ.get("SPARKINFER_NO_GPU"):
        fail(f"{what} needs a CUDA GPU, and SPARKINFER_NO_GPU is set ({prog})")
    try:
        from .runtime import device_available

        ok = device_available()
    except Exception as e:  # a broken CUDA install is still "no GPU here", said in one line
        ok, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "no CUDA GPU or driver found on this machine"
    if not ok:
        fail(f"{what} needs a CUDA GPU: {why} ({prog})")
