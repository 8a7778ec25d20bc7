"""Fits you can trust: every image comes out within 1 mas of the truth, or it is not
COMPLETE and keeps its input WCS (issue 11).

Exposure 1 is simulated without pointing error; exposure 2 with the pointing error
given, so an image aligned to exposure 1 only is within 1 mas of the truth too.
"""

import json
import re

import numpy as np
import pytest

from conftest import refcat_at
from roman_tweakreg import TweakRegStep
from roman_tweakreg.align import absolute_align, relative_align, rigid_sets
from roman_tweakreg.matching import FitParameters
from roman_tweakreg.plane import TangentPlane
from roman_tweakreg.quality import FALSE_ALARM, Quality, gates
from roman_tweakreg.results import Status, image_status
from roman_tweakreg.testing import simulate
from test_align import images_of

REL = FitParameters()
ABS = FitParameters(searchrad=6.0, separation=0.1, tolerance=0.7)
PER_DETECTOR_AREA = 4088**2 * 0.11**2 / 3600**2  # deg^2


def _noise(per_detector):
    """Centroid noise (pixels): a fit of a sparse field's 40 stars with the usual 0.02 px
    is uncertain by about 1 mas; these tests are about wrong fits, not that."""
    return 0.02 if per_detector > 100 else 0.005


def _field(per_detector, detectors, seed):
    """Exposure 1 (exact pointing) and the stars, ``per_detector`` stars per detector."""
    density = per_detector / PER_DETECTOR_AREA
    exposures, stars = simulate.make_dataset(
        1,
        detectors=detectors,
        seed=seed,
        density=density,
        max_shift=0.0,
        max_roll=0.0,
        centroid_noise=_noise(per_detector),
    )
    return exposures[0], stars


def _second(first, stars, error, detectors, seed, roll=0.0):
    """Exposure 2, dithered 30" from exposure 1, its pointing off by ``error`` arcsec."""
    attitude = first.true_attitude.perturbed(30.0, 30.0, 0.0)
    per_detector = len(first.models[0].meta["tweakreg_catalog"])
    return simulate.make_exposure(
        stars,
        attitude,
        exposure=2,
        pointing_error=(error / np.sqrt(2), error / np.sqrt(2), roll),
        detectors=detectors,
        centroid_noise=_noise(per_detector),
        rng=np.random.default_rng(seed),
    )


def _align(exposures, positions):
    """The step's core: relative (exposure 1, exact, the reference), then absolute per
    rigid set; image statuses."""
    images = images_of(exposures)
    plane = TangentPlane(images)
    relative = relative_align(plane, REL, enforce_user_order=True)
    absolute = {}
    for members in rigid_sets(images, relative):
        result = absolute_align(plane, positions, ABS, members=members)
        absolute.update(dict.fromkeys({images[i].group_id for i in members}, result))
    statuses = [image_status(relative.get(i.group_id), absolute.get(i.group_id)) for i in images]
    return plane, relative, absolute, statuses


def _check(plane, exposures, statuses):
    """Within 1 mas of the truth, or not COMPLETE with the input WCS kept; the outcome.

    INCOMPLETE (aligned to exposure 1 only, which is exact here): within 1 mas too.
    """
    truths = [w for e in exposures for w in e.true_wcs]
    out = []
    for i, (status, truth) in enumerate(zip(statuses, truths, strict=True)):
        wcs = plane.corrected_wcs(i) or plane.images[i].wcs
        if status in (Status.COMPLETE, Status.INCOMPLETE):
            assert simulate.wcs_difference_mas(wcs, truth) < 1.0, i
        else:
            assert plane.corrected_wcs(i) is None, i
        out.append(status)
    return out


def _positions(stars):
    ra, dec = simulate.propagate(stars, 2028.0, simulate.l2_observer(2028.0))
    return lambda _epoch: (ra, dec)


SPARSE, DENSE = 20, 3000
TWO = ("WFI01", "WFI02")


@pytest.fixture(scope="module")
def fields():
    return {n: _field(n, TWO, seed=11) for n in (SPARSE, DENSE)}


@pytest.mark.parametrize("per_detector", [SPARSE, DENSE])
@pytest.mark.parametrize("error", [1.0, 3.0, 8.0, 20.0, 600.0, 3600.0])
def test_pointing_errors_recovered_or_refused(fields, per_detector, error):
    first, stars = fields[per_detector]
    exposures = [first, _second(first, stars, error, TWO, seed=int(error))]
    plane, relative, absolute, statuses = _align(exposures, _positions(stars))
    outcome = _check(plane, exposures, statuses)
    assert outcome[:2] == [Status.COMPLETE] * 2  # exposure 1 always aligns to the stars
    second = absolute["exp2"]
    if error <= ABS.searchrad:  # below the absolute search radius: always recovered
        assert outcome[2:] == [Status.COMPLETE] * 2
        assert second.applied
        assert second.quality.significance >= 5
    else:
        assert outcome[2:] == [Status.FAILED] * 2
        assert not second.applied
        assert not relative["exp2"].applied
        if second.nmatches >= ABS.minobj:  # enough pairs for a fit: refused, and why
            assert second.reason.startswith(("quality gate", "implausible")), second.reason
            assert "widen abs_searchrad" in second.reason
        if second.reason.startswith("implausible"):  # the square search found 8"
            assert error == 8.0
            assert second.quality.significance > 5


def test_unrelated_reference_catalog_is_refused(fields):
    first, stars = fields[DENSE]
    exposures = [first, _second(first, stars, 1.0, TWO, seed=5)]
    other = simulate.make_star_field(
        270.0, -30.0, 0.55, DENSE / PER_DETECTOR_AREA, np.random.default_rng(99)
    )
    plane, relative, absolute, statuses = _align(exposures, _positions(other))
    # the exposures align to each other; nothing is aligned to the unrelated stars: the
    # relative alignment is kept, and no image is COMPLETE (romancal: FAILED)
    assert sorted(r.status for r in relative.values()) == ["REFERENCE", "SUCCESS"]
    assert {r.status for r in absolute.values()} == {"FAILED"}
    result = next(iter(absolute.values()))
    assert result.reason.startswith("quality gate 'significance' failed")
    assert result.quality.significance < 5
    assert result.quality.nmatches < 2 * result.quality.expected_chance
    assert _check(plane, exposures, statuses) == [Status.INCOMPLETE] * 4


def test_single_detector_and_shuffled_catalogs(fields):
    first, stars = fields[DENSE]
    one = ("WFI01",)
    single = simulate.make_dataset(
        1, detectors=one, seed=11, density=DENSE / PER_DETECTOR_AREA, max_shift=1.0
    )[0]
    plane, _, absolute, statuses = _align(single, _positions(stars))
    assert _check(plane, single, statuses) == [Status.COMPLETE]
    assert absolute["exp1"].quality.spread > 0.9

    second = _second(first, stars, 1.0, TWO, seed=6)
    rng = np.random.default_rng(7)
    for model in second.models:  # positions shuffled among the sources: no star left
        cat = model.meta["tweakreg_catalog"]
        cat["x"] = rng.permutation(np.asarray(cat["x"]))
    plane, relative, absolute, statuses = _align([first, second], _positions(stars))
    assert _check(plane, [first, second], statuses) == [Status.COMPLETE] * 2 + [Status.FAILED] * 2
    assert not relative["exp2"].applied
    assert absolute["exp2"].reason.startswith("quality gate"), absolute["exp2"].reason


def test_each_group_shows_its_own_figures(fields):
    first, stars = fields[DENSE]
    exposures = [first, _second(first, stars, 1.0, TWO, seed=8)]
    images = images_of(exposures)
    plane = TangentPlane(images)
    relative_align(plane, REL)
    from roman_tweakreg.align import group_results

    result = absolute_align(plane, _positions(stars), ABS)
    assert result.applied
    own = group_results(result)
    assert sorted(own) == ["exp1", "exp2"]
    assert sum(r.nmatches for r in own.values()) == result.nmatches
    for r in own.values():
        assert r.quality.nmatches == r.nmatches > 4000
        assert r.fit["rmse"] == r.quality.rmse < 0.01
        assert r.fit["matrix"] is not None
    assert own["exp1"].nmatches != own["exp2"].nmatches


def _quality(**kw):
    base = dict(
        nmatches=100,
        nkept=100,
        n_image=1000,
        n_reference=1000,
        overlap_area=1e6,
        expected_chance=1.5,
        trials=15.0,
        false_alarm=1e-100,
        significance=21.0,
        rmse=0.003,
        mae=0.0025,
        noise=0.003,
        matched_fraction=0.1,
        spread=0.9,
    )
    return Quality(**{**base, **kw})


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({}, ""),
        (
            {"false_alarm": 1e-3, "significance": 3.1},
            r"^quality gate 'significance' failed: 100 matches where chance gives 1\.5 .* widen "
            r"abs_searchrad",
        ),
        (
            {"expected_chance": 20.0},
            r"^quality gate 'matched fraction' failed: 100 matches .* fewer than 10 x the 20",
        ),
        (
            {"rmse": 0.3, "noise": 0.05},
            r"^quality gate 'rmse' failed: fit rmse 0\.3 arcsec is 6 x the residuals' core",
        ),
        ({"rmse": 0.3, "noise": 0.2}, ""),  # a noisy catalog, not mismatches
        ({"rmse": 0.1, "noise": 0.01}, ""),  # heavy tails well inside the tolerance
        ({"spread": 0.2}, r"^quality gate 'spread' failed: the matches cover 0\.2 "),
        ({"spread": 0.2, "nkept": 5}, ""),  # 5 pairs in a fifth: 3e-4 > FALSE_ALARM
    ],
)
def test_gates(changes, match):
    reason = gates(_quality(**changes), ABS, "abs_searchrad")
    if match:
        assert reason
        assert re.search(match, reason), reason
    else:
        assert reason == ""


def test_false_alarm_is_five_sigma():
    assert FALSE_ALARM == pytest.approx(2.8665e-7, rel=1e-4)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        (
            "roll_ref",
            1e30,
            r"^meta\.wcsinfo\.roll_ref=1e\+30 is not a finite value in \[-360, 360\]$",
        ),
        ("roll_ref", -361.0, r"^meta\.wcsinfo\.roll_ref=-361\.0 is not a finite value in"),
        ("ra_ref", float("nan"), r"^meta\.wcsinfo\.ra_ref=nan is not a finite value"),
        ("dec_ref", 91.0, r"^meta\.wcsinfo\.dec_ref=91\.0 is not a finite value in \[-90, 90\]"),
        ("v2_ref", float("inf"), r"^meta\.wcsinfo\.v2_ref=inf is not a finite value"),
        ("v3_ref", "abc", r"^meta\.wcsinfo\.v3_ref='abc' is not a number$"),
        ("roll_ref", 359.5, r"^$"),
    ],
)
def test_absurd_wcsinfo_named(key, value, match):
    from roman_tweakreg.catalogs import _absurd_wcsinfo

    info = {
        "v2_ref": 1312.9,
        "v3_ref": -1040.8,
        "roll_ref": 60.0,
        "ra_ref": 270.0,
        "dec_ref": -30.0,
    }
    info[key] = value
    assert re.search(match, _absurd_wcsinfo(info))


def test_absurd_wcsinfo_skips_only_that_image(tmp_path):
    first, stars = _field(SPARSE * 10, TWO, seed=12)
    second = _second(first, stars, 0.5, TWO, seed=9)
    path = tmp_path / "ref.ecsv"
    refcat_at(stars, 2028.0).write(path, format="ascii.ecsv")
    models = first.models + second.models
    models[3].meta.wcsinfo.roll_ref = 1e30
    models[1].meta.wcsinfo.ra_ref = float("nan")
    inputs = [m.meta.wcs for m in models]
    truths = first.true_wcs + second.true_wcs
    result = TweakRegStep.call(
        models, abs_refcat=str(path), processes=1, report="r.json", output_dir=str(tmp_path)
    )
    reasons = {3: "roll_ref=1e+30 is not a finite", 1: "ra_ref=nan is not a finite"}
    with result:
        for i, model in enumerate(result):
            status = model.meta.cal_step.tweakreg
            if i in reasons:
                assert status == "SKIPPED"
                assert model.meta.wcs is inputs[i]
                assert reasons[i] in model.meta.wcs_fit_results["reason"]
            else:
                assert status == "COMPLETE"
                assert simulate.wcs_difference_mas(model.meta.wcs, truths[i]) < 1.0
            result.shelve(model, i, modify=False)
    report = json.loads((tmp_path / "r.json").read_text())
    figures = [e["absolute"]["quality"] for e in report["images"] if e["status"] == "COMPLETE"]
    assert len(figures) == 2
    assert all(f["significance"] > 5 and f["rmse_over_noise"] < 2 for f in figures)
    assert all(f["matched_fraction"] > 0.9 and f["spread"] > 0.5 for f in figures)
