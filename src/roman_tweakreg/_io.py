"""File writing and Parquet I/O shared by every module that writes or reads files.

Every output of the package (models, catalogs, reports, figures, cached and saved
reference catalogs) is written through :func:`write_atomically`, so a reader never
sees a partial file and a failed write leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["read_parquet", "write_atomically", "write_parquet"]


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` onto ``path``.

    ``tmp_path`` has the same file name as ``path`` (writers that look at the
    name or suffix behave as for ``path``) inside a temporary folder next to it,
    so the file gets the usual permissions and the rename is atomic.  The folder
    of ``path`` is created when needed; on any error nothing is left behind.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        tmp_path = Path(tmp) / path.name
        write(tmp_path)
        os.replace(tmp_path, path)
    return path


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> Table:
    """Read a Parquet file into an astropy Table with pyarrow (astropy's reader needs pandas)."""
    import pyarrow.parquet as pq

    data = pq.read_table(path, columns=columns)
    return Table({c: data.column(c).to_numpy(zero_copy_only=False) for c in data.column_names})


def write_parquet(table: Table, path: str | os.PathLike) -> None:
    """Write an astropy Table's columns to a Parquet file with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({c: np.asarray(table[c]) for c in table.colnames}), path)
