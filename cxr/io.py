"""Atomic file output and the one error type for bad input files."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd


class DataError(ValueError):
    """A problem in an input file; the message names the file, row and value at fault."""

    def __init__(self, path: str | os.PathLike, message: str, row: int | None = None):
        where = f"{path}" if row is None else f"{path}, row {row}"
        super().__init__(f"{where}: {message}")
        self.path, self.row = str(path), row


def show(value: Any) -> str:
    """repr of a cell value without numpy's wrapper (``15``, not ``np.int64(15)``)."""
    return repr(value.item() if hasattr(value, "item") else value)


def csv_row(index: int) -> int:
    """Line number in the CSV file (1-based, header is line 1) of DataFrame row ``index``."""
    return int(index) + 2


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    Readers never see a half-written file, and an interrupted run leaves the old file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
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
        return pd.read_parquet(path)
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise DataError(path, f"not a readable CSV: {e}") from e


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return path


def require_columns(df: pd.DataFrame, columns: list[str], path: str | os.PathLike) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; found {list(df.columns)}")
