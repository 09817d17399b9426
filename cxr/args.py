"""Command-line values, checked where they enter: one parser class and one set of argparse types.

Every entry point (``cxr``, ``python -m ensemble``, its ``blend`` and ``predict-images``) builds
its parser from :class:`Parser` and types its flags with the functions below, so a value out of
its range is refused the same way everywhere: one line ``error: --flag: message`` and exit
code 2, before any file is read or written (the form of :func:`cxr.io.one_line_errors`).
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from typing import NoReturn

SEED_MAX = 2**32 - 1  # numpy, torch and random all accept 0..2**32-1; numpy refuses a negative seed


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2.

    argparse says ``argument --iou-thr: ...``; the line reads ``error: --iou-thr: ...``, like a
    bad file's ``error: FILE, row N: ...``. Subcommand parsers inherit the class.
    """

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument ", "", " ".join(message.split()))
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _parse(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def int_at_least(low: int) -> Callable[[str], int]:
    """Type for an integer flag >= ``low``."""

    def check(text: str) -> int:
        value = _parse(text, int)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is not an integer >= {low}")
        return value

    check.__name__ = f"int_at_least_{low}"
    return check


positive_int = int_at_least(1)  # sizes, epochs, batches, processes
non_negative_int = int_at_least(0)  # fold numbers, worker counts where 0 means "in process"


def seed(text: str) -> int:
    """A random seed: an integer in 0..2**32-1 (what numpy, torch and random all accept)."""
    value = _parse(text, int)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text} is not a seed (an integer in 0..{SEED_MAX})")
    return value


def iou(text: str) -> float:
    """An IoU threshold in (0, 1]: 0 would merge every pair of boxes, above 1 none."""
    value = _parse(text, float)
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text} is not an IoU in (0, 1]")
    return value


def probability(text: str) -> float:
    """A probability or score threshold in [0, 1]."""
    value = _parse(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def skip_threshold(text: str) -> float:
    """A score below which boxes are dropped, in [0, 1): at 1 every box would go."""
    value = _parse(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def weight(text: str) -> float:
    """A fusion weight: a finite number >= 0 (0 leaves the input out)."""
    value = _parse(text, float)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} is not a weight (a finite number >= 0)")
    return value


PLAIN_NAME = "letters, digits, '_', '-', '.', not starting with '.' or '-': no '/', '..' or space"
# As cxr.io.SAFE_ID, and not starting with '-' either (a name after a flag would read as another flag).
# The Makefile checks NAME against the same pattern.
PLAIN_NAME_RE = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"


def is_plain_name(text: str) -> bool:
    """A name that becomes one file or folder name inside the folder meant for it (:data:`PLAIN_NAME_RE`)."""
    return re.fullmatch(PLAIN_NAME_RE, text) is not None


def plain_name(text: str) -> str:
    """Type for a flag that names an output (``submissions/NAME.csv``, ``reports/NAME/``)."""
    if not is_plain_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain name ({PLAIN_NAME})")
    return text
