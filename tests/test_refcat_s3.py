"""GAIADR3_S3 read from S3 as romancal reads it, against a local S3 server (moto), and HATS URLs.

The server holds the synthetic Gaia field as a HATS catalog where romancal reads Gaia DR3
(``s3://stpubdata/gaia/gaia_dr3/public/hats/gaia/``); ``AWS_ENDPOINT_URL`` points at it.
Faults: no bucket, a cut partition, a silent server, a closed port.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from conftest import models_of, truths_of
from gaia_server import FIELD, stars
from roman_tweakreg import TweakRegStep
from roman_tweakreg.errors import InvalidParameterError, ReferenceCatalogError
from roman_tweakreg.refcat import ROMANCAL_CATALOGS, check_refcat, get_reference_catalog
from s3_server import BUCKET, PREFIX, gaia_hats, running_s3, silent_port
from test_step import errors_mas, metas
from test_step_refcat import field_exposures

RA, DEC, _, _ = FIELD
URL = "s3://stpubdata/gaia/gaia_dr3/public/hats/gaia"
EPOCH = 2028.0


def objids(cat):
    return np.sort(np.asarray(cat.table["objID"]))


@pytest.fixture(scope="module")
def local_hats(tmp_path_factory):
    return gaia_hats(tmp_path_factory.mktemp("local") / "gaia")


def test_romancal_location():
    assert ROMANCAL_CATALOGS == {"GAIADR3_S3": URL + "/"}


def test_gaiadr3_s3_gives_the_same_stars_as_the_local_hats_folder(s3_server, local_hats):
    s3 = get_reference_catalog("GAIADR3_S3", RA, DEC, 0.1, EPOCH, use_cache=False)
    local = get_reference_catalog(str(local_hats), RA, DEC, 0.1, EPOCH, use_cache=False)
    assert (s3.name, s3.source, s3.epoch) == ("GAIADR3_S3", URL, 2016.0)
    assert len(s3) == len(local) > 500
    assert np.array_equal(objids(s3), objids(local))
    # only the reference columns are read, under the package's names, with Gaia's errors
    # (and correlations) that the file has, for the fit's weights
    from roman_tweakreg.refcat._motion import ERROR_COLUMNS

    assert s3.table.colnames[:8] == ["RA", "DEC", "pmra", "pmdec", "parallax", "ref_epoch",
                                     "mag", "objID"]  # fmt: skip
    assert set(s3.table.colnames[8:]) <= set(ERROR_COLUMNS)
    assert {"ra_error", "dec_error", "pmra_error", "pmdec_error"} <= set(s3.table.colnames)
    assert s3.table.colnames == local.table.colnames
    ra_s3, dec_s3 = s3.positions(EPOCH)
    ra_local, dec_local = local.positions(EPOCH)
    order_s3, order_local = np.argsort(s3.table["objID"]), np.argsort(local.table["objID"])
    assert np.array_equal(ra_s3[order_s3], ra_local[order_local])
    assert np.array_equal(dec_s3[order_s3], dec_local[order_local])
    # carried to 2028 with the proper motions: moved by tens of mas for the fast stars
    moved = np.hypot((ra_s3 - s3.table["RA"]) * np.cos(np.deg2rad(DEC)),
                     dec_s3 - s3.table["DEC"]) * 3.6e6
    assert np.nanmax(moved) > 20.0


def test_column_names_in_any_case(s3_server, tmp_path):
    table = stars()[:200].copy()
    table.rename_columns(["ra", "dec", "pmra", "objID", "epoch"],
                         ["RA", "Dec", "PMRA", "SOURCE_ID", "Ref_Epoch"])
    from s3_server import write_hats

    write_hats(tmp_path / "upper", table, order=3, dataset=True, index=True)
    s3_server.upload(tmp_path / "upper", prefix="upper")
    cat = get_reference_catalog(f"s3://{BUCKET}/upper", RA, DEC, 1.0, use_cache=False)
    assert len(cat) == 200
    assert {"RA", "DEC", "pmra", "pmdec", "ref_epoch", "objID"} <= set(cat.table.colnames)
    assert np.array_equal(np.sort(cat.table["objID"]), np.sort(table["SOURCE_ID"]))


def test_cache_serves_a_second_query_without_the_catalog(s3_server, tmp_path, caplog,
                                                          monkeypatch):
    first = get_reference_catalog("GAIADR3_S3", RA, DEC, 0.1, EPOCH, cache_dir=tmp_path)
    entries = list((tmp_path / "cones").glob("*/*.cone"))
    assert len(entries) == 1
    assert entries[0].parent.name.startswith("GAIADR3_S3-")
    for key in s3_server.client.list_objects_v2(Bucket=BUCKET)["Contents"]:
        s3_server.client.delete_object(Bucket=BUCKET, Key=key["Key"])
    caplog.set_level(logging.INFO, logger="roman_tweakreg")
    again = get_reference_catalog("GAIADR3_S3", RA, DEC, 0.05, EPOCH, cache_dir=tmp_path)
    assert "served from the cache" in caplog.text
    inner = np.isin(first.table["objID"], again.table["objID"])
    assert 0 < len(again) == inner.sum() < len(first)
    # the cache is keyed by the endpoint too: another endpoint does not see the entry
    with running_s3() as other:
        other.create_bucket()
        monkeypatch.setenv("AWS_ENDPOINT_URL", other.url)
        with pytest.raises(ReferenceCatalogError, match=r"not a HATS catalog"):
            get_reference_catalog("GAIADR3_S3", RA, DEC, 0.05, EPOCH, cache_dir=tmp_path)


def test_endpoint_variable_for_s3_wins(s3_server, monkeypatch, local_hats):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.url)
    cat = get_reference_catalog("gaiadr3_s3", RA, DEC, 0.05, use_cache=False)
    local = get_reference_catalog(str(local_hats), RA, DEC, 0.05, use_cache=False)
    assert np.array_equal(objids(cat), objids(local))


def test_missing_bucket_is_named(monkeypatch):
    with running_s3() as s3:  # no bucket at all
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
        with pytest.raises(
            ReferenceCatalogError,
            match=rf"^abs_refcat: HATS catalog {URL} \(endpoint {s3.url}\): the bucket does not "
            r"exist: .*NO_SUCH_BUCKET",
        ):
            get_reference_catalog("GAIADR3_S3", RA, DEC, 0.1, use_cache=False)


def test_cut_partition_is_named(s3_server, local_hats):
    part = sorted((local_hats / "dataset").rglob("Npix=*.parquet"))
    from roman_tweakreg.refcat._local import covering_partitions

    keys = [(7, int(p.stem.removeprefix("Npix="))) for p in part]
    assert len(keys) > 2
    order, pixel = covering_partitions(keys, RA, DEC, 0.02)[0]
    rel = f"dataset/Norder={order}/Dir={pixel // 10000 * 10000}/Npix={pixel}.parquet"
    key = f"{PREFIX}/{rel}"
    body = local_hats / rel
    s3_server.put(key, body.read_bytes()[: body.stat().st_size // 2])
    with pytest.raises(
        ReferenceCatalogError,
        match=rf"^abs_refcat: cannot read HATS catalog {URL}: partition s3://{BUCKET}/{key}: ",
    ):
        get_reference_catalog("GAIADR3_S3", RA, DEC, 0.02, use_cache=False)


def test_silent_server_times_out_within_timeout_times_tries(monkeypatch):
    with silent_port() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        start = time.perf_counter()
        with pytest.raises(
            ReferenceCatalogError,
            match=rf"^abs_refcat: HATS catalog {URL} \(endpoint {url}\): no answer within the "
            r"1 s timeout, 2 tries: ",
        ):
            get_reference_catalog("GAIADR3_S3", RA, DEC, 0.1, timeout=1.0, retries=1,
                                  use_cache=False)
        elapsed = time.perf_counter() - start
    # 2 tries of the 1 s timeout (curl checks the transfer rate once a second: up to
    # ~0.5 s more per try) and AWS's backoff between them
    assert 2.0 <= elapsed < 2 * (1.0 + 1.0) + 1.0, f"{elapsed:.1f} s"


def test_no_network_is_named():
    # conftest points AWS_ENDPOINT_URL at the closed port 127.0.0.1:9
    start = time.perf_counter()
    with pytest.raises(
        ReferenceCatalogError,
        match=rf"^abs_refcat: HATS catalog {URL} \(endpoint http://127.0.0.1:9\): cannot "
        r"connect \(no network or no server\), 3 tries: ",
    ):
        get_reference_catalog("GAIADR3_S3", RA, DEC, 0.1, timeout=1.0, retries=2,
                              use_cache=False)
    assert time.perf_counter() - start < 3.0


def test_list_falls_back_in_order(gaia_service, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("ASTROMETRIC_CATALOG_URL", gaia_service.url)
    cat = get_reference_catalog("GAIADR3_S3,GAIADR3", RA, DEC, 0.05, EPOCH, retries=0,
                                use_cache=False)
    assert cat.name == "GAIADR3"
    assert gaia_service.requests == 1
    assert "Reference catalog GAIADR3_S3 not used: abs_refcat: HATS catalog" in caplog.text
    path = tmp_path / "field.ecsv"
    stars().write(path)
    cat = get_reference_catalog(f"GAIADR3_S3,{path}", RA, DEC, 0.05, EPOCH, retries=0,
                                use_cache=False)
    assert cat.name == "field.ecsv"


def test_check_refcat_accepts_s3_names_and_urls():
    for value in ("GAIADR3_S3", "gaiadr3_s3,GAIADR3", "s3://bucket/hats/cat",
                  "https://example.org/hats/gaia/"):
        check_refcat(value)
    with pytest.raises(InvalidParameterError, match=r"a romancal S3 name \(GAIADR3_S3: Gaia"):
        check_refcat("GAIADR4_S3")


# -- the step ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def field():
    """Two exposures of the field (made once); each test aligns copies of its models."""
    exposures = field_exposures()
    return exposures, truths_of(exposures)


def copies(field):
    return [m.copy() for m in models_of(field[0])]


def fit_numbers(library):
    out = []
    for status, fit, name, _ in metas(library):
        absolute = fit["absolute"]
        out.append((status, name, absolute["status"], absolute.get("nmatches"),
                    tuple(np.round(np.asarray(absolute.get("shift", [np.nan] * 2)) * 1e3, 3))))
    return out


def test_step_gaiadr3_s3_aligns_as_the_local_hats_folder(s3_server, local_hats, field):
    result = TweakRegStep.call(copies(field), abs_refcat="GAIADR3_S3", abs_refcat_cache="off")
    s3 = fit_numbers(result)
    assert errors_mas(result, field[1]).max() < 1.0
    local = fit_numbers(TweakRegStep.call(copies(field), abs_refcat=str(local_hats)))
    assert [o[:3] for o in s3] == [("COMPLETE", "FIT-LVL2-GAIADR3_S3", "SUCCESS")] * 4
    assert [o[:3] for o in local] == [("COMPLETE", "FIT-LVL2-gaia", "SUCCESS")] * 4
    # the same matches and the same shift (mas, to 1 micro-arcsecond)
    assert [o[3:] for o in s3] == [o[3:] for o in local]
    assert min(o[3] for o in s3) > 20
    assert max(abs(v) for o in s3 for v in o[4]) > 100.0  # the pointing errors were corrected


@pytest.mark.parametrize("fault", ["no bucket", "no network"])
def test_step_s3_fault_keeps_relative_alignment(fault, monkeypatch, caplog, field):
    with running_s3() as s3:
        if fault == "no bucket":
            monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
            why = "the bucket does not exist"
        else:
            why = "cannot connect"  # conftest's closed port
        result = TweakRegStep.call(copies(field), abs_refcat="GAIADR3_S3",
                                   abs_refcat_cache="off", abs_refcat_retries=0)
    outcome = metas(result)
    # aligned to each other only: INCOMPLETE (the absolute fit asked for could not be made)
    assert [o[0] for o in outcome] == ["INCOMPLETE"] * 4
    assert [o[1]["relative"]["status"] for o in outcome] == ["REFERENCE"] * 2 + ["SUCCESS"] * 2
    assert {o[1]["absolute"]["status"] for o in outcome} == {"SKIPPED"}
    reason = outcome[0][1]["absolute"]["reason"]
    assert f"HATS catalog {URL}" in reason
    assert why in reason
    assert "Absolute alignment skipped, relative alignment kept" in caplog.text


def test_step_s3_then_local_file(tmp_path, field):
    path = tmp_path / "field.ecsv"
    stars().write(path)
    result = TweakRegStep.call(copies(field), abs_refcat=f"GAIADR3_S3,{path}",
                               abs_refcat_cache="off", abs_refcat_retries=0)
    assert {o[2] for o in metas(result)} == {"FIT-LVL2-field.ecsv"}
    assert errors_mas(result, field[1]).max() < 1.0


# -- HATS over HTTP(S) ---------------------------------------------------------------------------
class _Quiet(SimpleHTTPRequestHandler):
    requests: list = []  # (method, path) of every request, for the tests

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append(("GET", self.path))
        super().do_GET()


@pytest.fixture
def http_folder(tmp_path):
    """A local HTTP server of ``tmp_path``; yields its base URL."""
    _Quiet.requests.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(_Quiet, directory=str(tmp_path)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_hats_url_over_http_is_read_as_the_local_folder(http_folder, local_hats, tmp_path):
    folder, base = http_folder
    gaia_hats(folder / "hats" / "gaia")
    cat = get_reference_catalog(f"{base}/hats/gaia/", RA, DEC, 0.1, EPOCH, cache_dir=tmp_path)
    local = get_reference_catalog(str(local_hats), RA, DEC, 0.1, EPOCH, use_cache=False)
    assert (cat.name, cat.source) == ("gaia", f"{base}/hats/gaia")
    assert len(cat) > 500
    assert np.array_equal(objids(cat), objids(local))
    assert len(list((tmp_path / "cones").glob("gaia-*/*.cone"))) == 1
    # each partition over the cone is fetched once (its schema, then its columns)
    parts = [p for m, p in _Quiet.requests if m == "GET" and p.endswith(".parquet")]
    assert len(parts) == len(set(parts)) >= 2


def test_hats_url_without_index_says_what_is_needed(http_folder):
    folder, base = http_folder
    from s3_server import write_hats

    write_hats(folder / "noindex", stars(), order=4)  # no partition_info.csv
    with pytest.raises(ReferenceCatalogError,
                       match=rf"^abs_refcat: {base}/noindex is a folder but not a HATS catalog"):
        get_reference_catalog(f"{base}/noindex", RA, DEC, 0.1, use_cache=False)


@pytest.mark.parametrize(("url", "hats"), [
    ("s3://stpubdata/gaia/gaia_dr3/public/hats/gaia/", True),
    ("https://example.org/hats/gaia/", True),
    ("https://example.org/hats/gaia", True),
    ("https://example.org/data/field.ecsv", False),
    ("https://example.org/data/field.txt", False),
    ("https://example.org/vo/CatalogSearch.aspx?CAT=GAIADR3", False),
    ("https://example.org/hats/gaia?format=x", False),
])
def test_which_urls_are_hats_folders(url, hats):
    from roman_tweakreg.refcat._remote import is_hats_url

    assert is_hats_url(url) is hats


def test_batch_region_fetched_once_from_s3(s3_server, tmp_path):
    """The batch planner's region file from GAIADR3_S3: 2016 positions with their motions;
    a region with no stars is an empty catalog, not an error."""
    from roman_tweakreg.refcat._plan import Region, fetch_region, is_service_name

    assert is_service_name("GAIADR3_S3")  # planned per region like the service's names
    path = fetch_region(Region("r0000", RA, DEC, 0.05, [0]), "GAIADR3_S3",
                        tmp_path / "r0000.parquet", margin=0.01, use_cache=False)
    region = get_reference_catalog(path, RA, DEC, 0.06, use_cache=False)
    direct = get_reference_catalog("GAIADR3_S3", RA, DEC, 0.06, use_cache=False)
    assert len(region) == len(direct) > 100
    assert np.array_equal(objids(region), objids(direct))
    assert np.allclose(region.positions(EPOCH), direct.positions(EPOCH), rtol=0, atol=1e-12)
    empty = fetch_region(Region("r0001", 10.0, -50.0, 0.05, [1]), "GAIADR3_S3",
                         tmp_path / "r0001.parquet", use_cache=False)
    assert len(get_reference_catalog(empty, 10.0, -50.0, 0.1, min_sources=0,
                                     use_cache=False)) == 0


def test_hats_url_faults_are_named(http_folder):
    folder, base = http_folder
    root = gaia_hats(folder / "cut")
    part = sorted((root / "dataset").rglob("Npix=*.parquet"))
    for p in part:  # every partition cut in half
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ReferenceCatalogError,
                       match=rf"^abs_refcat: cannot read HATS catalog {base}/cut: partition "
                       rf"{base}/cut/dataset/Norder=7/Dir=\d+/Npix=\d+\.parquet: "
                       r"Parquet magic bytes"):
        get_reference_catalog(f"{base}/cut/", RA, DEC, 0.02, use_cache=False)
    with pytest.raises(ReferenceCatalogError,
                       match=r"^abs_refcat: HATS catalog http://127.0.0.1:9/hats: cannot connect "
                       r"\(no network or no server\), 2 tries: "):
        get_reference_catalog("http://127.0.0.1:9/hats", RA, DEC, 0.02, retries=1,
                              backoff=0.01, use_cache=False)


def test_step_vo_timeout_bounds_a_silent_s3(monkeypatch, field, caplog):
    """romancal's vo_timeout is the S3 timeout too: a silent endpoint costs one try of it."""
    import re

    caplog.set_level(logging.INFO, logger="roman_tweakreg")
    with silent_port() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        start = time.perf_counter()
        result = TweakRegStep.call(copies(field), abs_refcat="GAIADR3_S3", abs_refcat_cache="off",
                                   abs_refcat_retries=0, abs_refcat_timeout=60.0, vo_timeout=1.0)
        elapsed = time.perf_counter() - start
    absolute = [o[1]["absolute"] for o in metas(result)]
    assert {a["status"] for a in absolute} == {"SKIPPED"}
    assert "no answer within the 1 s timeout, 1 try: " in absolute[0]["reason"]
    # the absolute phase: one try of 1 s (up to ~0.5 s more: curl checks once a second)
    phase = float(re.search(r"Phase absolute done in ([0-9.]+) s", caplog.text).group(1))
    assert 1.0 <= phase < 1.0 + 1.0 + 0.5, f"{phase:.1f} s"
    assert elapsed < 20.0, f"{elapsed:.1f} s"  # not the 60 s of abs_refcat_timeout
