"""Reference catalogs: service client, retries, cache, local files, HATS, epochs, lists."""

from __future__ import annotations

import logging
import socket
import warnings
from pathlib import Path

import erfa
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from astropy import units as u
from astropy.coordinates import SkyCoord, angular_separation
from astropy.table import QTable, Table
from astropy.time import Time
from astropy_healpix import HEALPix

from gaia_server import FIELD, gaia_service, gzip_bomb, in_cone, stars, truth  # noqa: F401
from roman_tweakreg.errors import ReferenceCatalogError
from roman_tweakreg.refcat import (
    ConeCache,
    NoDataError,
    ReferenceCatalog,
    default_cache_dir,
    get_reference_catalog,
)
from roman_tweakreg.refcat._motion import carry
from roman_tweakreg.testing import simulate

RA, DEC = FIELD[0], FIELD[1]
FAST = {"backoff": 0.01, "timeout": 2.0}


def sep_mas(ra1, dec1, ra2, dec2):
    return np.rad2deg(angular_separation(*(np.deg2rad(x) for x in (ra1, dec1, ra2, dec2)))) * 3.6e6


def by_id(refcat):
    order = np.argsort(refcat.table["objID"])
    return refcat.table[order]


@pytest.fixture
def service(gaia_service, tmp_path, monkeypatch):  # noqa: F811
    """The fake service as the default service, with a fresh cache folder."""
    monkeypatch.setenv("ASTROMETRIC_CATALOG_URL", gaia_service.url)
    monkeypatch.setenv("ROMAN_TWEAKREG_CACHE", str(tmp_path / "cache"))
    return gaia_service


def query(refcat="GAIADR3", ra=RA, dec=DEC, radius=0.1, epoch=2026.3, **kwargs):
    return get_reference_catalog(refcat, ra, dec, radius, epoch=epoch, **{**FAST, **kwargs})


# -- the service ---------------------------------------------------------------------------------
def test_clean_query_positions_at_any_epoch(service):
    cat = query(epoch=2026.30042)
    rows = stars()[in_cone(RA, DEC, 0.1)]
    assert (cat.name, len(cat), service.requests) == ("GAIADR3", len(rows), 1)
    assert len(cat) > 500
    q = service.queries[0]
    assert (q["path"], q["CAT"], q["FORMAT"], q["EPOCH"], float(q["SR"])) == (
        "/vo/CatalogSearch.aspx", "GAIADR3", "CSV", "2026.300", 0.1)
    assert cat.epoch == 2026.3
    table = by_id(cat)
    assert np.array_equal(table["objID"], np.sort(rows["objID"]))
    rows = rows[np.argsort(rows["objID"])]
    for epoch in (2026.30042, 2031.0, 2016.0):  # the answered epoch, later, the catalog's own
        ra, dec = ReferenceCatalog(table, cat.name, cat.epoch).positions(epoch)
        assert sep_mas(ra, dec, *truth(rows, epoch)).max() < 0.1
    still = ~np.isfinite(table["pmra"])
    assert 0 < still.sum() < 0.15 * len(table)
    assert np.array_equal(ReferenceCatalog(table, "x", 2026.3).positions(2040.0)[0][still],
                          table["RA"][still])


def test_defaults_case_and_no_epoch(service):
    for refcat in (None, "", "  gaiadr3 "):
        cat = query(refcat, epoch=None, use_cache=False)
        assert cat.name == "GAIADR3"
    assert [q["CAT"] for q in service.queries] == ["GAIADR3"] * 3
    assert "EPOCH" not in service.queries[0]
    assert cat.epoch == 2016.0
    ra, dec = by_id(cat)["RA"], by_id(cat)["DEC"]
    rows = stars()[in_cone(RA, DEC, 0.1)]
    rows = rows[np.argsort(rows["objID"])]
    assert sep_mas(ra, dec, rows["ra"], rows["dec"]).max() < 0.01
    moved = ReferenceCatalog(by_id(cat), "x", cat.epoch).positions(2020.0)
    assert sep_mas(*moved, *truth(rows, 2020.0)).max() < 0.1


def test_base_url_option_beats_env(service, monkeypatch):
    monkeypatch.setenv("ASTROMETRIC_CATALOG_URL", "http://127.0.0.1:9/nothing")
    cat = query(base_url=service.url + "/")
    assert (len(cat) > 0, service.requests) == (True, 1)


@pytest.mark.parametrize(
    ("faults", "requests_made"),
    [(["503", "503"], 3), (["close"], 2), (["reset"], 2), (["short"], 2), (["slow"], 2)],
)
def test_retries_that_succeed(service, faults, requests_made):
    service.faults = list(faults)
    cat = query(timeout=0.3, retries=3, use_cache=False)
    assert (len(cat), service.requests) == (in_cone(RA, DEC, 0.1).sum(), requests_made)


@pytest.mark.parametrize(
    ("fault", "match"),
    [("503", r"HTTP 503 Service Unavailable after 2 retries"),
     ("close", r"the connection was closed or reset by the server .*after up to 2 retries"),
     ("reset", r"the connection was closed or reset by the server"),
     ("slow", r"no answer within the 0.2 s timeout"),
     ("short", r"the answer was cut short in transfer")],
)
def test_retries_exhausted(service, fault, match):
    service.always = fault
    with pytest.raises(ReferenceCatalogError, match=rf"catalog service http://127\.0\.0\.1:\d+/vo/"
                       rf"CatalogSearch\.aspx \(CAT=GAIADR3\): {match}"):
        # only the "slow" fault needs the short timeout; the others answer (or fail) at once,
        # and a loaded machine must not turn them into timeouts
        query(timeout=0.2 if fault == "slow" else 5.0, retries=2)
    assert service.requests == 3


def test_network_faults_are_reference_catalog_errors(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ReferenceCatalogError, match=r"127\.0\.0\.1:\d+.*connection refused"):
        query(base_url=f"http://127.0.0.1:{port}", retries=1, use_cache=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ReferenceCatalogError, match=r"catalogs\.invalid.*DNS failure"):
        query(base_url="http://catalogs.invalid", retries=1, use_cache=False)
    monkeypatch.undo()

    def boom(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(requests.Session, "get", boom)
    with pytest.raises(ReferenceCatalogError, match=r"unexpected fault: ValueError\('boom'\)"):
        query(base_url="http://127.0.0.1:9", use_cache=False)


@pytest.mark.parametrize(
    ("fault", "error", "match"),
    [("html", ReferenceCatalogError, r"answered an HTML page, not CSV: 'Runtime Error'"),
     ("truncate", ReferenceCatalogError, r"truncated or malformed CSV: data row \d+ of \d+ has "
                                         r"2 fields, the header has 8"),
     ("empty", NoDataError, r"\(CAT=GAIADR3\): No data records"),
     ("nocolumns", ReferenceCatalogError, r"lacks column\(s\) ra, dec; .*got 'objID,alpha")],
)
def test_bad_answers_are_named_and_not_cached(service, fault, error, match):
    service.faults = [fault]
    with pytest.raises(error, match=match):
        query()
    assert service.requests == 1  # an answer that came is not retried
    assert len(query()) == in_cone(RA, DEC, 0.1).sum()
    assert service.requests == 2  # the bad answer was not cached


def test_unknown_catalog_name_is_asked_and_refused(service):
    with pytest.raises(ReferenceCatalogError, match=r"CAT=GAIADR9.*'Error: catalog GAIADR9 is not"):
        query("GAIADR9")
    service.catalogs.add("GAIADR9")  # any name the service accepts is fine
    assert query("GAIADR9").name == "GAIADR9"


@pytest.mark.parametrize(
    ("refcat", "match"),
    [("GAIA DR3", r"'GAIA DR3' is neither an existing file"),
     ("missing.ecsv", r"local reference catalog missing\.ecsv does not exist"),
     ("./data/field", r"data/field does not exist")],
)
def test_bad_entries(service, refcat, match):
    with pytest.raises(ReferenceCatalogError, match=match):
        query(refcat)
    assert service.requests == 0


def test_bad_cone():
    with pytest.raises(ReferenceCatalogError, match=r"bad cone .*radius=0\.0 deg"):
        get_reference_catalog("GAIADR3", RA, DEC, 0.0)


# -- the cache -----------------------------------------------------------------------------------
def cone_files(root):
    return sorted(root.rglob("*.cone"))


def test_cache_second_query_makes_no_request(service, tmp_path):
    first = query()
    second = query()
    assert service.requests == 1
    assert np.array_equal(first.table["RA"], second.table["RA"])
    assert len(cone_files(tmp_path / "cache")) == 1
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    query(epoch=2027.0)  # another epoch, another catalog: other entries
    query("GAIADR2")
    assert (service.requests, len(cone_files(tmp_path / "cache"))) == (3, 3)
    query(use_cache=False)
    assert service.requests == 4


def test_cache_location_rules(service, tmp_path, monkeypatch):
    monkeypatch.delenv("ROMAN_TWEAKREG_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "roman_tweakreg"
    query()
    assert len(cone_files(tmp_path / "xdg" / "roman_tweakreg")) == 1
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "roman_tweakreg"
    monkeypatch.setenv("ROMAN_TWEAKREG_CACHE", "off")
    assert default_cache_dir() is None
    query()
    query()
    assert service.requests == 3
    query(cache_dir=tmp_path / "explicit")
    query(cache_dir=tmp_path / "explicit")
    assert (service.requests, len(cone_files(tmp_path / "explicit"))) == (4, 1)
    monkeypatch.delenv("ROMAN_TWEAKREG_CACHE")
    monkeypatch.chdir(tmp_path)
    query(cache_dir="OFF")
    assert service.requests == 5
    assert not (tmp_path / "OFF").exists()
    assert not (tmp_path / "home").exists()


def test_smaller_cone_served_from_larger_entry(service):
    query(radius=0.2)
    inner = query(ra=RA + 0.05, radius=0.08)
    assert service.requests == 1
    direct = query(ra=RA + 0.05, radius=0.08, use_cache=False)
    assert service.requests == 2
    assert len(inner) == len(direct) == in_cone(RA + 0.05, DEC, 0.08).sum() > 100
    assert np.array_equal(by_id(inner)["objID"], by_id(direct)["objID"])
    assert sep_mas(by_id(inner)["RA"], by_id(inner)["DEC"],
                   by_id(direct)["RA"], by_id(direct)["DEC"]).max() < 1e-6
    query(ra=RA + 0.15, radius=0.1)  # sticks out of the cached cone: asked
    assert service.requests == 3


@pytest.mark.parametrize("damage", ["body", "header", "unparsable"])
def test_corrupt_cache_entry_is_fetched_again(service, tmp_path, damage, caplog):
    good = query()
    (entry,) = cone_files(tmp_path / "cache")
    data = entry.read_bytes()
    if damage == "body":  # a flipped digit: the checksum fails
        i = data.index(b"\n", len(data) // 2) - 2
        entry.write_bytes(data[:i] + bytes([(data[i] - 48 + 1) % 10 + 48]) + data[i + 1:])
    elif damage == "header":
        entry.write_bytes(b"not json\n" + data.partition(b"\n")[2])
    else:  # a consistent entry with a body that is not a catalog
        entry.unlink()
        ConeCache(tmp_path / "cache").put(service.url, "GAIADR3", RA, DEC, 0.1, 2026.3,
                                          b"<html>oops</html>")
    with caplog.at_level(logging.WARNING, logger="roman_tweakreg.refcat"):
        again = query()
    assert service.requests == 2
    assert np.array_equal(good.table["RA"], again.table["RA"])
    assert any(w in caplog.text for w in ("checksum", "unreadable", "bad cache entry"))
    query()
    assert service.requests == 2  # the entry was rewritten


def test_cache_entry_replaced_by_a_fifo_between_runs_is_deleted_and_fetched_again(
        service, tmp_path, caplog):
    """A FIFO (no writer) in place of a cache entry: reading it would block for ever; it
    is seen for what it is, deleted with a warning, and the cone fetched again."""
    import os

    import bad_factory as bf

    good = query()
    (entry,) = cone_files(tmp_path / "cache")
    entry.unlink()
    os.mkfifo(entry)
    with caplog.at_level(logging.WARNING, logger="roman_tweakreg.refcat"), bf.deadline(10):
        again = query()
    assert service.requests == 2
    assert np.array_equal(good.table["RA"], again.table["RA"])
    assert f"Cache entry {entry} is a FIFO (named pipe), not a regular file; deleted" in (
        caplog.text)
    assert entry.is_file()  # a regular entry again
    query()
    assert service.requests == 2


# -- local files ---------------------------------------------------------------------------------
def field_table(names=("RA", "DEC")):
    s = stars()
    return Table({names[0]: s["ra"], names[1]: s["dec"], "pmra": s["pmra"], "pmdec": s["pmdec"],
                  "parallax": s["parallax"], "ref_epoch": s["epoch"], "source_id": s["objID"]})


def write_local(tmp_path, kind):
    if kind == "sky_centroid":
        s = stars()
        t = QTable({"sky_centroid": SkyCoord(s["ra"], s["dec"], unit="deg"), "id": s["objID"]})
        path = tmp_path / "field_sc.ecsv"
        t.write(path)
    elif kind == "sky_centroid_fits":
        s = stars()
        t = QTable({"sky_centroid": SkyCoord(s["ra"], s["dec"], unit="deg")})
        path = tmp_path / "field_sc.fits"
        t.write(path)
    elif kind == "mixed_case_csv":
        path = tmp_path / "field.csv"
        field_table(("Ra", "dEC")).write(path, format="ascii.csv")
    else:
        path = tmp_path / f"field.{kind}"
        field_table(("ra", "DEC") if kind == "parquet" else ("RA", "DEC")).write(path)
    return path


@pytest.mark.parametrize(
    "kind", ["ecsv", "fits", "parquet", "csv", "mixed_case_csv", "sky_centroid",
             "sky_centroid_fits"])
def test_local_files(tmp_path, kind):
    path = write_local(tmp_path, kind)
    cat = get_reference_catalog(str(path), RA, DEC, 0.1, epoch=2016.0)
    keep = in_cone(RA, DEC, 0.1)
    assert (cat.name, len(cat)) == (path.name, keep.sum())
    assert cat.source == str(path)
    ra, _ = cat.positions(2016.0)
    order = np.argsort(ra)
    want = np.sort(np.asarray(stars()["ra"])[keep])
    assert np.abs(ra[order] - want).max() < 1e-9
    assert cat.has_motions == (not kind.startswith("sky_centroid"))
    if cat.has_motions:
        assert cat.epoch == 2016.0
        assert np.isfinite(cat.table["pmra"]).sum() > 0.9 * len(cat)


@pytest.mark.parametrize(
    ("content", "match"),
    [("a,b\n1,2\n", r"field\.csv has no RA/DEC \(any case\) or sky_centroid column; "
                    r"found \['a', 'b'\]"),
     ("ra,dec\nx,y\n", r"field\.csv: column ra is not numeric"),
     ("SIMPLE = what", r"cannot read .*field\.fits")],
)
def test_bad_local_files(tmp_path, content, match):
    path = tmp_path / ("field.fits" if content.startswith("SIMPLE") else "field.csv")
    path.write_text(content)
    with pytest.raises(ReferenceCatalogError, match=match):
        get_reference_catalog(str(path), RA, DEC, 0.1)


def write_hats(root, table, order):
    """Write ``table`` as a HATS catalog at one HEALPix order; return the pixel of each row."""
    pix = HEALPix(nside=2**order, order="nested").lonlat_to_healpix(
        table["ra"] * u.deg, table["dec"] * u.deg)
    for p in np.unique(pix):
        folder = root / f"Norder={order}" / f"Dir={p // 10000 * 10000}"
        folder.mkdir(parents=True, exist_ok=True)
        part = table[pix == p]
        pq.write_table(pa.table({c: np.asarray(part[c]) for c in part.colnames}),
                       folder / f"Npix={p}.parquet")
    (root / "properties").write_text("dataset_type=object\n")
    return pix


def test_hats_reads_only_the_partitions_over_the_cone(tmp_path, monkeypatch):
    sky = simulate.make_star_field(150.0, 2.0, 12.0, 30.0, np.random.default_rng(3))
    sky.rename_column("mag", "phot_g_mean_mag")
    pix = write_hats(tmp_path / "gaia_hats", sky, order=4)
    read = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda p, **kw: read.append(p) or real(p, **kw))
    ra, dec, radius = 151.3, 1.2, 0.8
    cat = get_reference_catalog(str(tmp_path / "gaia_hats"), ra, dec, radius, epoch=2016.0)
    inside = sep_mas(sky["ra"], sky["dec"], ra, dec) <= radius * 3.6e6
    assert (cat.name, len(cat)) == ("gaia_hats", inside.sum())
    assert inside.sum() > 30
    read_pix = {int(Path(p).stem.removeprefix("Npix=")) for p in read}
    assert set(np.unique(pix[inside])) <= read_pix
    assert len(read_pix) <= 4 < len(np.unique(pix))
    assert {"RA", "DEC", "pmra", "pmdec", "parallax", "ref_epoch", "mag", "objID"} <= set(
        cat.table.colnames)
    assert np.array_equal(np.sort(cat.table["objID"]), np.sort(sky["objID"][inside]))


def test_hats_mixed_orders_under_dataset(tmp_path):
    sky = simulate.make_star_field(150.0, 2.0, 8.0, 30.0, np.random.default_rng(4))
    parent = HEALPix(nside=8, order="nested").lonlat_to_healpix(sky["ra"] * u.deg,
                                                                sky["dec"] * u.deg)
    coarse = parent % 2 == 0  # even order-3 pixels stay whole, odd ones are split at order 4
    write_hats(tmp_path / "cat" / "dataset", sky[coarse], order=3)
    write_hats(tmp_path / "cat" / "dataset", sky[~coarse], order=4)
    for ra, dec, radius in [(150.0, 2.0, 3.0), (147.2, -1.0, 1.5)]:
        cat = get_reference_catalog(str(tmp_path / "cat"), ra, dec, radius)
        inside = sep_mas(sky["ra"], sky["dec"], ra, dec) <= radius * 3.6e6
        assert np.array_equal(np.sort(cat.table["objID"]), np.sort(sky["objID"][inside]))
        assert inside.sum() > 50


@pytest.mark.parametrize("deep", [12, 16])
def test_hats_deep_partition_is_read_in_seconds(tmp_path, monkeypatch, deep):
    """Order-5 partitions plus one deep partition, listed in partition_info.csv: the cone
    is tested per partition at its own order (it took 106 s at order 12 when searched at
    the deepest order over the whole cone)."""
    import time

    ra, dec, radius = 150.0, 2.0, 0.5
    sky = simulate.make_star_field(ra, dec, 5.0, 100.0, np.random.default_rng(5))
    hp = HEALPix(nside=2**deep, order="nested")
    pix_deep = hp.lonlat_to_healpix(ra * u.deg, dec * u.deg)
    c_ra, c_dec = (a.to_value(u.deg) for a in hp.healpix_to_lonlat(pix_deep))
    size = hp.pixel_resolution.to_value(u.deg)
    extra = Table({c: np.repeat(sky[c][:1], 20) for c in sky.colnames})  # stars in the deep pixel
    extra["ra"] = c_ra + np.random.default_rng(6).uniform(-0.2, 0.2, 20) * size
    extra["dec"] = c_dec + np.random.default_rng(7).uniform(-0.2, 0.2, 20) * size
    extra["objID"] = np.arange(20) + 10**9
    root = tmp_path / "deep_hats"
    pix5 = write_hats(root, sky, order=5)
    write_hats(root, extra, order=deep)
    rows = [f"5,{p}" for p in np.unique(pix5)] + [f"{deep},{pix_deep}"]
    (root / "partition_info.csv").write_text("Norder,Npix\n" + "\n".join(rows) + "\n")
    read = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda p, **kw: read.append(p) or real(p, **kw))
    t = time.perf_counter()
    cat = get_reference_catalog(str(root), ra, dec, radius, epoch=2016.0)
    elapsed = time.perf_counter() - t
    both = Table({c: np.concatenate([sky[c], extra[c]]) for c in ("ra", "dec", "objID")})
    inside = sep_mas(both["ra"], both["dec"], ra, dec) <= radius * 3.6e6
    assert np.array_equal(np.sort(cat.table["objID"]), np.sort(both["objID"][inside]))
    assert np.isin(extra["objID"], cat.table["objID"]).all()
    assert any(f"Norder={deep}" in str(p) for p in read)
    assert len(read) < len(rows) / 2  # only the partitions over the cone
    assert elapsed < 5.0, f"{elapsed:.1f} s"


def test_hats_folder_without_partitions(tmp_path):
    (tmp_path / "empty_hats").mkdir()
    with pytest.raises(ReferenceCatalogError, match=r"empty_hats is a folder but not a HATS"):
        get_reference_catalog(str(tmp_path / "empty_hats"), RA, DEC, 0.1)


# -- epochs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("to_epoch", [2028.0, 2009.5])
def test_epoch_propagation_matches_astropy(tmp_path, to_epoch):
    path = write_local(tmp_path, "ecsv")
    cat = get_reference_catalog(str(path), RA, DEC, 0.3, epoch=to_epoch)
    ra, dec = cat.positions(to_epoch)
    t = cat.table
    moving = np.isfinite(t["pmra"])
    assert moving.sum() > 4000
    sc = SkyCoord(t["RA"][moving] * u.deg, t["DEC"][moving] * u.deg,
                  pm_ra_cosdec=t["pmra"][moving] * u.mas / u.yr,
                  pm_dec=t["pmdec"][moving] * u.mas / u.yr,
                  distance=(t["parallax"][moving] * u.mas).to(u.pc, u.parallax()),
                  obstime=Time(2016.0, format="jyear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", erfa.ErfaWarning)  # tiny parallaxes: not our concern
        want = sc.apply_space_motion(new_obstime=Time(to_epoch, format="jyear"))
    err = sep_mas(ra[moving], dec[moving], want.ra.deg, want.dec.deg)
    assert err.max() < 0.1
    assert np.median(sep_mas(ra, dec, t["RA"], t["DEC"])[moving]) > 10  # they did move
    assert np.array_equal(ra[~moving], t["RA"][~moving])  # rows without motions stay


def test_carry_keeps_rows_without_motion_or_epoch():
    ra, dec = carry([10.0, 10.0, 359.9999], [0.0, 89.9, 0.0], [np.nan, 100.0, 1000.0],
                    [5.0, 0.0, 0.0], np.array([1.0, np.nan, 1.0]))
    assert (ra[0], dec[0], ra[1], dec[1]) == (10.0, 0.0, 10.0, 89.9)
    assert ra[2] == pytest.approx((359.9999 + 1 / 3600) % 360, abs=1e-9)


def test_catalog_without_motions_warns_with_the_epoch_gap(tmp_path, caplog):
    path = tmp_path / "plain.ecsv"
    t = Table({"RA": stars()["ra"], "DEC": stars()["dec"], "epoch": stars()["epoch"]})
    t.write(path)
    cat = get_reference_catalog(str(path), RA, DEC, 0.1, epoch=2028.0)
    with caplog.at_level(logging.WARNING, logger="roman_tweakreg.refcat"):
        ra, _ = cat.positions(2028.0)
        cat.positions(2028.0)
    assert np.array_equal(ra, cat.table["RA"])
    assert cat.warnings == [
        "reference catalog plain.ecsv has no proper motions (pmra/pmdec): its positions are "
        "used as they are, at epoch 2016.000, up to 12.00 yr from 2028.000"]
    assert caplog.text.count("no proper motions") == 1
    assert cat.positions(2016.0)[0][0] == cat.table["RA"][0]
    assert len(cat.warnings) == 1  # no gap, no warning
    t.remove_column("epoch")
    t.write(path, overwrite=True)
    cat = get_reference_catalog(str(path), RA, DEC, 0.1)
    cat.positions(2027.5)
    assert cat.warnings[0].endswith("at an unknown epoch, to be used at 2027.500")
    cat = ReferenceCatalog(Table({"RA": [1.0], "DEC": [2.0], "pmra": [9.0], "pmdec": [9.0]}),
                           "nodate")
    ra, dec = cat.positions(2030.0)
    assert (ra[0], dec[0]) == (1.0, 2.0)
    assert cat.warnings == ["reference catalog nodate has proper motions but no epoch (ref_epoch "
                            "or epoch column or meta): its positions are used as they are, at an "
                            "unknown epoch, to be used at 2030.000"]


def test_write_atomic_ecsv_at_epoch(service, tmp_path):
    cat = query()
    path = cat.write(tmp_path / "out" / "fit_gaiadr3_ref.ecsv", 2028.0)
    back = Table.read(path)
    ra, dec = cat.positions(2028.0)
    assert len(back) == len(cat)
    assert np.abs(back["RA"] - ra).max() < 1e-12
    assert np.abs(back["DEC"] - dec).max() < 1e-12
    moving = np.isfinite(back["pmra"])
    assert np.all(back["ref_epoch"][moving] == 2028.0)
    assert np.all(back["ref_epoch"][~moving] == 2026.3)
    assert (back.meta["name"], back.meta["epoch"]) == ("GAIADR3", 2028.0)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert np.array_equal(cat.positions(2028.0)[0], ra)  # the catalog itself is unchanged


# -- URLs and lists ------------------------------------------------------------------------------
def test_url_catalog_is_downloaded_once(service, tmp_path):
    path = write_local(tmp_path, "ecsv")
    service.files["field.ecsv"] = path.read_bytes()
    url = f"{service.url}/files/field.ecsv"
    cat = query(url)
    assert (cat.name, cat.source, len(cat)) == ("field.ecsv", url, in_cone(RA, DEC, 0.1).sum())
    assert len(query(url, radius=0.2)) == in_cone(RA, DEC, 0.2).sum()
    assert service.requests == 1
    with pytest.raises(ReferenceCatalogError, match=r"catalog URL .*/files/nope\.ecsv: HTTP 404"):
        query(f"{service.url}/files/nope.ecsv")


def test_comma_list_falls_back_in_order(service, tmp_path):
    service.empty = {"GAIADR3"}
    cat = query("GAIADR3, GAIADR2")
    assert cat.name == "GAIADR2"
    assert [q["CAT"] for q in service.queries] == ["GAIADR3", "GAIADR2"]

    dense = simulate.make_star_field(RA, DEC, 0.12, 60000.0, np.random.default_rng(5))
    dense.write(tmp_path / "dense.ecsv")
    service.empty = set()
    n_gaia = in_cone(RA, DEC, 0.1).sum()
    cat = query(f"GAIADR3,{tmp_path / 'dense.ecsv'}", min_sources=n_gaia + 1)
    assert (cat.name, len(cat) > n_gaia) == ("dense.ecsv", True)
    cat = query(f"NOSUCHCAT,{tmp_path / 'dense.ecsv'}")
    assert cat.name == "dense.ecsv"

    service.empty = {"GAIADR3"}
    with pytest.raises(ReferenceCatalogError,
                       match=r"no entry of abs_refcat='GAIADR3,nothere\.fits' gave a reference "
                             r"catalog: .*CAT=GAIADR3\): No data records.*nothere\.fits does not"):
        query("GAIADR3,nothere.fits", use_cache=False)
    with pytest.raises(ReferenceCatalogError, match=r"GAIADR2 has \d+ sources .* fewer than"):
        query("GAIADR2", min_sources=10**6)


# -- deadlines and size limits (issue 28) ----------------------------------------------------------
def _peak_mb(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("kind", ["service", "url"])
def test_trickling_answer_ends_within_the_timeout_times_the_tries(service, kind):
    import time

    # one byte every 0.25 s: each read is quick, but a try may take 1 s in all
    service.always, service.delay = "trickle", 0.25
    refcat = "GAIADR3" if kind == "service" else f"{service.url}/files/field.ecsv"
    start = time.monotonic()
    with pytest.raises(ReferenceCatalogError,
                       match=r"took longer than the 1 s timeout \(a deadline per try, body "
                             r"included; \d+ bytes received\), after up to 1 retries"):
        query(refcat, timeout=1.0, retries=1, use_cache=False)
    elapsed = time.monotonic() - start
    assert service.requests == 2  # one try and one retry, each cut at its deadline
    assert 2.0 <= elapsed < 2 * 1.0 + 0.01 + 1.5  # tries x timeout (+ backoff, + one read)
    assert service.sent <= 2 * (1.0 / 0.25 + 2)


@pytest.mark.parametrize("kind", ["service", "url"])
def test_gzip_bomb_is_refused_at_the_size_limit_in_bounded_memory(service, kind):
    service.always, service.bomb_size = "gzipbomb", 20_000_000  # 20 MB from about 20 kB
    refcat = "GAIADR3" if kind == "service" else f"{service.url}/files/field.ecsv"
    what = r"catalog service .*\(CAT=GAIADR3\)" if kind == "service" else r"catalog URL .*field"

    def run():
        with pytest.raises(ReferenceCatalogError,
                           match=rf"^{what}.*: the answer is larger than the limit "
                                 r"abs_refcat_max_bytes=1000000 bytes \(Content-Encoding gzip\) "
                                 r"\(1000001 bytes after decompression from \d+ received\)"):
            query(refcat, timeout=5.0, retries=2, use_cache=False, max_bytes=1_000_000)

    assert len(gzip_bomb(service.bomb_size)) < 100_000  # made before measuring (same process)
    assert _peak_mb(run) < 8.0  # not the 20 MB it inflates to
    assert service.requests == 1  # a size fault is not retried


@pytest.mark.parametrize("kind", ["service", "url"])
def test_endless_chunked_answer_is_refused_at_the_size_limit(service, kind):
    import time

    service.always = "endless"
    refcat = "GAIADR3" if kind == "service" else f"{service.url}/files/endless.ecsv"
    start = time.monotonic()
    with pytest.raises(ReferenceCatalogError,
                       match=r"larger than the limit abs_refcat_max_bytes=3000000 bytes "
                             r"\(3000001 bytes after decompression"):
        query(refcat, timeout=5.0, retries=1, use_cache=False, max_bytes=3_000_000)
    assert time.monotonic() - start < 5.0
    assert service.requests == 1


def test_answer_announcing_more_than_the_limit_is_refused_before_reading(service):
    with pytest.raises(ReferenceCatalogError,
                       match=r"CAT=GAIADR3\): the answer announces \d+ bytes, more than the limit "
                             r"abs_refcat_max_bytes=1000; raise it or ask for a smaller cone"):
        query(use_cache=False, max_bytes=1000)
    assert len(query(use_cache=False)) == in_cone(RA, DEC, 0.1).sum()  # the default limit


def test_each_abs_refcat_entry_is_classified_once(tmp_path, monkeypatch):
    from roman_tweakreg.refcat._plan import is_service_name
    from roman_tweakreg.refcat._resolve import Entry, classify

    monkeypatch.chdir(tmp_path)
    (tmp_path / "gaia.ecsv").write_text("# %ECSV 1.0\n")
    (tmp_path / "GAIADR3").write_text("a file named like the service's catalog\n")
    cases = {
        "s3://stpubdata/gaia/gaia_dr3/public/hats/gaia/": Entry.HATS_URL,
        "https://example.org/hats/gaia": Entry.HATS_URL,
        "https://example.org/field.ecsv": Entry.URL,
        "gaia.ecsv": Entry.PATH,
        " ./GAIADR3 ": Entry.PATH,  # the file: a path, not the name
        "missing/gaia.parquet": Entry.MISSING_PATH,
        "gaiadr3_s3": Entry.S3_NAME,
        "GAIADR3": Entry.SERVICE,  # the name wins over the file of that name
        "GSC242": Entry.NAME,
        "no such thing!": Entry.INVALID,
    }
    assert {entry: classify(entry) for entry in cases} == cases
    # the step's check, the reader and the batch planner follow the one classification
    assert [is_service_name(e) for e in ("GAIADR3", "gaiadr3_s3", "GSC242", "./GAIADR3")] == [
        True, True, True, False,
    ]  # fmt: skip
    with pytest.raises(ReferenceCatalogError, match=r"missing/gaia.parquet does not exist"):
        get_reference_catalog("missing/gaia.parquet", 10.0, 20.0, 0.1, cache_dir="off")


def _wrapped(fault: BaseException) -> Exception:
    """``fault`` as requests raises it after urllib3's retries: ConnectionError(MaxRetryError)."""
    import requests
    import urllib3

    outer = urllib3.exceptions.NewConnectionError(None, "a text that names no cause")
    outer.__cause__ = fault
    return requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/vo", reason=outer))


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (ConnectionRefusedError(111, "the text says timeout"), "connection refused"),
        (socket.gaierror(-2, "the text says refused"), "the host name does not resolve"),
        (ConnectionResetError(104, "the text says refused"), "the connection was closed or reset"),
        (TimeoutError("the text says refused"), "no answer within the 3 s timeout"),
    ],
)
def test_network_faults_are_told_apart_by_type_not_text(fault, kind):
    from roman_tweakreg.refcat._service import _describe

    assert _describe(_wrapped(fault), 3.0).startswith(kind)
