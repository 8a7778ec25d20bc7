"""HATS catalogs read over the network: romancal's ``GAIADR3_S3`` on AWS S3, and HATS URLs.

``GAIADR3_S3`` is Gaia DR3 as a HATS catalog in the public bucket
``s3://stpubdata/gaia/gaia_dr3/public/hats/gaia/`` (where romancal 1.1.0, through
stcal, reads it).  It is read anonymously with pyarrow's ``S3FileSystem`` (region
``us-east-1``); the endpoint is AWS's unless ``$AWS_ENDPOINT_URL_S3`` or
``$AWS_ENDPOINT_URL`` names another (an S3-compatible server), as every AWS SDK
does.  An ``s3://`` URL of another HATS catalog, or an ``http(s)://`` URL of a HATS
catalog folder, is read the same way (HTTP through
:class:`~roman_tweakreg.refcat._http_fs.HTTPHandler`, on ``requests``).  The
partitions over the cone are chosen and read by the local HATS reader
(:func:`~roman_tweakreg.refcat._local.read_hats_catalog`) over the remote file
system, so the same partitions and columns are read as from a local copy.
The cone's rows (the reference columns only) are kept in the on-disk cache like
the catalog service's answers.
"""

from __future__ import annotations

import io
import logging
import os
from urllib.parse import urlparse

import numpy as np

from ..errors import ReferenceCatalogError
from ._cache import ConeCache
from ._local import _in_cone, read_hats_catalog, standard_columns
from ._service import _KINDS, fault_kind
from ._types import ReferenceCatalog

__all__ = [
    "ENDPOINT_ENVS",
    "S3_CATALOGS",
    "S3_REGION",
    "is_hats_url",
    "read_remote_hats",
    "s3_endpoint",
]

log = logging.getLogger(__name__)

#: romancal's (stcal's) names of HATS catalogs on AWS S3, and where they are.
S3_CATALOGS = {"GAIADR3_S3": "s3://stpubdata/gaia/gaia_dr3/public/hats/gaia/"}
#: The region of the ``stpubdata`` bucket (given, so that no request goes to find it).
S3_REGION = "us-east-1"
#: Environment variables naming another S3 endpoint, the first set wins (the AWS SDKs' names).
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def s3_endpoint() -> str | None:
    """The S3 endpoint from ``$AWS_ENDPOINT_URL_S3``, else ``$AWS_ENDPOINT_URL``; None for AWS's."""
    for env in ENDPOINT_ENVS:
        value = os.environ.get(env, "").strip()
        if value:
            return value.rstrip("/")
    return None


def is_hats_url(entry: str) -> bool:
    """Whether ``entry`` is the URL of a HATS catalog folder rather than of a catalog file.

    Any ``s3://`` URL is; an ``http(s)://`` URL without a query is when its path ends
    with ``/`` or its last part has no extension (``.../hats/gaia``); any other URL
    (``.../field.ecsv``, ``.../search.aspx?...``) is a file, downloaded whole.
    """
    parsed = urlparse(entry.strip())
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        return bool(parsed.netloc)
    if scheme not in ("http", "https") or not parsed.netloc or parsed.query:
        return False
    if parsed.path.endswith("/"):
        return True
    last = parsed.path.rsplit("/", 1)[-1]
    return bool(last) and "." not in last


def read_remote_hats(
    url: str,
    ra: float,
    dec: float,
    radius: float,
    *,
    name: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 0.5,
    cache: ConeCache | None = None,
) -> ReferenceCatalog:
    """Read the sources in a cone from a HATS catalog at an ``s3://`` or ``http(s)://`` URL.

    Parameters
    ----------
    url : str
        The catalog folder, e.g. ``s3://stpubdata/gaia/gaia_dr3/public/hats/gaia/``.
    ra, dec, radius : float
        Cone centre and radius (deg).
    name : str, optional
        Catalog name recorded in the WCS name (``GAIADR3_S3``); default the folder name.
    timeout : float
        Seconds to wait to connect, and for data, per request and try (pyarrow's S3
        client counts the wait for data in whole seconds, rounded up).
    retries : int
        Retries of a failed request: AWS's standard policy for S3 (exponential
        backoff with jitter, on network faults, timeouts, throttling and 5xx answers),
        urllib3's ``Retry`` with ``backoff`` for HTTP (as for the catalog service).
    backoff : float
        Backoff factor (s) of the HTTP retries.
    cache : ConeCache, optional
        Where the cone's rows are kept, keyed by URL (and endpoint), name and cone.

    Raises
    ------
    ReferenceCatalogError
        Naming the URL (and the endpoint when not AWS's): no such bucket or catalog, no
        network, no answer within the timeout, an unreadable partition.
    """
    parsed = urlparse(url.strip())
    scheme = parsed.scheme.lower()
    endpoint = s3_endpoint() if scheme == "s3" else None
    where = url.strip().rstrip("/")
    what = f"HATS catalog {where}" + (f" (endpoint {endpoint})" if endpoint else "")
    name = name or where.rsplit("/", 1)[-1]
    service = where if endpoint is None else f"{where} @ {endpoint}"
    entry = cache.get(service, name, ra, dec, radius, None) if cache else None
    if entry is not None:
        try:
            cat = _from_body(entry.body, ra, dec, radius, name, where)
            log.info("%s: cone of %.4f deg served from the cache %s", what, radius, entry.path)
            return cat
        except ReferenceCatalogError as err:
            log.warning("Discarding a bad cache entry: %s", err)
            cache.discard(entry.path)
    tries = int(retries) + 1
    handler = None
    if scheme == "s3":
        filesystem = _s3_filesystem(timeout, retries, endpoint)
    elif scheme in ("http", "https"):
        from pyarrow import fs

        from ._http_fs import HTTPHandler

        handler = HTTPHandler(scheme, timeout, retries, backoff)
        filesystem = fs.PyFileSystem(handler)
    else:
        raise ReferenceCatalogError(f"abs_refcat: {url!r} is not an s3:// or http(s):// URL")
    root = parsed.netloc + parsed.path.rstrip("/")
    try:
        cat = read_hats_catalog(
            root, ra, dec, radius, name=name, filesystem=filesystem, where=where
        )
    except ReferenceCatalogError as err:
        cause = err.__cause__
        if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
            raise ReferenceCatalogError(
                f"abs_refcat: {what}: {_describe(cause, timeout, tries)}"
            ) from err
        raise
    except OSError as err:
        raise ReferenceCatalogError(
            f"abs_refcat: {what}: {_describe(err, timeout, tries)}"
        ) from err
    finally:
        if handler is not None:
            handler.close()
    if cache:
        cache.put(service, name, ra, dec, radius, None, _to_body(cat))
    return cat


def _describe(err: OSError, timeout: float, tries) -> str:
    """Say in words what a pyarrow S3 or HTTP-handler fault was; the original text follows.

    A fault of the HTTP handler (``_http_fs``) carries the requests/urllib3 faults it
    wraps, told apart by their types (:func:`~._service.fault_kind`).  pyarrow raises
    every S3 fault as a plain ``OSError`` whose text carries the AWS error name and
    curl's code, and no type: that text is read, only to word this message (no decision
    is taken from it).
    """
    text = " ".join(str(err).split())
    tries = f"{tries} {'try' if tries == 1 else 'tries'}"
    kind = fault_kind(err)
    if kind:
        worded = {"refused": "cannot connect (no network or no server)"}
        kind = worded.get(kind, _KINDS[kind].format(timeout=timeout))
        return f"{kind}, {tries}: {text}"
    low = text.lower()
    if "no_such_bucket" in low or "nosuchbucket" in low:
        kind = "the bucket does not exist"
    elif "access_denied" in low or "accessdenied" in low or "http 403" in low:
        kind = "access denied"
    elif "curlcode: 28" in low or "timeout" in low or "timed out" in low:
        kind = f"no answer within the {timeout:g} s timeout, {tries}"
    elif "curlcode: 7" in low or "could not connect" in low or "refused" in low:
        kind = f"cannot connect (no network or no server), {tries}"
    elif "curlcode: 6" in low or "resolve" in low:
        kind = f"the host name does not resolve (DNS failure), {tries}"
    else:
        kind = f"network fault, {tries}"
    return f"{kind}: {text}"


def _s3_filesystem(timeout: float, retries: int, endpoint: str | None):
    """pyarrow's S3 client: anonymous, us-east-1, with timeouts and AWS's standard retries."""
    from pyarrow import fs

    options = {
        "anonymous": True,
        "region": S3_REGION,
        "connect_timeout": float(timeout),
        "request_timeout": float(timeout),
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=int(retries) + 1),
    }
    if endpoint:
        options["endpoint_override"] = endpoint
    return fs.S3FileSystem(**options)


def _to_body(cat: ReferenceCatalog) -> bytes:
    """The cone's rows (standard columns) as Parquet bytes, for the cache."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    table = cat.table
    pq.write_table(pa.table({c: np.asarray(table[c]) for c in table.colnames}), sink)
    return sink.getvalue()


def _from_body(body: bytes, ra, dec, radius, name: str, where: str) -> ReferenceCatalog:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(body))
    except Exception as err:
        raise ReferenceCatalogError(f"cache entry of {where} is not Parquet: {err}") from err
    data = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    return _in_cone(standard_columns(data, where), ra, dec, radius, name, where)
