"""Client of the STScI catalog web service (``CatalogSearch.aspx``) and of catalog URLs.

A query is ``GET {base}/vo/CatalogSearch.aspx?RA=..&DEC=..&SR=..&FORMAT=CSV&CAT=..[&EPOCH=..]``;
the answer is CSV after ``#`` header lines, or ``No data records``.  Requests go
through a ``requests`` session whose urllib3 ``Retry`` retries connection
errors, read errors and timeouts, and 5xx answers, with exponential backoff; an
answer cut short in transfer is retried the same way.  Every answer is checked
(HTTP status, HTML page instead of CSV, missing ``ra``/``dec`` columns, rows
of the wrong length, non-numeric values) and any fault is raised as
:class:`~roman_tweakreg.errors.ReferenceCatalogError` naming the service.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .. import parameters
from .._io import remove_stale_temporaries, temp_prefix
from ..errors import ReferenceCatalogError
from ._cache import ConeCache
from ._local import _ALIASES, _in_cone, read_local_catalog, standard_columns
from ._types import ReferenceCatalog

__all__ = [
    "DEFAULT_SERVICE_URL",
    "SERVICE_ENV",
    "NoDataError",
    "fault_kind",
    "fetch",
    "parse_service_csv",
    "query_service",
    "read_url_catalog",
    "service_base",
]

log = logging.getLogger(__name__)

DEFAULT_SERVICE_URL = "https://gsss.stsci.edu/webservices"
#: Environment variable overriding the service base URL.
SERVICE_ENV = "ASTROMETRIC_CATALOG_URL"
_RETRY_STATUS = (500, 502, 503, 504)
#: Epochs asked of the service are rounded to this many decimals of a year
#: (under 9 hours), so that re-runs share cache entries; ``positions`` carries the rest.
EPOCH_DECIMALS = 3
#: Default largest answer (bytes, before and after decompression) taken from the
#: catalog service or a catalog URL: the parameter ``abs_refcat_max_bytes``.
DEFAULT_MAX_BYTES: int = parameters.default("abs_refcat_max_bytes")
#: Largest piece (bytes, decompressed) read from an answer at a time; the deadline
#: and the size limit are checked between pieces.
CHUNK = 1 << 20


class NoDataError(ReferenceCatalogError):
    """The service answered ``No data records``: no sources in the cone."""


def service_base(base_url: str | None = None) -> str:
    """Return the service base: ``base_url``, else ``$ASTROMETRIC_CATALOG_URL``, else STScI's."""
    base = base_url or os.environ.get(SERVICE_ENV, "").strip() or DEFAULT_SERVICE_URL
    return base.rstrip("/")


def _session(retries: int, backoff: float):
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=retries,
        redirect=5,
        backoff_factor=backoff,
        backoff_max=max(backoff, 10.0),
        status_forcelist=_RETRY_STATUS,
        allowed_methods=frozenset({"GET"}),
        raise_on_status=False,
        respect_retry_after_header=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "roman_tweakreg"
    return session


def _faults(err: BaseException) -> list[BaseException]:
    """``err`` and every fault it wraps: urllib3's ``MaxRetryError.reason``, the
    exceptions in its ``args``, its cause and context, depth first."""
    seen: list[BaseException] = []
    stack = [err]
    while stack:
        fault = stack.pop()
        if not isinstance(fault, BaseException) or any(fault is s for s in seen):
            continue
        seen.append(fault)
        stack += [fault.__context__, fault.__cause__, *reversed(fault.args)]
        stack.append(getattr(fault, "reason", None))
    return seen


def fault_kind(err: BaseException) -> str:
    """What a network fault was, from the types of the faults ``err`` wraps (requests,
    urllib3, the socket's OSError): ``"dns"``, ``"refused"``, ``"timeout"``,
    ``"short"`` (an answer cut short), ``"reset"``, ``"retries"`` (too many error
    answers), or ``""`` when none of those types is among them."""
    import http.client
    import socket

    import requests
    import urllib3

    faults = _faults(err)

    def found(*types) -> bool:
        return any(isinstance(f, types) for f in faults)

    if found(urllib3.exceptions.NameResolutionError, socket.gaierror):
        return "dns"
    if found(ConnectionRefusedError):
        return "refused"
    # urllib3's NewConnectionError (so NameResolutionError) is a ConnectTimeoutError
    # by descent, not a timeout: it is not counted as one
    if any(
        isinstance(f, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError))
        and not isinstance(f, urllib3.exceptions.NewConnectionError)
        for f in faults
    ):
        return "timeout"
    if found(
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.IncompleteRead,
        http.client.IncompleteRead,
    ):
        return "short"
    if found(ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        return "reset"
    if found(requests.exceptions.RetryError, urllib3.exceptions.ResponseError):
        return "retries"
    return ""


_KINDS = {
    "dns": "the host name does not resolve (DNS failure)",
    "refused": "connection refused",
    "timeout": "no answer within the {timeout:g} s timeout",
    "short": "the answer was cut short in transfer",
    "reset": "the connection was closed or reset by the server",
    "retries": "too many error answers",
    "": "network fault",
}


def _describe(err: Exception, timeout: float) -> str:
    """Say in words what a requests/urllib3 fault was (:func:`fault_kind`); the last
    fault's text follows."""
    reason = err.args[0] if err.args else err
    reason = getattr(reason, "reason", reason)  # urllib3 MaxRetryError -> the last fault
    kind = _KINDS[fault_kind(err)].format(timeout=timeout)
    return f"{kind} ({type(reason).__name__}: {reason})"


def fetch(
    url: str,
    params: dict | None,
    *,
    what: str,
    timeout: float,
    retries: int,
    backoff: float,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """GET ``url`` with retries; return the body of a 200 answer.

    Each try waits at most ``timeout`` seconds for the headers (each read of them),
    then has a total deadline of ``timeout`` seconds for the whole body (not per
    read: a server sending one byte a second cannot hold the request open).  The
    body is read in pieces of at most :data:`CHUNK` bytes after decompression, so
    that an answer larger than ``max_bytes`` before or after decompression (a
    ``Content-Encoding: gzip`` bomb, an endless answer) is refused without
    holding more than that in memory.  A try over its deadline, or cut short in
    transfer, is tried again, up to ``retries`` times; a request ends within
    ``2 * (retries + 1) * timeout`` seconds plus the backoff waits (about
    ``(retries + 1) * timeout`` when the headers come at once).

    Raises
    ------
    ReferenceCatalogError
        Any fault: network, deadline, an answer larger than ``max_bytes``,
        non-200 status after retries; naming ``what`` and the limit.
    """
    import requests
    import urllib3

    start = time.monotonic()
    waits = sum(min(backoff * 2**k, max(backoff, 10.0)) for k in range(retries))
    overall = start + 2 * (retries + 1) * timeout + waits
    try:
        with _session(retries, backoff) as session:
            for attempt in range(retries + 1):
                try:
                    with session.get(url, params=params, timeout=timeout, stream=True) as response:
                        deadline = min(time.monotonic() + timeout, overall)
                        if response.status_code != 200:
                            body = _read_body(response, what, deadline, 4096, timeout, cap=False)
                            break
                        body = _read_body(response, what, deadline, max_bytes, timeout)
                        break
                except (
                    requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ConnectionError,
                    urllib3.exceptions.HTTPError,
                    _DeadlineError,
                ) as err:
                    # urllib3 retries faults before the body; retry a body cut short here
                    exhausted = bool(err.args) and isinstance(
                        err.args[0], urllib3.exceptions.MaxRetryError
                    )
                    wait = backoff * 2**attempt
                    if exhausted or attempt == retries or time.monotonic() + wait >= overall:
                        raise
                    why = err if isinstance(err, _DeadlineError) else _describe(err, timeout)
                    log.info("%s: %s; retrying", what, why)
                    time.sleep(wait)
    except _DeadlineError as err:
        raise ReferenceCatalogError(
            f"{what}: {err}, after up to {retries} retries ({time.monotonic() - start:.1f} s)"
        ) from err
    except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
        raise ReferenceCatalogError(
            f"{what}: {_describe(err, timeout)}, after up to {retries} retries"
        ) from err
    except ReferenceCatalogError:
        raise
    except Exception as err:  # anything else from the network stack is still a catalog fault
        raise ReferenceCatalogError(f"{what}: unexpected fault: {err!r}") from err
    if response.status_code != 200:
        tries = f" after {retries} retries" if response.status_code in _RETRY_STATUS else ""
        raise ReferenceCatalogError(
            f"{what}: HTTP {response.status_code} {response.reason}{tries}: {_snippet(body)}"
        )
    return body


class _DeadlineError(Exception):
    """A try of a request went past its deadline (retried by :func:`fetch`)."""


def _read_body(
    response, what: str, deadline: float, max_bytes: int, timeout: float, *, cap: bool = True
) -> bytes:
    """Read ``response``'s body, decompressed, within ``deadline`` and ``max_bytes``.

    With ``cap`` False the first ``max_bytes`` are returned (an error page's start);
    otherwise a larger answer raises :class:`ReferenceCatalogError`.
    """
    raw = response.raw
    encoding = response.headers.get("Content-Encoding", "").strip()
    coded = f" (Content-Encoding {encoding})" if encoding and encoding != "identity" else ""
    length = response.headers.get("Content-Length", "")
    if cap and length.isdigit() and int(length) > max_bytes:
        raise ReferenceCatalogError(
            f"{what}: the answer announces {int(length)} bytes{coded}, more than the limit "
            f"abs_refcat_max_bytes={max_bytes}; raise it or ask for a smaller cone"
        )
    parts: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise _DeadlineError(
                f"the answer took longer than the {timeout:g} s timeout (a deadline per try, "
                f"body included; {size} bytes received)"
            )
        chunk = raw.read1(min(CHUNK, max_bytes + 1 - size), decode_content=True)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            if not cap:
                break
            wire = raw.tell()
            raise ReferenceCatalogError(
                f"{what}: the answer is larger than the limit abs_refcat_max_bytes={max_bytes} "
                f"bytes{coded} ({size} bytes after decompression from {wire} received); "
                "raise it or ask for a smaller cone"
            )
    return b"".join(parts)[:max_bytes] if not cap else b"".join(parts)


def _snippet(body: bytes | str, size: int = 120) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    text = title.group(1) if title else text
    text = " ".join(text.split())
    return repr(text[:size] + ("..." if len(text) > size else ""))


def _is_html(text: str) -> bool:
    head = text.lstrip()[:512].lower()
    return head.startswith("<") or "<html" in head or "<!doctype" in head


def parse_service_csv(body: bytes, what: str) -> dict[str, np.ndarray]:
    """Validate and parse a CatalogSearch CSV answer into standard columns.

    The body is parsed by pyarrow's CSV reader, typed (``float64``; ``objID`` as
    text, then ``int64`` where it fits) and over only the columns a reference
    catalog uses, so that memory stays near the size of those columns (a 65 MB
    answer no longer takes 30 times its size).

    Raises
    ------
    NoDataError
        For a ``No data records`` answer or a header without rows.
    ReferenceCatalogError
        For anything else than the expected CSV: an HTML page, an empty body,
        missing ``ra``/``dec`` columns, rows of the wrong length (a truncated
        answer), non-numeric values; and when there is not enough memory to parse
        it (naming its size).
    """
    try:
        return _parse_csv(body, what)
    except MemoryError as err:
        raise ReferenceCatalogError(
            f"{what}: not enough memory to parse the {len(body) / 1e6:.1f} MB answer; "
            "ask for a smaller cone or give a local catalog"
        ) from err


def _parse_csv(body: bytes, what: str) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    head = bytes(body[:4096]).decode("utf-8", "replace")
    if not body or body.isspace():
        raise ReferenceCatalogError(f"{what}: empty answer")
    if _is_html(head):
        raise ReferenceCatalogError(f"{what}: answered an HTML page, not CSV: {_snippet(head)}")
    if head.lstrip().lower().startswith("no data records"):
        raise NoDataError(f"{what}: No data records: no sources in the cone")
    # skip the '#' comment lines and blank lines before the header line
    start = 0
    while start < len(body):
        stop = body.find(b"\n", start)
        stop = len(body) if stop < 0 else stop + 1
        line = body[start:stop].strip()
        if line and not line.startswith(b"#"):
            break
        start = stop
    if start >= len(body):
        raise ReferenceCatalogError(f"{what}: the answer has no CSV header: {_snippet(head)}")
    stop = body.find(b"\n", start)
    header_line = body[start : len(body) if stop < 0 else stop]
    try:
        header = [h.strip() for h in next(csv.reader([header_line.decode("utf-8")]))]
    except (UnicodeDecodeError, StopIteration) as err:
        raise ReferenceCatalogError(f"{what}: the CSV header is not UTF-8 text: {err}") from err
    except csv.Error as err:  # e.g. a lone carriage return or NUL in the header line
        raise ReferenceCatalogError(
            f"{what}: the CSV header cannot be read ({err}): {_snippet(header_line)}"
        ) from err
    lower = {h.lower(): h for h in header}
    missing = [c for c in ("ra", "dec") if c not in lower]
    if missing:
        raise ReferenceCatalogError(
            f"{what}: the answer lacks column(s) {', '.join(missing)}; expected a CSV header with "
            f"ra, dec, pmra, pmdec, epoch; got {_snippet(header_line)}"
        )
    wanted = {a for aliases in _ALIASES.values() for a in aliases if "." not in a}
    text_cols = {lower[c] for c in ("objid", "source_id") if c in lower}
    include = [h for h in header if h.lower() in wanted]
    bad_rows: list = []

    def invalid(row) -> str:
        bad_rows.append(row)
        return "skip"

    try:
        table = pacsv.read_csv(
            pa.BufferReader(pa.py_buffer(body).slice(start)),
            read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(invalid_row_handler=invalid),
            convert_options=pacsv.ConvertOptions(
                include_columns=include,
                column_types={h: pa.string() if h in text_cols else pa.float64() for h in include},
                strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid as err:
        raise ReferenceCatalogError(
            f"{what}: truncated or malformed CSV: {str(err).splitlines()[0]}"
        ) from err
    if bad_rows:
        n_rows = body.count(b"\n", start) - (0 if body.endswith(b"\n") else -1) - 1
        row = bad_rows[0]
        number = row.number - 1 if row.number and row.number > 0 else "?"
        raise ReferenceCatalogError(
            f"{what}: truncated or malformed CSV: data row {number} of {n_rows} has "
            f"{row.actual_columns} fields, the header has {row.expected_columns}"
        )
    if table.num_rows == 0:
        raise NoDataError(f"{what}: the answer has a header but no rows")
    columns = {}
    for name in table.column_names:
        col = table.column(name)
        if name in text_cols:
            columns[name] = np.char.strip(np.asarray(col.fill_null("").to_numpy(False), dtype=str))
        else:
            columns[name] = col.to_numpy(zero_copy_only=False).astype(float, copy=False)
    out = standard_columns(columns, what)
    if not (np.isfinite(out["RA"]).all() and np.isfinite(out["DEC"]).all()):
        raise ReferenceCatalogError(f"{what}: truncated or malformed CSV: ra/dec not numeric")
    if "objID" in out:
        try:
            out["objID"] = out["objID"].astype(np.int64)
        except ValueError:
            pass  # keep text identifiers
    return out


def query_service(
    catalog: str,
    ra: float,
    dec: float,
    radius: float,
    epoch: float | None,
    *,
    base_url: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 0.5,
    cache: ConeCache | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ReferenceCatalog:
    """Ask the catalog service for ``catalog`` over a cone, through the cache.

    With an ``epoch`` the service is asked for positions at that epoch
    (rounded to :data:`EPOCH_DECIMALS`); the table keeps ``pmra``/``pmdec`` so
    that :meth:`ReferenceCatalog.positions` carries them on to other epochs.

    Raises
    ------
    ReferenceCatalogError
        The service cannot be reached, does not answer within the deadline
        (see :func:`fetch`), answers more than ``max_bytes`` or its answer is
        not a usable catalog.
    """
    base = service_base(base_url)
    url = f"{base}/vo/CatalogSearch.aspx"
    asked = None if epoch is None else round(float(epoch), EPOCH_DECIMALS)
    what = f"catalog service {url} (CAT={catalog})"
    params = {
        "RA": f"{ra:.8f}",
        "DEC": f"{dec:.8f}",
        "SR": f"{radius:.8f}",
        "FORMAT": "CSV",
        "CAT": catalog,
    }
    if asked is not None:
        params["EPOCH"] = f"{asked:.{EPOCH_DECIMALS}f}"
    columns = None
    entry = cache.get(base, catalog, ra, dec, radius, asked) if cache else None
    if entry is not None:
        try:
            columns = parse_service_csv(entry.body, f"cache entry {entry.path}")
            log.info("%s: cone of %.4f deg served from the cache %s", what, radius, entry.path)
        except ReferenceCatalogError as err:
            log.warning("Discarding a bad cache entry: %s", err)
            cache.discard(entry.path)
    if columns is None:
        body = fetch(url, params, what=what, timeout=timeout, retries=retries, backoff=backoff,
                     max_bytes=max_bytes)
        columns = parse_service_csv(body, what)
        if cache:
            cache.put(base, catalog, ra, dec, radius, asked, body)
    if asked is not None:  # the service placed every row at the asked epoch
        if "ref_epoch" in columns:  # its errors stay those of the catalog's own epoch
            columns["err_epoch"] = columns["ref_epoch"]
        columns["ref_epoch"] = np.full(len(columns["RA"]), asked)
    source = f"{url}?CAT={catalog}" + (f"&EPOCH={params['EPOCH']}" if asked is not None else "")
    return _in_cone(columns, ra, dec, radius, catalog, source)


def read_url_catalog(
    url: str,
    ra: float,
    dec: float,
    radius: float,
    *,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 0.5,
    cache: ConeCache | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ReferenceCatalog:
    """Download a catalog file (any local format, by its name) and read the cone from it.

    The file is kept in the cache, checksummed, and read from there next time.
    The download has the deadline and the size limit ``max_bytes`` of :func:`fetch`.
    """
    name = Path(urlparse(url).path).name or "catalog.ecsv"
    what = f"catalog URL {url}"
    path = cache.file_path(url, name) if cache else None
    if path is not None and cache.get_file(path):
        try:
            return read_local_catalog(path, ra, dec, radius, name=name)
        except ReferenceCatalogError as err:
            log.warning("Discarding a bad cached file: %s", err)
            cache.discard(path)
    body = fetch(url, None, what=what, timeout=timeout, retries=retries, backoff=backoff,
                     max_bytes=max_bytes)
    if _is_html(body[:512].decode("latin-1")) and not name.lower().endswith((".html", ".htm")):
        raise ReferenceCatalogError(
            f"{what}: answered an HTML page, not a catalog file: {_snippet(body)}"
        )
    if path is not None and cache.put_file(path, body):
        try:
            cat = read_local_catalog(path, ra, dec, radius, name=name)
        except ReferenceCatalogError:
            cache.discard(path)
            raise
    else:
        remove_stale_temporaries(tempfile.gettempdir())
        with tempfile.TemporaryDirectory(prefix=temp_prefix("roman_tweakreg")) as tmp:
            (Path(tmp) / name).write_bytes(body)
            cat = read_local_catalog(Path(tmp) / name, ra, dec, radius, name=name)
    cat.source = url
    return cat
