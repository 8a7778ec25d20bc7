"""On-disk cache of catalog service answers and downloaded catalog files.

Layout under the cache folder::

    cones/<CATALOG>-<hash of service and epoch>/<ra>_<dec>_<radius>.cone
    files/<hash of URL>/<file name>  (+ <file name>.sha256)

A ``.cone`` entry is one JSON line (version, service, catalog, cone, epoch and a
SHA-256 over these fields and the body) followed by the service's answer as
received.  Entries are written to a temporary file and renamed into place, so a
reader never sees half an entry; one whose header or checksum does not verify is
deleted and fetched again.  An entry serves any query of the same service,
catalog and epoch whose cone, as stated in its checksummed header (never its file
name), contains the query's.  Entries never expire: Gaia releases are fixed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.coordinates import angular_separation

from .._io import file_kind, write_atomically

__all__ = ["CACHE_ENV", "CACHE_OFF", "ConeCache", "ConeEntry", "default_cache_dir"]

log = logging.getLogger(__name__)

#: Environment variable naming the cache folder; ``off``, ``none``, ``0`` or ``false`` disable it.
CACHE_ENV = "ROMAN_TWEAKREG_CACHE"
#: Values of ``$ROMAN_TWEAKREG_CACHE`` or ``cache_dir`` that turn the cache off.
CACHE_OFF = frozenset({"off", "none", "0", "false", "no"})


def default_cache_dir() -> Path | None:
    """Return the cache folder: ``$ROMAN_TWEAKREG_CACHE``, else ``$XDG_CACHE_HOME/roman_tweakreg``,
    else ``~/.cache/roman_tweakreg``; None when ``$ROMAN_TWEAKREG_CACHE`` turns it off."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return None if env.lower() in CACHE_OFF else Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "roman_tweakreg"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ConeEntry:
    """A verified cache entry: where it is, the cone it covers and the answer body."""

    path: Path
    ra: float
    dec: float
    radius: float
    body: bytes


class ConeCache:
    """Cache of cone answers and downloaded files under ``root``.

    Failures to read or write the cache are logged and never raised: the
    cache can only save requests, not lose a catalog.

    An entry is trusted by its header, never by its file name: the header states the
    service, catalog, epoch and cone, and its ``sha256`` covers the header fields
    and the answer, so an entry renamed or edited to claim another cone is not
    served.  Symbolic links inside the cache are never followed: entries are opened
    with ``O_NOFOLLOW`` and nothing is written through a linked folder.  Writers
    only create files under unique temporary names and rename them into place, so
    any number of processes on any number of hosts may share the folder without
    locks; a reader deletes a bad entry only if it is still the file it read.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ConeCache({str(self.root)!r})"

    # -- cone answers -----------------------------------------------------------------------
    def _folder(self, service: str, catalog: str, epoch: float | None) -> Path:
        key = json.dumps([service, catalog, epoch]).encode()
        safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", catalog)[:40]
        return self.root / "cones" / f"{safe}-{_digest(key)[:16]}"

    def get(
        self, service: str, catalog: str, ra: float, dec: float, radius: float, epoch: float | None
    ) -> ConeEntry | None:
        """Return the smallest verified entry whose cone contains the query cone, or None.

        The cone of each entry is read from its header (the file name is not trusted);
        the chosen entry's checksum is then verified.
        """
        folder = self._folder(service, catalog, epoch)
        candidates = []
        try:
            files = [] if folder.is_symlink() else sorted(folder.glob("*.cone"))
        except OSError:
            return None
        for path in files:
            meta = self._header(path)
            if meta is None:
                continue
            try:
                c_ra, c_dec, c_rad = (float(meta[k]) for k in ("ra", "dec", "radius"))
                same = (meta["service"], meta["catalog"], meta["epoch"]) == (
                    service,
                    catalog,
                    epoch,
                )
            except (KeyError, TypeError, ValueError):
                continue
            sep = np.rad2deg(angular_separation(*np.deg2rad([ra, dec, c_ra, c_dec])))
            if same and sep + radius <= c_rad * (1 + 1e-12):
                candidates.append((c_rad, str(path), path))
        for _, _, path in sorted(candidates):
            entry = self._read(path, service, catalog, epoch)
            if entry is not None:
                return entry
        return None

    def _header(self, path: Path) -> dict | None:
        """The JSON header line of an entry (at most 4 kB), or None.

        An entry that is not a regular file (a FIFO, a device, a folder put in its
        place) is never read (opening a FIFO would wait for ever): it is deleted with a
        warning, and the cone fetched again.
        """
        try:
            with _open_nofollow(path) as f:
                head = f.readline(4096)
            meta = json.loads(head)
        except _NotRegular as err:
            log.warning("Cache entry %s %s; deleted, fetching again", path, err.strerror)
            self.discard(path)
            return None
        except (OSError, ValueError) as err:
            log.warning("Cache entry %s is unreadable (%s); ignored", path, err)
            return None
        return meta if isinstance(meta, dict) else None

    def _read(self, path: Path, service: str, catalog: str, epoch: float | None):
        try:
            with _open_nofollow(path) as f:
                status = os.fstat(f.fileno())
                data = f.read()
            head, _, body = data.partition(b"\n")
            meta = json.loads(head)
            ok = (meta["service"], meta["catalog"], meta["epoch"]) == (
                service,
                catalog,
                epoch,
            ) and meta["sha256"] == _entry_digest(meta, body)
            if ok:
                return ConeEntry(
                    path, float(meta["ra"]), float(meta["dec"]), float(meta["radius"]), body
                )
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("Cache entry %s is unreadable (%s); fetching again", path, err)
            status = None
        else:
            log.warning("Cache entry %s fails its checksum; fetching again", path)
        self.discard(path, status)
        return None

    def put(
        self,
        service: str,
        catalog: str,
        ra: float,
        dec: float,
        radius: float,
        epoch: float | None,
        body: bytes,
    ) -> Path | None:
        """Store a verified answer; return its path (None when the cache cannot be written)."""
        meta = {
            "version": _ENTRY_VERSION,
            "service": service,
            "catalog": catalog,
            "ra": float(ra),
            "dec": float(dec),
            "radius": float(radius),
            "epoch": epoch,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        meta["sha256"] = _entry_digest(meta, body)
        path = self._folder(service, catalog, epoch) / (
            f"{float(ra)!r}_{float(dec)!r}_{float(radius)!r}.cone"
        )
        try:
            self._safe_folder(path.parent)
            write_atomically(
                path, lambda p: p.write_bytes(json.dumps(meta).encode() + b"\n" + body)
            )
        except OSError as err:
            log.warning("Cannot write the catalog cache entry %s: %s", path, err)
            return None
        return path

    def _safe_folder(self, folder: Path) -> None:
        """Create ``folder`` under the root, refusing any symbolic link below the root.

        Raises
        ------
        OSError
            When a folder on the way is a symbolic link or not a folder.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        current = self.root
        for part in folder.relative_to(self.root).parts:
            current = current / part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                try:
                    current.mkdir()
                except FileExistsError:  # made meanwhile by another process
                    pass
                st = os.lstat(current)
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                raise OSError(
                    errno.ELOOP if stat.S_ISLNK(st.st_mode) else errno.ENOTDIR,
                    "the cache will not write through a symbolic link or a file",
                    str(current),
                )

    def discard(self, path: Path, status: os.stat_result | None = None) -> None:
        """Delete an entry (and a file's checksum), ignoring errors.

        With ``status`` (the ``os.fstat`` of the file as read), the entry is deleted
        only if it is still that file: another process may have replaced it meanwhile.
        """
        if status is not None:
            try:
                now = os.lstat(path)
            except OSError:
                return
            if (now.st_ino, now.st_dev, now.st_mtime_ns) != (
                status.st_ino,
                status.st_dev,
                status.st_mtime_ns,
            ):
                return
        for p in (path, path.with_name(path.name + ".sha256")):
            try:
                p.unlink(missing_ok=True)
            except OSError as err:
                log.warning("Cannot delete the cache entry %s: %s", p, err)

    # -- downloaded files -------------------------------------------------------------------
    def file_path(self, url: str, name: str) -> Path:
        """Where the file downloaded from ``url`` is kept."""
        return self.root / "files" / _digest(url.encode())[:20] / name

    def get_file(self, path: Path) -> Path | None:
        """Return ``path`` if it is present and matches its checksum, else None (deleting it)."""
        if not os.path.lexists(path):
            return None
        try:
            with _open_nofollow(path.with_name(path.name + ".sha256")) as f:
                want = f.read(200).decode().strip()
            with _open_nofollow(path) as f:
                digest = hashlib.sha256()
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            if want == digest.hexdigest():
                return path
            log.warning("Cached file %s fails its checksum; fetching again", path)
        except (OSError, UnicodeDecodeError) as err:
            log.warning("Cached file %s is unreadable (%s); fetching again", path, err)
        self.discard(path)
        return None

    def put_file(self, path: Path, data: bytes) -> Path | None:
        """Store a downloaded file and its checksum; None when the cache cannot be written."""
        try:
            self._safe_folder(path.parent)
            write_atomically(path, lambda p: p.write_bytes(data))
            digest = _digest(data).encode()
            write_atomically(path.with_name(path.name + ".sha256"), lambda p: p.write_bytes(digest))
        except OSError as err:
            log.warning("Cannot write the cached file %s: %s", path, err)
            return None
        return path


#: Version of the ``.cone`` header; entries of another version are fetched again.
_ENTRY_VERSION = 2


def _entry_digest(meta: dict, body: bytes) -> str:
    """SHA-256 over the header fields (all but ``sha256``) and the answer body."""
    fields = {k: v for k, v in meta.items() if k != "sha256"}
    head = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(head + b"\n" + body).hexdigest()


class _NotRegular(OSError):
    """A cache entry that is not a regular file (a FIFO, a device, a folder)."""


def _open_nofollow(path: Path):
    """Open ``path`` for reading in binary, failing (ELOOP) if it is a symbolic link.

    The file is opened without blocking and must be a regular file (else
    :class:`_NotRegular`): a FIFO put in the cache would block a reader for ever.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise _NotRegular(errno.EINVAL, f"is {kind}, not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
