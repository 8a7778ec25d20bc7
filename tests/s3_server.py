"""A local S3-compatible server (moto's server mode) holding a synthetic Gaia DR3 HATS catalog.

``GAIADR3_S3`` is read from ``s3://stpubdata/gaia/gaia_dr3/public/hats/gaia/``; the tests
point ``AWS_ENDPOINT_URL`` at a moto server on 127.0.0.1 that holds the field of
:func:`gaia_server.stars` there, written as HATS with Gaia DR3's column names, and at
closed or silent local ports for the faults.  Nothing reaches the network.
"""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy import units as u
from astropy_healpix import HEALPix

from gaia_server import stars

__all__ = [
    "BUCKET",
    "PREFIX",
    "S3Server",
    "gaia_hats",
    "gaia_table",
    "running_s3",
    "s3_server",
    "silent_port",
    "write_hats",
]

BUCKET = "stpubdata"
PREFIX = "gaia/gaia_dr3/public/hats/gaia"


def write_hats(root, table, order, dataset=False, index=False):
    """Write ``table`` as a HATS catalog at one HEALPix order; return the pixel of each row.

    Partitions go to ``root/Norder=K/Dir=D/Npix=N.parquet`` (under ``root/dataset`` with
    ``dataset``); with ``index`` a ``partition_info.csv`` lists them, as HATS writes it.
    """
    root = Path(root)
    base = root / "dataset" if dataset else root
    lower = {c.lower(): c for c in table.colnames}
    pix = HEALPix(nside=2**order, order="nested").lonlat_to_healpix(
        np.asarray(table[lower["ra"]]) * u.deg, np.asarray(table[lower["dec"]]) * u.deg)
    for p in np.unique(pix):
        folder = base / f"Norder={order}" / f"Dir={p // 10000 * 10000}"
        folder.mkdir(parents=True, exist_ok=True)
        part = table[pix == p]
        pq.write_table(pa.table({c: np.asarray(part[c]) for c in part.colnames}),
                       folder / f"Npix={p}.parquet")
    (root / "properties").write_text("dataset_type=object\n")
    if index:
        rows = "".join(f"{order},{p}\n" for p in np.unique(pix))
        (root / "partition_info.csv").write_text("Norder,Npix\n" + rows)
    return pix


def gaia_table():
    """:func:`gaia_server.stars` with Gaia DR3 archive column names and error columns."""
    t = stars().copy()
    t.rename_columns(["mag", "objID", "epoch"], ["phot_g_mean_mag", "source_id", "ref_epoch"])
    rng = np.random.default_rng(11)
    for name in ("ra_error", "dec_error", "pmra_error", "pmdec_error", "parallax_error"):
        t[name] = rng.uniform(0.01, 0.3, len(t))
    t["ra_dec_corr"] = rng.uniform(-0.2, 0.2, len(t))
    return t


def gaia_hats(root):
    """Write :func:`gaia_table` as a HATS catalog at order 7 (pixels of 0.46 deg: the field
    spans several) as Gaia DR3's is laid out (``partition_info.csv``, partitions under
    ``dataset/``); return ``root``."""
    write_hats(root, gaia_table(), order=7, dataset=True, index=True)
    return Path(root)


class S3Server:
    """A running moto S3 server: ``url`` is its endpoint; upload folders into buckets."""

    def __init__(self, url: str):
        import boto3

        self.url = url
        self.client = boto3.client(
            "s3", endpoint_url=url, region_name="us-east-1",
            aws_access_key_id="test", aws_secret_access_key="test")

    def create_bucket(self, bucket: str = BUCKET) -> None:
        self.client.create_bucket(Bucket=bucket, ACL="public-read")

    def upload(self, folder, bucket: str = BUCKET, prefix: str = PREFIX) -> int:
        """Upload every file under ``folder`` (public-read); return how many."""
        files = [p for p in sorted(Path(folder).rglob("*")) if p.is_file()]
        for path in files:
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            self.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(),
                                   ACL="public-read")
        return len(files)

    def put(self, key: str, body: bytes, bucket: str = BUCKET) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=body, ACL="public-read")


@contextmanager
def running_s3():
    """Run a moto S3 server on 127.0.0.1 (a free port), empty, for the ``with`` block."""
    import requests
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        requests.post(f"{url}/moto-api/reset", timeout=10)  # moto's state is per process
        yield S3Server(url)
    finally:
        server.stop()


@pytest.fixture
def s3_server(monkeypatch, tmp_path_factory):
    """A moto S3 server holding the synthetic Gaia DR3 HATS catalog where romancal reads it,
    with ``AWS_ENDPOINT_URL`` pointing at it."""
    with running_s3() as s3:
        s3.create_bucket()
        s3.upload(gaia_hats(tmp_path_factory.mktemp("gaia_hats")))
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
        yield s3


@contextmanager
def silent_port():
    """A local port that accepts connections and never answers; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.05)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in held:
            conn.close()

