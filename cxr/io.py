"""Atomic file output and the one error type for bad input files."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd


class DataError(ValueError):
    """A problem in an input file; the message names the file, row and value at fault."""

    def __init__(self, path: str | os.PathLike, message: str, row: int | None = None):
        where = f"{path}" if row is None else f"{path}, row {row}"
        super().__init__(f"{where}: {message}")
        self.path, self.message, self.row = str(path), message, row

    def __reduce__(self):  # picklable, so a worker process can hand one back to the parent
        return DataError, (self.path, self.message, self.row)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; outputs get the mode a plain open() would give them (0644 under umask 022).
FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """The command-line boundary of every entry point: a :class:`DataError`, or an OSError (an
    unwritable output folder, a full disk), becomes one ``error: ...`` line and exit code 2."""
    try:
        yield
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)


def show(value: Any) -> str:
    """repr of a cell value without numpy's wrapper (``15``, not ``np.int64(15)``)."""
    return repr(value.item() if hasattr(value, "item") else value)


def show_values(values: Iterable[Any]) -> str:
    """A row of cell values as ``['a', 3, 0.5, 10.0]``: :func:`show` of each (never ``np.float64(0.5)``)."""
    return "[" + ", ".join(show(v) for v in values) + "]"


def warn(message: str) -> None:
    """The one warning channel of the command lines: ``warning: ...`` on stderr (stdout stays the result)."""
    print(f"warning: {message}", file=sys.stderr)


# Image ids become file names: no path separator, no leading '.' (so never '..' or a hidden file),
# no whitespace, comma or quote.
SAFE_ID = r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*"


def check_ids(ids: pd.Series, path: str | os.PathLike) -> None:
    """Raise :class:`DataError` at the first empty or unsafe image id (see :data:`SAFE_ID`)."""
    text = ids.fillna("").astype(str)
    bad = ~text.str.fullmatch(SAFE_ID)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(path, f"unsafe image_id {show(ids.iloc[i])} (ids name files: letters, digits, '_', '-', '.')",
                        csv_row(i))


def csv_row(index: int) -> int:
    """Line number in the CSV file (1-based, header is line 1) of DataFrame row ``index``."""
    return int(index) + 2


TMP_SUFFIX = ".tmp"  # atomic_path's temp files are ``.<name>.<random>.tmp`` beside the target


def is_temp(path: str | os.PathLike) -> bool:
    """A file atomic_path left behind when its process was killed (hidden, ``.tmp``)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    Readers never see a half-written file, and an interrupted run leaves the old file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a table atomically as CSV, or as Parquet when ``path`` ends in ``.parquet``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    return path


def read_table(path: str | os.PathLike, **kwargs: Any) -> pd.DataFrame:
    """Read a CSV or Parquet table; a missing file is a :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises its own types (ArrowInvalid, OSError) for a corrupt file
            raise DataError(path, f"not a readable Parquet file: {_first_line(e)}") from None
        return df.head(kwargs["nrows"]) if kwargs.get("nrows") is not None else df
    try:
        return pd.read_csv(path, **kwargs)
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise DataError(path, f"not a readable CSV: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read 1 MiB at a time (checkpoints are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return path


def require_columns(df: pd.DataFrame, columns: list[str], path: str | os.PathLike) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; found {list(df.columns)}")
