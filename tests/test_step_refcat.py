"""The step with real reference-catalog sources: the local test service, local 2016 files."""

import numpy as np
import pytest

from conftest import models_of, truths_of
from gaia_server import FIELD, stars
from roman_tweakreg import TweakRegStep
from roman_tweakreg.testing import simulate
from test_step import errors_mas, metas

DETECTORS = ("WFI01", "WFI10")


def field_exposures(seed=4, offset=0.0, detectors=DETECTORS):
    """Two dithered exposures at epoch 2028 of the service's 2016 Gaia-like field,
    pointed ``offset`` degrees of RA from its centre."""
    rng = np.random.default_rng(seed)
    ra, dec, _, _ = FIELD
    out = []
    for k, err in enumerate([(0.5, -0.3, 0.02), (-0.3, 0.4, -0.02)]):
        att = simulate.Attitude(ra + offset, dec, 30.0).perturbed(20.0 * k, 20.0 * k, 0.0)
        out.append(
            simulate.make_exposure(
                stars(),
                att,
                exposure=k + 1,
                epoch=2028.0,
                pointing_error=err,
                detectors=detectors,
                rng=rng,
            )
        )
    return out


def test_gaia_service_with_epoch_and_cache(gaia_service, monkeypatch, tmp_path):
    monkeypatch.setenv("ASTROMETRIC_CATALOG_URL", gaia_service.url)
    exposures = field_exposures()
    result = TweakRegStep.call(models_of(exposures), abs_refcat_cache=str(tmp_path))
    assert errors_mas(result, truths_of(exposures)).max() < 1.0
    outcome = metas(result)
    assert {o[0] for o in outcome} == {"COMPLETE"}
    assert {o[2] for o in outcome} == {"FIT-LVL2-GAIADR3"}
    assert all(o[1]["absolute"]["status"] == "SUCCESS" for o in outcome)
    assert gaia_service.requests == 1
    assert float(gaia_service.queries[0]["EPOCH"]) == pytest.approx(2028.0, abs=1e-3)
    # a second run on the same field asks the service nothing
    exposures = field_exposures()
    result = TweakRegStep.call(models_of(exposures), abs_refcat_cache=str(tmp_path))
    assert errors_mas(result, truths_of(exposures)).max() < 1.0
    assert gaia_service.requests == 1


def test_group_failing_relative_alignment_is_aligned_to_gaia_alone(gaia_service, monkeypatch):
    monkeypatch.setenv("ASTROMETRIC_CATALOG_URL", gaia_service.url)
    exposures = field_exposures()
    # a 0.3" search radius rejects the ~1" relative correction; each group then meets Gaia alone
    result = TweakRegStep.call(
        models_of(exposures), searchrad=0.3, tolerance=0.3, abs_refcat_cache="off"
    )
    outcome = metas(result)
    assert [o[1]["relative"]["status"] for o in outcome] == ["FAILED"] * 4
    assert [o[1]["absolute"]["status"] for o in outcome] == ["SUCCESS"] * 4
    assert [o[0] for o in outcome] == ["COMPLETE"] * 4
    assert errors_mas(result, truths_of(exposures)).max() < 1.0


def test_service_down_keeps_relative_alignment(gaia_service, caplog):
    gaia_service.always = "503"
    exposures = field_exposures()
    # the service named by the step parameter (the environment points at a closed port)
    result = TweakRegStep.call(
        models_of(exposures),
        abs_refcat_cache="off",
        abs_refcat_retries=2,
        abs_refcat_url=gaia_service.url,
    )
    assert gaia_service.requests == 3  # one try and two retries
    outcome = metas(result)
    assert [o[0] for o in outcome] == ["INCOMPLETE"] * 4  # relative alignment only
    assert all(o[1]["absolute"]["status"] == "SKIPPED" for o in outcome)
    assert "503" in outcome[0][1]["absolute"]["reason"]
    assert "Absolute alignment skipped, relative alignment kept" in caplog.text


def test_comma_list_falls_back_to_a_local_file(gaia_service, monkeypatch, tmp_path):
    monkeypatch.setenv("ASTROMETRIC_CATALOG_URL", gaia_service.url)
    gaia_service.empty.add("GAIADR3")
    path = tmp_path / "field.ecsv"
    stars().write(path)  # epoch 2016 with motions
    exposures = field_exposures()
    result = TweakRegStep.call(
        models_of(exposures),
        abs_refcat=f"GAIADR3,{path}",
        abs_refcat_cache="off",
        save_abs_catalog=True,
        catalog_path=str(tmp_path),
    )
    outcome = metas(result)
    assert {o[2] for o in outcome} == {"FIT-LVL2-field.ecsv"}
    assert errors_mas(result, truths_of(exposures)).max() < 1.0
    saved = tmp_path / "fit_field_ref.ecsv"
    assert saved.is_file()


def test_local_2016_catalog_with_motions_is_carried_to_2028(tmp_path):
    exposures = field_exposures()
    path = tmp_path / "gaia2016.ecsv"
    stars().write(path)
    result = TweakRegStep.call(models_of(exposures), abs_refcat=str(path))
    assert errors_mas(result, truths_of(exposures)).max() < 1.0
    # the same catalog used as if stars did not move is tens of mas off
    static = tmp_path / "static.ecsv"
    t = stars()["ra", "dec"]
    t.write(static)
    exposures = field_exposures()
    result = TweakRegStep.call(models_of(exposures), abs_refcat=str(static))
    assert errors_mas(result, truths_of(exposures)).min() > 10.0


@pytest.mark.parametrize(
    ("refcat", "why"),
    [
        ("my_ref_cat", r"'my_ref_cat' \(unknown catalog name\)"),
        ("GAIADR9", r"'GAIADR9' \(unknown catalog name\)"),
        ("./nothere.ecsv", r"'./nothere.ecsv' \(local path nothere.ecsv does not exist\)"),
        ("GAIADR3,/no/such/dir", r"'/no/such/dir' \(local path /no/such/dir does not exist\)"),
    ],
)
def test_invalid_abs_refcat_fails_before_any_work(gaia_service, tmp_path, refcat, why):
    # the input does not exist either: the parameter is checked first
    with pytest.raises(
        ValueError,
        match=rf"^Invalid 'abs_refcat' value: {why}\. 'abs_refcat' "
        r"must be a catalog service name \(GAIAREFCAT, GAIADR3, GAIADR2, GAIADR1\), "
        r"a romancal S3 name \(GAIADR3_S3: Gaia DR3 as HATS on AWS S3\)",
    ):
        TweakRegStep.call(
            str(tmp_path / "missing_cal.asdf"), abs_refcat=refcat, abs_refcat_url=gaia_service.url
        )
    assert gaia_service.requests == 0


def test_romancal_s3_name_read_from_s3(gaia_service, s3_server):
    """romancal's GAIADR3_S3 is read from S3 (the local moto server), not from the service."""
    exposures = field_exposures()
    result = TweakRegStep.call(
        models_of(exposures),
        abs_refcat="gaiadr3_s3",
        abs_refcat_url=gaia_service.url,
        abs_refcat_cache="off",
    )
    assert gaia_service.requests == 0
    assert {o[2] for o in metas(result)} == {"FIT-LVL2-GAIADR3_S3"}
    assert errors_mas(result, truths_of(exposures)).max() < 1.0


def test_romancal_s3_name_then_the_service(gaia_service, caplog):
    """``GAIADR3_S3,GAIADR3`` without S3 (conftest's closed port) falls back to the service."""
    exposures = field_exposures()
    result = TweakRegStep.call(
        models_of(exposures),
        abs_refcat="GAIADR3_S3,GAIADR3",
        abs_refcat_url=gaia_service.url,
        abs_refcat_cache="off",
        abs_refcat_retries=0,
    )
    assert [q["CAT"] for q in gaia_service.queries] == ["GAIADR3"]
    assert {o[2] for o in metas(result)} == {"FIT-LVL2-GAIADR3"}
    assert errors_mas(result, truths_of(exposures)).max() < 1.0
    assert (
        "Reference catalog GAIADR3_S3 not used: abs_refcat: HATS catalog "
        "s3://stpubdata/gaia/gaia_dr3/public/hats/gaia (endpoint http://127.0.0.1:9): cannot "
        "connect" in caplog.text
    )


def test_vo_timeout_replaces_abs_refcat_timeout(gaia_service):
    import time

    gaia_service.always, gaia_service.delay = "slow", 5.0
    exposures = field_exposures()
    start = time.perf_counter()
    result = TweakRegStep.call(
        models_of(exposures),
        abs_refcat_url=gaia_service.url,
        abs_refcat_cache="off",
        abs_refcat_retries=0,
        abs_refcat_timeout=60.0,
        vo_timeout=0.5,
    )
    assert time.perf_counter() - start < 5.0  # not the 60 s of abs_refcat_timeout
    absolute = [o[1]["absolute"] for o in metas(result)]
    assert {a["status"] for a in absolute} == {"SKIPPED"}
    assert "timed out" in absolute[0]["reason"]


@pytest.mark.parametrize(
    ("fault", "options", "reason"),
    [("trickle", {"abs_refcat_timeout": 1.0, "abs_refcat_retries": 1},
      r"took longer than the 1 s timeout \(a deadline per try"),
     ("gzipbomb", {"abs_refcat_max_bytes": 1_000_000},
      r"larger than the limit abs_refcat_max_bytes=1000000 bytes \(Content-Encoding gzip\)"),
     ("endless", {"abs_refcat_max_bytes": 2_000_000},
      r"larger than the limit abs_refcat_max_bytes=2000000 bytes")],
)  # fmt: skip
def test_hostile_service_ends_in_the_fallback_within_the_deadline(
    gaia_service, fault, options, reason
):
    import re
    import time

    # issue 28: these hung or grew without bound; now the relative alignment is kept
    gaia_service.always, gaia_service.delay = fault, 0.25
    exposures = field_exposures()
    start = time.monotonic()
    result = TweakRegStep.call(
        models_of(exposures), abs_refcat_url=gaia_service.url, abs_refcat_cache="off", **options
    )
    assert time.monotonic() - start < 2 * 1.0 + 3.0  # tries x timeout, plus the alignment
    outcome = metas(result)
    # aligned to each other only: INCOMPLETE (the absolute fit asked for could not be made)
    assert [o[0] for o in outcome] == ["INCOMPLETE"] * 4
    assert [o[1]["relative"]["status"] for o in outcome].count("SUCCESS") >= 2
    assert {o[1]["absolute"]["status"] for o in outcome} == {"SKIPPED"}
    assert re.search(reason, outcome[0][1]["absolute"]["reason"])
    assert gaia_service.url in outcome[0][1]["absolute"]["reason"]
