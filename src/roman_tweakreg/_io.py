"""File writing and Parquet I/O shared by every module that writes or reads files.

Every output of the package (models, catalogs, reports, figures, cached and saved
reference catalogs) is written through :func:`write_atomically`, so a reader never
sees a partial file and a failed write leaves nothing behind.

Temporary files and folders of the package are named by :func:`temp_prefix`: the
tag ``roman_tweakreg-tmp``, the host and the process id of their owner, in a name of
bounded length (so that any legal output name can be written through one).  They are
removed on every exit path Python controls (errors, interrupts); a process killed
outright (SIGKILL, SIGTERM without a handler, power loss) leaves them behind, and
:func:`remove_stale_temporaries`, run by the next run in each folder it writes to,
removes at once those whose owner (a process of this host) no longer runs.

Files the package reads are checked to be regular files first
(:func:`check_regular_file`, :func:`open_regular`): a FIFO, a device, a socket or a
folder where a file is expected is refused by its kind, never opened (opening a FIFO
without a writer blocks for ever; ``/dev/zero`` never ends).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "TABLE_FORMATS",
    "check_regular_file",
    "file_kind",
    "open_regular",
    "read_parquet",
    "remove_stale_temporaries",
    "sniff_table",
    "table_format",
    "table_suffix",
    "temp_prefix",
    "write_atomically",
    "write_parquet",
]

log = logging.getLogger(__name__)

TEMP_TAG = "roman_tweakreg-tmp"
#: Longest part of a temporary's name taken from the file it stands for (bytes of the
#: stem), and of the host name: a temporary's name is at most about 130 bytes.
TEMP_STEM_MAX = 40
_HOST_MAX = 32
_TEMP_NAME = re.compile(re.escape(TEMP_TAG) + r"\.(?P<host>[^.]+)\.(?P<pid>\d+)\.")
_swept: set[str] = set()  # folders already swept by this process
_swept_lock = threading.Lock()


def _host() -> str:
    """This host's name (cut to 32 characters) and, on Linux, its process-id namespace.

    Process ids are those of a namespace: two containers sharing a host name and a
    folder see different processes under one pid, so the namespace is part of the
    owner's identity (``<host>-p<namespace inode>``); a temporary is judged by
    ``os.kill(pid, 0)`` only where that pid means its owner.
    """
    host = (re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "localhost")[:_HOST_MAX]
    try:
        return f"{host}-p{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux, or no /proc
        return host


def temp_prefix(stem: str = "") -> str:
    """A prefix for a temporary file or folder naming its owner: ``<stem>.<tag>.<host>.<pid>.``.

    ``tempfile`` appends a random part.  :func:`remove_stale_temporaries` recognises
    the names and knows from them whether their owner still runs.  ``stem`` is cut to
    :data:`TEMP_STEM_MAX` bytes (and the host name to 32 characters), so the name stays
    far below any file system's limit (about 130 bytes at most) whatever the name of the
    file written.
    """
    cut = os.fsencode(stem)[:TEMP_STEM_MAX].decode("utf-8", "ignore")
    return f"{cut}.{TEMP_TAG}.{_host()}.{os.getpid()}."


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

    An entry is removed, at once, when its name carries the tag of
    :func:`temp_prefix`, this host and a process id that does not run (``os.kill(pid,
    0)``): its owner was killed (SIGKILL, SIGTERM under ``strun``, a batch system's
    stop) and nobody will finish it.  Entries of other hosts (a shared folder) are left
    alone: whether their owner runs cannot be known here; they are logged.  With
    ``once``, a folder is swept once per process.

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
    host = _host()
    for entry in entries:
        match = _TEMP_NAME.search(entry.name)
        if match is None:
            continue
        pid = int(match["pid"])
        if match["host"] != host:
            log.info("Temporary %s of host %s left in place", entry.path, match["host"])
            continue
        if pid == os.getpid() or _pid_running(pid):
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


def file_kind(mode: int) -> str | None:
    """What a file of mode ``mode`` (``st_mode``) is, in words, if not a regular file; else None."""
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    return next((words for test, words in kinds if test(mode)), "not a regular file")


def check_regular_file(
    path: str | os.PathLike, what: str, error: type[Exception]
) -> os.stat_result:
    """Check that ``path`` (after symbolic links) is a regular file, without opening it.

    Parameters
    ----------
    path : str or path-like
        The file.
    what : str
        What the file is for, in messages (``catalog``, ``association file``...).
    error : type
        The exception raised when it is not a regular file (an errors.py class).

    Returns
    -------
    os.stat_result
        Its status.

    Raises
    ------
    error
        ``<path>: <what> is a FIFO (named pipe), not a regular file`` (or a folder, a
        character device...).
    FileNotFoundError, OSError
        As ``os.stat`` raises them (the file does not exist, cannot be reached).
    """
    st = os.stat(path)
    kind = file_kind(st.st_mode)
    if kind is not None:
        raise error(f"{path}: {what} is {kind}, not a regular file")
    return st


def open_regular(path: str | os.PathLike, what: str, error: type[Exception]):
    """Open ``path`` for reading in binary, only if it is a regular file.

    The file is opened without blocking (``O_NONBLOCK``: opening a FIFO that has no
    writer would wait for ever) and its kind checked on the open descriptor, so that a
    file swapped for a FIFO or a device after an earlier check is refused too.

    Raises
    ------
    error
        When it is not a regular file (see :func:`check_regular_file`).
    OSError
        When it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise error(f"{path}: {what} is {kind}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


#: Bytes read from the start of a table file to tell whether it can be what its format says.
SNIFF_BYTES = 1024


def sniff_table(path: str | os.PathLike, fmt: str | None) -> str | None:
    """Why the file ``path`` cannot be a table of format ``fmt``, from its first KiB; or None.

    A cheap look before a parser reads the whole file: a Parquet file starts and ends
    with ``PAR1``; a FITS file starts with ``SIMPLE`` (gzip's magic bytes for
    ``.fits.gz``); a text table (ECSV, CSV and the other astropy ASCII formats) holds
    no NUL byte in its first KiB.  A 2 GB file of NUL bytes is then refused in
    microseconds instead of after tens of seconds and gigabytes of memory.  Other
    formats (``None``, ASDF, anything else astropy reads) are not sniffed here.

    The file is opened with :func:`open_regular`: raises ``OSError`` (a FIFO or a
    device as :class:`ValueError` with the file's kind) when it cannot be read.
    """
    fmt = (fmt or "").lower()
    if not (fmt == "parquet" or fmt == "fits" or fmt.startswith("ascii")):
        return None
    with open_regular(path, "table", ValueError) as f:
        head = f.read(SNIFF_BYTES)
        if fmt == "parquet":
            size = os.fstat(f.fileno()).st_size
            tail = b""
            if size >= 8:
                f.seek(size - 4)
                tail = f.read(4)
            if not head.startswith(b"PAR1") or tail != b"PAR1":
                return (
                    f"not a Parquet file: expected it to start and end with b'PAR1', found "
                    f"{head[:8]!r} ... {tail!r}"
                )
            return None
    if fmt == "fits":
        if head.startswith((b"SIMPLE", b"\x1f\x8b")):
            return None
        return f"not a FITS file: expected it to start with 'SIMPLE', found {head[:16]!r}"
    if b"\x00" in head:
        return (
            f"not a text table ({fmt}): its first {len(head)} bytes hold NUL bytes "
            f"(binary data), starting {head[:16]!r}"
        )
    return None


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
    """Read a Parquet file into an astropy Table with pyarrow (astropy's reader needs pandas).

    Raises ``ValueError`` naming the file when it is not a regular file (a FIFO, a
    device) or not a Parquet file by its first and last bytes (:func:`sniff_table`).
    """
    import pyarrow.parquet as pq

    reason = sniff_table(path, "parquet")
    if reason is not None:
        raise ValueError(f"{path}: {reason}")
    data = pq.read_table(path, columns=columns)
    return Table({c: data.column(c).to_numpy(zero_copy_only=False) for c in data.column_names})


def write_parquet(table: Table, path: str | os.PathLike) -> None:
    """Write an astropy Table's columns to a Parquet file with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({c: np.asarray(table[c]) for c in table.colnames}), path)
