"""On-disk cache of catalog service answers and downloaded catalog files.

Layout under the cache folder::

    cones/<CATALOG>-<hash of service and epoch>/<ra>_<dec>_<radius>.cone
    files/<hash of URL>/<file name>  (+ <file name>.sha256)

A ``.cone`` entry is one JSON line (service, catalog, cone, epoch, SHA-256 of
the body) followed by the service's answer as received.  Entries are written
to a temporary file and renamed into place, so a reader never sees half an
entry; one whose header or checksum does not verify is deleted and fetched
again.  An entry serves any query of the same service, catalog and epoch
whose cone lies inside its own.  Entries never expire: Gaia releases are fixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.coordinates import angular_separation

from .._io import write_atomically

__all__ = ["CACHE_ENV", "CACHE_OFF", "ConeCache", "ConeEntry", "default_cache_dir"]

log = logging.getLogger(__name__)

#: Environment variable naming the cache folder; ``off``, ``none``, ``0`` or ``false`` disable it.
CACHE_ENV = "ROMAN_TWEAKREG_CACHE"
#: Values of ``$ROMAN_TWEAKREG_CACHE`` or ``cache_dir`` that turn the cache off.
CACHE_OFF = frozenset({"off", "none", "0", "false", "no"})
_CONE = re.compile(r"^(.+)_(.+)_(.+)\.cone$")


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
        """Return the smallest verified entry whose cone contains the query cone, or None."""
        folder = self._folder(service, catalog, epoch)
        candidates = []
        try:
            files = list(folder.glob("*.cone"))
        except OSError:
            return None
        for path in files:
            m = _CONE.match(path.name)
            try:
                c_ra, c_dec, c_rad = (float(g) for g in m.groups())
            except (AttributeError, ValueError):
                continue
            sep = np.rad2deg(angular_separation(*np.deg2rad([ra, dec, c_ra, c_dec])))
            if sep + radius <= c_rad * (1 + 1e-12):
                candidates.append((c_rad, path))
        for _, path in sorted(candidates):
            entry = self._read(path, service, catalog, epoch)
            if entry is not None:
                return entry
        return None

    def _read(self, path: Path, service: str, catalog: str, epoch: float | None):
        try:
            data = path.read_bytes()
            head, _, body = data.partition(b"\n")
            meta = json.loads(head)
            ok = (meta["service"], meta["catalog"], meta["epoch"]) == (
                service,
                catalog,
                epoch,
            ) and meta["sha256"] == _digest(body)
            if ok:
                return ConeEntry(
                    path, float(meta["ra"]), float(meta["dec"]), float(meta["radius"]), body
                )
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("Cache entry %s is unreadable (%s); fetching again", path, err)
        else:
            log.warning("Cache entry %s fails its checksum; fetching again", path)
        self.discard(path)
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
            "service": service,
            "catalog": catalog,
            "ra": float(ra),
            "dec": float(dec),
            "radius": float(radius),
            "epoch": epoch,
            "sha256": _digest(body),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        path = self._folder(service, catalog, epoch) / (
            f"{float(ra)!r}_{float(dec)!r}_{float(radius)!r}.cone"
        )
        try:
            write_atomically(
                path, lambda p: p.write_bytes(json.dumps(meta).encode() + b"\n" + body)
            )
        except OSError as err:
            log.warning("Cannot write the catalog cache entry %s: %s", path, err)
            return None
        return path

    def discard(self, path: Path) -> None:
        """Delete an entry (and a file's checksum), ignoring errors."""
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
        if not path.exists():
            return None
        try:
            want = path.with_name(path.name + ".sha256").read_text().strip()
            if want == _digest(path.read_bytes()):
                return path
            log.warning("Cached file %s fails its checksum; fetching again", path)
        except OSError as err:
            log.warning("Cached file %s is unreadable (%s); fetching again", path, err)
        self.discard(path)
        return None

    def put_file(self, path: Path, data: bytes) -> Path | None:
        """Store a downloaded file and its checksum; None when the cache cannot be written."""
        try:
            write_atomically(path, lambda p: p.write_bytes(data))
            digest = _digest(data).encode()
            write_atomically(path.with_name(path.name + ".sha256"), lambda p: p.write_bytes(digest))
        except OSError as err:
            log.warning("Cannot write the cached file %s: %s", path, err)
            return None
        return path
