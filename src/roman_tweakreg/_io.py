"""File writing and Parquet I/O shared by every module that writes or reads files.

Every output of the package (models, catalogs, reports, figures, cached and saved
reference catalogs) is written through :func:`write_atomically`, so a reader never
sees a partial file and a failed write leaves nothing behind.

Temporary files and folders of the package are named by :func:`temp_prefix`: the
tag ``roman_tweakreg-tmp``, the host and the process id of their owner.  They are
removed on every exit path Python controls (errors, interrupts); a process killed
outright (SIGKILL, SIGTERM without a handler, power loss) leaves them behind, and
:func:`remove_stale_temporaries`, run by the next run in each folder it writes to,
removes those whose owner is no longer running.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "TABLE_FORMATS",
    "read_parquet",
    "remove_stale_temporaries",
    "table_format",
    "table_suffix",
    "temp_prefix",
    "write_atomically",
    "write_parquet",
]

log = logging.getLogger(__name__)

TEMP_TAG = "roman_tweakreg-tmp"
#: seconds a dead owner's temporary must have been left alone before it is removed
STALE_AFTER_S = 600.0
_TEMP_NAME = re.compile(re.escape(TEMP_TAG) + r"\.(?P<host>[^.]+)\.(?P<pid>\d+)\.")
_swept: set[str] = set()  # folders already swept by this process
_swept_lock = threading.Lock()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "localhost"


def temp_prefix(stem: str = "") -> str:
    """A prefix for a temporary file or folder naming its owner: ``<stem>.<tag>.<host>.<pid>.``.

    ``tempfile`` appends a random part.  :func:`remove_stale_temporaries` recognises
    the names and knows from them whether their owner still runs.
    """
    return f"{stem}.{TEMP_TAG}.{_host()}.{os.getpid()}."


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, *, once: bool = True) -> list[Path]:
    """Remove the package's temporaries in ``folder`` left by processes that ended.

    An entry is removed when its name carries the tag of :func:`temp_prefix`, this
    host, a process id that does not run, and it was last modified more than
    ``STALE_AFTER_S`` seconds ago.  Entries of other hosts (a shared folder) are
    left alone: whether their owner runs cannot be known here; they are logged.
    With ``once``, a folder is swept once per process.

    Returns
    -------
    list of pathlib.Path
        The entries removed.
    """
    folder = Path(folder)
    key = str(folder.resolve()) if folder.exists() else str(folder)
    with _swept_lock:
        if once and key in _swept:
            return []
        _swept.add(key)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host, now = _host(), time.time()
    for entry in entries:
        match = _TEMP_NAME.search(entry.name)
        if match is None:
            continue
        pid = int(match["pid"])
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if match["host"] != host:
            log.info("Temporary %s of host %s left in place", entry.path, match["host"])
            continue
        if pid == os.getpid() or _pid_running(pid) or age < STALE_AFTER_S:
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as err:
            log.warning("Cannot remove the stale temporary %s: %s", path, err)
            continue
        log.info("Removed %s, left by process %d, which ended", path, pid)
        removed.append(path)
    return removed


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` onto ``path``.

    ``tmp_path`` has the same file name as ``path`` (writers that look at the
    name or suffix behave as for ``path``) inside a hidden temporary folder next to
    it (named by :func:`temp_prefix`), so the file gets the usual permissions and the
    rename is atomic.  The folder of ``path`` is created when needed; on any error or
    interrupt nothing is left behind; temporaries that killed runs left in the
    folder are removed first (:func:`remove_stale_temporaries`).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=temp_prefix(f".{path.name}")) as tmp:
        tmp_path = Path(tmp) / path.name
        write(tmp_path)
        os.replace(tmp_path, path)
    return path


#: Table formats (astropy's names; ``parquet`` is read and written with pyarrow) by the file
#: name endings that are read as them; the first ending of a format is what a written
#: table of that format is named with.
TABLE_FORMATS = {
    ".ecsv": "ascii.ecsv",
    ".csv": "ascii.csv",
    ".fits": "fits",
    ".fit": "fits",
    ".fits.gz": "fits",
    ".parquet": "parquet",
    ".pq": "parquet",
}
#: Written-only formats (read by astropy's guessing, not by their ending).
_WRITE_SUFFIXES = {"ascii.commented_header": ".txt"}


def table_format(path: str | os.PathLike) -> str | None:
    """The table format of ``path`` by its name's ending (:data:`TABLE_FORMATS`), or None."""
    name = Path(path).name.lower()
    return next((f for suffix, f in TABLE_FORMATS.items() if name.endswith(suffix)), None)


def table_suffix(fmt: str) -> str:
    """The file name ending of a table written as ``fmt`` (e.g. ``ascii.ecsv`` -> ``.ecsv``;
    a format not known here gets its last dotted part)."""
    fmt = fmt.lower()
    known = {**{f: s for s, f in reversed(TABLE_FORMATS.items())}, **_WRITE_SUFFIXES}
    return known.get(fmt, "." + fmt.rsplit(".", 1)[-1])


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
