"""A local stand-in for the STScI catalog service, for tests.

``gaia_service`` starts a real ``ThreadingHTTPServer`` on 127.0.0.1 (port 0)
serving ``GET /vo/CatalogSearch.aspx?RA=&DEC=&SR=&FORMAT=CSV&CAT=[&EPOCH=]``
over a synthetic Gaia-like field (``roman_tweakreg.testing.simulate.make_star_field``,
epoch 2016.0, 5% of the stars without proper motions), and files put in
``service.files`` under ``/files/<name>``.  Tests read ``service.requests``
(the count of HTTP requests, retries included) and ``service.queries`` and
inject faults: ``service.faults`` is a list consumed one per request,
``service.always`` applies to every request once that list is empty.  Faults:

``"503"``       answer HTTP 503
``"close"``     close the connection without answering
``"reset"``     reset the connection (TCP RST) without answering
``"slow"``      wait ``service.delay`` seconds before answering
``"short"``     announce a longer Content-Length than sent, then close
``"truncate"``  a CSV cut in the middle of a row (transfer itself complete)
``"html"``      a 200 HTML error page
``"empty"``     ``No data records``
``"nocolumns"`` a CSV without ra/dec columns
``"trickle"``   send the headers, then one byte of the answer every ``service.delay`` s
``"gzipbomb"``  a ``Content-Encoding: gzip`` answer of ``service.bomb_size`` bytes of
                zeros once inflated (about a thousandth of that on the wire)
``"endless"``   a chunked (HTTP/1.1) CSV answer that never ends: a header, then rows
                until the client goes away

The faults apply to ``/files/<name>`` too (a catalog URL), except those about the
service's CSV (``truncate``, ``empty``, ``nocolumns``).
"""

from __future__ import annotations

import gzip
import socket
import struct
import threading
from contextlib import contextmanager
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from astropy.coordinates import angular_separation

from roman_tweakreg.testing import simulate

__all__ = ["FIELD", "GaiaService", "gaia_service", "gzip_bomb", "running_service", "stars", "truth"]

#: Centre (deg), radius (deg) and epoch of the synthetic field.
FIELD = (150.1, 2.2, 0.3, 2016.0)


@lru_cache(maxsize=1)
def stars():
    """The synthetic Gaia field (about 5600 stars); 5% have no proper motions."""
    ra, dec, radius, epoch = FIELD
    table = simulate.make_star_field(ra, dec, radius, 20000.0, np.random.default_rng(7), epoch)
    no_pm = np.random.default_rng(8).random(len(table)) < 0.05
    table["pmra"][no_pm] = np.nan
    table["pmdec"][no_pm] = np.nan
    table["parallax"][no_pm] = np.nan
    return table


def truth(rows, epoch: float | None):
    """Positions of ``rows`` of :func:`stars` at ``epoch`` by astropy (no motion: unmoved)."""
    ra, dec = np.array(rows["ra"], float), np.array(rows["dec"], float)
    moving = np.isfinite(np.asarray(rows["pmra"], float))
    if epoch is not None and moving.any():
        ra[moving], dec[moving] = simulate.propagate(rows[moving], epoch)
    return ra, dec


def in_cone(ra, dec, radius, field=None):
    """Mask of :func:`stars` (or of the table ``field``) within ``radius`` deg of ``(ra, dec)``."""
    s = stars() if field is None else field
    sep = angular_separation(*(np.deg2rad(x) for x in (s["ra"], s["dec"], ra, dec)))
    return sep <= np.deg2rad(radius)


class GaiaService:
    """State of one running fake service (see the module docstring)."""

    def __init__(self):
        self.catalogs = {"GAIADR1", "GAIADR2", "GAIADR3"}
        self.field = None  # a table like stars() to serve instead of it
        self.empty: set[str] = set()
        self.files: dict[str, bytes] = {}
        self.faults: list[str] = []
        self.always: str | None = None
        self.delay = 1.0
        self.bomb_size = 20_000_000
        self.sent = 0  # bytes of the body sent by "trickle" and "endless"
        self.requests = 0
        self.errors: list[Exception] = []
        self.queries: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.url = ""

    def next_fault(self) -> str | None:
        with self.lock:
            self.requests += 1
            return self.faults.pop(0) if self.faults else self.always

    def csv_body(self, q: dict[str, str], fault: str | None) -> bytes:
        ra, dec, sr = float(q["RA"]), float(q["DEC"]), float(q["SR"])
        field = stars() if self.field is None else self.field
        rows = field[in_cone(ra, dec, sr, field)]
        epoch = float(q["EPOCH"]) if "EPOCH" in q else FIELD[3]
        x, y = truth(rows, epoch if "EPOCH" in q else None)
        head = "ra,dec" if fault != "nocolumns" else "alpha,delta"
        lines = [f"#Catalog {q['CAT']} (test service)", f"#RA={ra} DEC={dec} SR={sr}",
                 f"objID,{head},mag,epoch,pmra,pmdec,parallax"]
        for r, a, d in zip(rows, x, y, strict=True):
            pm = "" if not np.isfinite(r["pmra"]) else f"{r['pmra']:.6f},{r['pmdec']:.6f}"
            pm = pm or ","
            plx = "" if not np.isfinite(r["parallax"]) else f"{r['parallax']:.6f}"
            lines.append(f"{r['objID']},{a:.11f},{d:.11f},{r['mag']:.3f},{epoch},{pm},{plx}")
        body = "\n".join(lines) + "\n"
        if fault == "truncate":  # cut inside the ra value of a row two thirds down
            cut = body.index("\n", len(body) * 2 // 3) + 1
            body = body[: body.index(",", cut) + 5]
        return body.encode()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        try:
            self._answer()
        except OSError:  # the client gave up (timeout) or the fault closed the socket
            self.close_connection = True
        except Exception as err:  # a bug of this test server: reported by the fixture
            self.server.service.errors.append(err)
            raise

    def _send(self, status: int, body: bytes, ctype: str = "text/plain", length=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self):
        svc = self.server.service
        fault = svc.next_fault()
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        with svc.lock:
            svc.queries.append({"path": url.path, **q})
        if fault in ("close", "reset"):
            if fault == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if fault == "slow":
            svc.stop.wait(svc.delay)
        if fault == "503":
            return self._send(503, b"Service Unavailable")
        if fault in ("trickle", "gzipbomb", "endless"):
            return getattr(self, f"_{fault}")(svc)
        if fault == "html":
            page = b"<!DOCTYPE html><html><head><title>Runtime Error</title></head></html>"
            return self._send(200, page, "text/html")
        if url.path.startswith("/files/"):
            name = url.path.removeprefix("/files/")
            if name not in svc.files:
                return self._send(404, b"Not Found")
            return self._send(200, svc.files[name], "application/octet-stream")
        if url.path != "/vo/CatalogSearch.aspx":
            return self._send(404, b"Not Found")
        cat = q.get("CAT", "").upper()
        if cat not in svc.catalogs:
            return self._send(200, f"Error: catalog {cat} is not available".encode())
        if fault == "empty" or cat in svc.empty:
            return self._send(200, b"No data records found for this query.\n")
        body = svc.csv_body(q, fault)
        if fault == "short":
            self._send(200, body[: len(body) // 2], length=len(body))
            self.close_connection = True
            return
        self._send(200, body, "text/csv")


    def _trickle(self, svc):
        body = svc.csv_body({"RA": "150.1", "DEC": "2.2", "SR": "0.1", "CAT": "GAIADR3"}, None)
        self.send_response(200)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        for i in range(len(body)):
            if svc.stop.wait(svc.delay if i else 0.0):
                return
            self.wfile.write(body[i : i + 1])
            self.wfile.flush()
            with svc.lock:
                svc.sent += 1

    def _gzipbomb(self, svc):
        body = gzip_bomb(svc.bomb_size)
        self.send_response(200)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _endless(self, svc):
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        rows = [b"objID,ra,dec,mag,epoch,pmra,pmdec,parallax\n"]
        rows += [f"{i},150.1,2.2,18.0,2016.0,,,\n".encode() for i in range(2000)]
        block = b"".join(rows)
        self.close_connection = True
        while not svc.stop.is_set():
            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            with svc.lock:
                svc.sent += len(block)
            block = b"".join(rows[1:])


@lru_cache(maxsize=2)
def gzip_bomb(size: int) -> bytes:
    """``size`` zero bytes, gzip-compressed (about a thousandth of the size)."""
    return gzip.compress(b"0" * size, compresslevel=9)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    service: GaiaService

    def handle_error(self, request, client_address):  # faults are on purpose: stay quiet
        pass


@pytest.fixture
def gaia_service():
    """A running fake catalog service; yields its :class:`GaiaService` (``.url`` is the base)."""
    with running_service() as svc:
        yield svc


@contextmanager
def running_service():
    """Run a fake catalog service for the ``with`` block; yields its :class:`GaiaService`."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.service = svc = GaiaService()
    svc.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield svc
    finally:
        svc.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert not svc.errors, f"the test service failed: {svc.errors!r}"
