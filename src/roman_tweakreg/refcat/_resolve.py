"""The entry function: from an ``abs_refcat`` value to a :class:`ReferenceCatalog`."""

from __future__ import annotations

import enum
import logging
import os
import re
from pathlib import Path

import numpy as np

from .._io import file_kind
from ..errors import InvalidParameterError, ReferenceCatalogError
from ._cache import CACHE_OFF, ConeCache, default_cache_dir
from ._local import FILE_SUFFIXES, read_local_catalog
from ._remote import S3_CATALOGS, is_hats_url, read_remote_hats
from ._service import query_service, read_url_catalog
from ._types import DEFAULT_REFCAT, ReferenceCatalog

__all__ = [
    "ROMANCAL_CATALOGS",
    "SERVICE_CATALOGS",
    "Entry",
    "check_refcat",
    "classify",
    "get_reference_catalog",
    "service_name",
    "split_refcat",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

#: Catalog names the STScI catalog web service serves (those stcal's astrometric
#: utilities send it).
SERVICE_CATALOGS = ("GAIAREFCAT", "GAIADR3", "GAIADR2", "GAIADR1")

#: Names romancal 1.1.0 also accepts (through stcal) for HATS catalogs it reads from
#: AWS S3, and where they are; read here from the same place (anonymous, public bucket).
ROMANCAL_CATALOGS = S3_CATALOGS


class Entry(enum.Enum):
    """What one ``abs_refcat`` entry is (:func:`classify`): how it is read, or why not."""

    HATS_URL = "the URL of a HATS catalog folder (s3://, or http(s):// without extension)"
    URL = "the http(s):// URL of a catalog file"
    PATH = "an existing local file or folder"
    MISSING_PATH = "a local path that does not exist"
    S3_NAME = "a romancal name of a HATS catalog on AWS S3"
    SERVICE = "a catalog service name"
    NAME = "a name the catalog service may know"
    INVALID = "neither a name, nor a path, nor a URL"

    @property
    def named(self) -> bool:
        """Whether the entry is a catalog name (fetched per sky region by the batch)."""
        return self in (Entry.S3_NAME, Entry.SERVICE, Entry.NAME)


def classify(entry: str) -> Entry:
    """Say what one ``abs_refcat`` entry is; the one place where entries are told apart.

    Known catalog names come first (``GAIADR3`` is the service's even beside a file of
    that name: write ``./GAIADR3`` for the file), then URLs, then local paths; a word
    that is neither is a name the catalog service is asked for.
    """
    text = entry.strip()
    name = text.upper()
    if name in ROMANCAL_CATALOGS:
        return Entry.S3_NAME
    if name in SERVICE_CATALOGS:
        return Entry.SERVICE
    if re.match(r"^(https?|s3)://\S+$", text, re.IGNORECASE):
        return Entry.HATS_URL if is_hats_url(text) else Entry.URL
    path = Path(text).expanduser()
    if path.exists():
        return Entry.PATH
    if any(c in text for c in "/\\~") or text.lower().endswith(FILE_SUFFIXES):
        return Entry.MISSING_PATH
    return Entry.NAME if _NAME.match(text) else Entry.INVALID


def service_name(entry: str) -> str | None:
    """The catalog service name to ask for ``entry`` (a name, any case), or None if not one.

    romancal's S3 names (:data:`ROMANCAL_CATALOGS`) are not service names: they are
    read from S3.
    """
    return entry.strip().upper() if classify(entry) is Entry.SERVICE else None


def check_refcat(refcat: str | None) -> None:
    """Check an ``abs_refcat`` value before any work (no network, no file read).

    Each entry must be a catalog name the catalog service or romancal knows, an
    existing local file or folder, an ``http(s)://`` URL or an ``s3://`` URL.

    Raises
    ------
    InvalidParameterError
        A ``ValueError`` whose message starts with ``Invalid 'abs_refcat'`` and
        lists what is accepted.
    """
    for entry in split_refcat(refcat):
        what = classify(entry)
        if what in (Entry.HATS_URL, Entry.URL, Entry.S3_NAME, Entry.SERVICE):
            continue
        path = Path(entry).expanduser()
        if what is Entry.PATH:
            kind = file_kind(path.stat().st_mode)
            if kind is not None and kind != "a folder":
                raise InvalidParameterError(
                    f"Invalid 'abs_refcat' value: {entry!r}: {path} is {kind}, not a regular "
                    "file: 'abs_refcat' must name a catalog file or a HATS folder"
                )
            continue
        missing = what is Entry.MISSING_PATH
        why = f"local path {path} does not exist" if missing else "unknown catalog name"
        names = ", ".join(SERVICE_CATALOGS)
        romancal = ", ".join(ROMANCAL_CATALOGS)
        raise InvalidParameterError(
            f"Invalid 'abs_refcat' value: {entry!r} ({why}). 'abs_refcat' must be a catalog "
            f"service name ({names}), a romancal S3 name ({romancal}: Gaia DR3 as HATS on "
            f"AWS S3), an existing local catalog file ({', '.join(FILE_SUFFIXES)}) or HATS "
            "folder, an http(s):// URL of a catalog file or HATS folder, an s3:// URL of a "
            "HATS folder, or a comma-separated list of these"
        )


def split_refcat(refcat: str | None) -> list[str]:
    """Split an ``abs_refcat`` value into the entries to try in order.

    None or ``''`` is ``[DEFAULT_REFCAT]``; an existing path is one entry even
    if it holds a comma; otherwise entries are separated by commas.
    """
    text = (refcat or "").strip()
    if not text:
        return [DEFAULT_REFCAT]
    if "," in text and Path(text).expanduser().exists():
        return [text]
    entries = [e.strip() for e in text.split(",") if e.strip()]
    return entries or [DEFAULT_REFCAT]


def get_reference_catalog(
    refcat: str | None,
    ra: float,
    dec: float,
    radius: float,
    epoch: float | None = None,
    *,
    min_sources: int = 1,
    base_url: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 0.5,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    max_bytes: int | None = None,
) -> ReferenceCatalog:
    """Get the reference catalog named ``refcat`` over a cone.

    Parameters
    ----------
    refcat : str or None
        One entry or a comma-separated list tried in order; each entry is a
        catalog name served by the catalog web service (``GAIADR3``,
        ``GAIADR2``...; case-insensitive), romancal's ``GAIADR3_S3`` (Gaia DR3 as
        HATS on AWS S3), a local ECSV/FITS/Parquet/CSV file, a HATS catalog folder,
        an ``http(s)://`` URL of a catalog file or of a HATS folder, or an ``s3://``
        URL of a HATS folder.  None or ``''`` mean ``GAIADR3``.
    ra, dec, radius : float
        Cone centre and radius, degrees.
    epoch : float or None
        Epoch (decimal year) of the observations; the service is asked for
        positions at this epoch.
    min_sources : int
        An entry is used only if it has at least this many sources in the
        cone; otherwise the next entry is tried.
    base_url : str, optional
        Catalog service base URL; default ``$ASTROMETRIC_CATALOG_URL`` or
        ``https://gsss.stsci.edu/webservices``.
    timeout : float
        Seconds a try of a request to the service, S3 or a URL may take in all
        (headers and body: a total deadline, not per read).
    retries : int
        Retries of a failed request (connection error, timeout, 5xx), with
        exponential backoff (for S3: AWS's standard retry policy).
    backoff : float
        Backoff factor (s): waits are 0, 2, 4... times ``backoff``, at most 10 s.
    cache_dir : str or path-like, optional
        Cache folder; default ``$ROMAN_TWEAKREG_CACHE``, else
        ``$XDG_CACHE_HOME/roman_tweakreg``, else ``~/.cache/roman_tweakreg``;
        ``'off'`` (or ``'none'``, ``'0'``, ``'false'``) turns the cache off.
    use_cache : bool
        Whether to read and write the cache.
    max_bytes : int, optional
        Largest answer accepted from the service or a URL, before and after
        decompression; default the ``abs_refcat_max_bytes`` default.

    Returns
    -------
    ReferenceCatalog
        Its ``name`` says which entry was used.

    Raises
    ------
    ReferenceCatalogError
        No entry gives a catalog with ``min_sources`` sources; the message
        says, for each entry, why.
    """
    try:
        ra, dec, radius = float(ra), float(dec), float(radius)
        epoch = None if epoch is None else float(epoch)
    except (TypeError, ValueError) as err:
        raise ReferenceCatalogError(f"abs_refcat: bad cone or epoch: {err}") from err
    if not (np.isfinite([ra, dec, radius]).all() and abs(dec) <= 90 and radius > 0):
        raise ReferenceCatalogError(
            f"abs_refcat: bad cone RA={ra}, Dec={dec}, radius={radius} deg: expected finite "
            "values, |Dec| <= 90 and radius > 0"
        )
    cache = _cache(cache_dir, use_cache)
    options = {
        "timeout": float(timeout),
        "retries": int(retries),
        "backoff": float(backoff),
        "cache": cache,
    }
    if max_bytes is not None:
        options["max_bytes"] = int(max_bytes)
    entries = split_refcat(refcat)
    faults = []
    for entry in entries:
        try:
            cat = _get_one(entry, ra, dec, radius, epoch, base_url, options)
        except ReferenceCatalogError as err:
            if len(entries) == 1:
                raise
            faults.append(str(err))
            log.warning("Reference catalog %s not used: %s", entry, err)
            continue
        if len(cat) >= min_sources:
            if faults:
                log.info("Using reference catalog %s (%d sources)", cat.name, len(cat))
            return cat
        fault = (
            f"{cat.name} has {len(cat)} sources within {radius:.4f} deg of "
            f"({ra:.6f}, {dec:.6f}), fewer than {min_sources}"
        )
        faults.append(fault)
        if len(entries) > 1:
            log.warning("Reference catalog %s not used: %s", entry, fault)
    if len(faults) == 1:
        raise ReferenceCatalogError(faults[0])
    raise ReferenceCatalogError(
        f"no entry of abs_refcat={refcat!r} gave a reference catalog: " + "; ".join(faults)
    )


def _cache(cache_dir, use_cache: bool) -> ConeCache | None:
    if not use_cache or str(cache_dir or "").strip().lower() in CACHE_OFF:
        return None
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return None if root is None else ConeCache(root)


def _get_one(entry: str, ra, dec, radius, epoch, base_url, options) -> ReferenceCatalog:
    what = classify(entry)
    entry = entry.strip()
    if what is Entry.HATS_URL:
        return read_remote_hats(entry, ra, dec, radius, **_hats_options(options))
    if what is Entry.URL:
        return read_url_catalog(entry, ra, dec, radius, **options)
    path = Path(entry).expanduser()
    if what is Entry.PATH:
        return read_local_catalog(path, ra, dec, radius)
    if what is Entry.MISSING_PATH:
        raise ReferenceCatalogError(f"abs_refcat: local reference catalog {path} does not exist")
    if what is Entry.INVALID:
        raise ReferenceCatalogError(
            f"abs_refcat: {entry!r} is neither an existing file or folder, nor a URL, nor a "
            "catalog service name (letters, digits, '_.+-')"
        )
    name = entry.upper()
    if what is Entry.S3_NAME:
        return read_remote_hats(
            ROMANCAL_CATALOGS[name], ra, dec, radius, name=name, **_hats_options(options)
        )
    return query_service(name, ra, dec, radius, epoch, base_url=base_url, **options)


def _hats_options(options: dict) -> dict:
    """The request options of a remote HATS read: all but the answer size limit.

    ``max_bytes`` bounds a service or URL answer, whose size the server decides; a HATS
    read asks only for the needed columns of the partitions that touch the cone, whose
    sizes the catalog's partitioning bounds.
    """
    return {k: v for k, v in options.items() if k != "max_bytes"}
