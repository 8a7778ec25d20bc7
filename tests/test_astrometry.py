"""The sky as Roman sees it (parallax from L2), weights from the catalogs' errors, and fits
that state their uncertainty."""

import logging

import numpy as np
import pytest
from astropy.table import Table

from conftest import models_of
from roman_tweakreg import TweakRegStep, fit_results_table, report
from roman_tweakreg._meta import observer_position
from roman_tweakreg.align import absolute_align
from roman_tweakreg.catalogs import ImageCatalog, normalize_catalog
from roman_tweakreg.matching import FitParameters, _fit
from roman_tweakreg.plane import TangentPlane
from roman_tweakreg.refcat import ReferenceCatalog, read_local_catalog
from roman_tweakreg.refcat._motion import l2_position, place, sigma_at
from roman_tweakreg.refcat._types import standard_table
from roman_tweakreg.testing import simulate

# the Sun is 90 degrees from (270, -30) at the March equinox: parallax fully seen
NEARBY_EPOCH = 2028.22
ABS = FitParameters(searchrad=6.0, separation=0.1, tolerance=0.7)


def sep_mas(ra1, dec1, ra2, dec2):
    from astropy.coordinates import angular_separation

    return np.rad2deg(angular_separation(*np.deg2rad([ra1, dec1, ra2, dec2]))) * 3.6e6


def as_refcat(stars: Table, name="gaia", drop=()) -> ReferenceCatalog:
    """``stars`` (simulate's columns) as a reference catalog at its epoch."""
    cols = {c: np.asarray(stars[c]) for c in stars.colnames if c not in drop}
    cols["RA"], cols["DEC"] = cols.pop("ra"), cols.pop("dec")
    cols["ref_epoch"] = cols.pop("epoch")
    return ReferenceCatalog(standard_table(cols), name, 2016.0)


# -- parallax as seen from Roman ------------------------------------------------------------
def test_place_agrees_with_astropy_seen_from_l2(rng):
    stars = simulate.make_star_field(270.0, -30.0, 0.05, 64000, rng)
    stars["parallax"] = rng.gamma(3.0, 1.0, len(stars))  # a nearby field: 3 mas on average
    observer = simulate.l2_observer(NEARBY_EPOCH)
    truth = simulate.propagate(stars, NEARBY_EPOCH, observer)  # astropy, by another road
    ref = as_refcat(stars)
    ra, dec = ref.positions(NEARBY_EPOCH, observer)
    assert sep_mas(ra, dec, *truth).max() < 0.05
    # the displacement is the parallax (the Sun is 90 degrees away) to 2 %
    bary = ref.positions(NEARBY_EPOCH)
    shift = sep_mas(*bary, ra, dec)
    assert shift.mean() > 2.0
    assert np.allclose(shift / stars["parallax"], 1.0, atol=0.03)
    # stars without parallax are not displaced, without motion not moved
    none = place([270.0], [-30.0], [np.nan], [np.nan], [np.nan], 12.0, observer)
    assert none == (270.0, -30.0)


def test_l2_fallback_is_the_simulators_l2_and_about_one_au():
    for epoch in (2027.0, 2028.22, 2031.7):
        pos = l2_position(epoch)
        assert np.allclose(pos, simulate.l2_observer(epoch), atol=1e-9)
        assert 0.98 < np.linalg.norm(pos) < 1.03


def test_observer_position_read_from_the_ephemeris_or_refused():
    exposures, _ = simulate.make_dataset(1, detectors=("WFI01",), seed=2, epoch=NEARBY_EPOCH,
                                         density=500)  # fmt: skip
    meta = exposures[0].models[0].meta
    pos = observer_position(meta, NEARBY_EPOCH)
    assert np.allclose(pos, simulate.l2_observer(NEARBY_EPOCH), atol=1e-8)
    assert observer_position(meta, NEARBY_EPOCH + 0.1) is None  # 36 days from the exposure
    fake = {"ephemeris": {"time": -999999.0, **{f"spatial_{a}": -999999.0 for a in "xyz"}}}
    assert observer_position(fake, NEARBY_EPOCH) is None  # roman_datamodels' placeholders
    assert observer_position({}, NEARBY_EPOCH) is None


def _nearby_field(seed=11, detectors=("WFI10",)):
    """One exposure of a nearby field at the equinox; its 2016 catalog; the mean
    parallax displacement (mas) of the stars seen from L2 then."""
    rng = np.random.default_rng(seed)
    stars = simulate.make_star_field(270.0, -30.0, 0.35, 16000, rng)
    stars["parallax"] = rng.gamma(3.0, 1.0, len(stars))
    attitude = simulate.Attitude(270.0, -30.0, 60.0)
    exposure = simulate.make_exposure(
        stars, attitude, epoch=NEARBY_EPOCH, pointing_error=(0.6, -0.4, 0.01),
        detectors=detectors, rng=rng,
    )  # fmt: skip
    observer = simulate.l2_observer(NEARBY_EPOCH)
    shown = sep_mas(*simulate.propagate(stars, NEARBY_EPOCH),
                    *simulate.propagate(stars, NEARBY_EPOCH, observer))  # fmt: skip
    return exposure, stars, float(shown.mean())


def _worst_mas(result, exposure):
    with result:
        wcs = []
        for i in range(len(result)):
            model = result.borrow(i)
            wcs.append(model.meta.wcs)
            result.shelve(model, i, modify=False)
    return max(simulate.wcs_difference_mas(w, t) for w, t in zip(wcs, exposure.true_wcs,
                                                                  strict=True))


@pytest.mark.parametrize("ephemeris", [True, False])
def test_nearby_field_aligned_with_parallax_seen_from_l2(tmp_path, caplog, ephemeris):
    exposure, stars, displacement = _nearby_field()
    assert displacement > 2.0
    if not ephemeris:  # the placeholders of a file without one: the L2 fallback, said once
        for model in exposure.models:
            for key in ("time", "spatial_x", "spatial_y", "spatial_z"):
                model.meta.ephemeris[key] = -999999.0
    with_plx, without = tmp_path / "gaia.ecsv", tmp_path / "gaia_noplx.ecsv"
    stars.write(with_plx)
    stars[[c for c in stars.colnames if c != "parallax"]].write(without)
    errors = {}
    for path in (with_plx, without) if ephemeris else (with_plx,):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="roman_tweakreg"):
            result = TweakRegStep.call([m.copy() for m in exposure.models], abs_refcat=str(path))
        assert set(fit_results_table(result)["absolute_status"]) == {"SUCCESS"}
        errors[path.name] = _worst_mas(result, exposure)
        fallback = [r for r in caplog.records if "No usable meta.ephemeris" in r.getMessage()]
        assert len(fallback) == (0 if ephemeris else 1)
    # aligned to better than a quarter of the displacement with parallax, not without
    print(f"nearby field: displacement {displacement:.2f} mas, worst WCS error {errors}")
    assert errors["gaia.ecsv"] < 0.25 * displacement, (errors, displacement)
    if ephemeris:
        assert errors["gaia_noplx.ecsv"] > 0.5 * displacement, (errors, displacement)


def test_service_answer_with_parallax_is_displaced(gaia_service, tmp_path):
    """The service carries positions to EPOCH but not to L2: the step displaces them."""
    exposure, stars, displacement = _nearby_field(seed=12, detectors=("WFI10",))
    gaia_service.field = stars
    result = TweakRegStep.call(
        [m.copy() for m in exposure.models], abs_refcat="GAIADR3", abs_refcat_url=gaia_service.url,
        abs_refcat_cache=str(tmp_path / "cache"),
    )  # fmt: skip
    assert set(fit_results_table(result)["absolute_status"]) == {"SUCCESS"}
    assert _worst_mas(result, exposure) < 0.25 * displacement


# -- weights from the catalogs' errors --------------------------------------------------------
def test_sigma_at_carries_errors_with_their_correlations():
    errors = {"ra_error": np.array([0.1, 1.0, 0.5]), "dec_error": np.array([0.1, 1.0, 0.5]),
              "pmra_error": np.array([0.1, 1.0, np.nan]), "pmdec_error": np.array([0.1, 1.0, 0.2]),
              "ra_pmra_corr": np.array([0.0, -0.5, 0.0])}  # fmt: skip
    sigma = sigma_at(errors, 11.0, 3)
    assert sigma[0] == pytest.approx(np.sqrt(0.01 + 1.21))
    var_ra = 1.0 - 2 * 11 * 0.5 + 121.0
    assert sigma[1] == pytest.approx(np.sqrt(0.5 * (var_ra + 122.0)))
    assert sigma[2] == pytest.approx(np.sqrt(0.25 + 0.5 * 4.84))  # no pmra error: none added
    assert np.isnan(sigma_at({"dec_error": [1.0]}, 1.0, 1)[0])  # no ra_error


def test_reference_errors_read_from_files_and_carried(tmp_path, rng):
    stars = simulate.make_star_field(10.0, 20.0, 0.05, 64000, rng)
    gaia = simulate.gaia_like_catalog(stars, rng)
    gaia.write(tmp_path / "gaia.ecsv")
    cat = read_local_catalog(tmp_path / "gaia.ecsv", 10.0, 20.0, 0.1)
    assert cat.has_errors
    at_2016, at_2027 = cat.sigmas(2016.0), cat.sigmas(2027.0)
    assert np.allclose(at_2016, gaia["ra_error"])
    faint = np.asarray(gaia["mag"]) > 20
    assert faint.any()
    assert (at_2027[faint] > 5.0).all()  # several mas at G > 20 after 11 years
    assert (at_2027[np.asarray(gaia["mag"]) < 16] < 0.5).all()
    assert ReferenceCatalog(Table({"RA": [1.0], "DEC": [2.0]}), "x").sigmas(2027.0) is None


def _gaia_like_pairs(rng, n=300, gap=11.0, image_mas=2.0):
    """Pairs whose reference stars carry Gaia-like errors over ``gap`` years."""
    mag = 16.0 + 5.0 * rng.power(2.5, n)
    pos = 0.02 * 10 ** (0.3 * (mag - 15.0))
    ref_sigma = np.hypot(pos, gap * 1.1 * pos) / 1000.0  # arcsec
    img = rng.uniform(-600.0, 600.0, (n, 2))
    return img, ref_sigma, image_mas / 1000.0


def test_weighted_fit_beats_unweighted_at_an_11_year_gap():
    rng = np.random.default_rng(24)
    pars = FitParameters(searchrad=6.0, fitgeometry="rshift")
    img, ref_sigma, img_sigma = _gaia_like_pairs(rng)
    errors = {"weighted": [], "unweighted": []}
    for _ in range(100):
        total = np.hypot(ref_sigma, img_sigma)
        ref = img + rng.standard_normal((len(img), 2)) * total[:, None]
        for label, sigmas in (("weighted", (ref_sigma, None)), ("unweighted", None)):
            fit = _fit(ref, img, None, img, pars, sigmas).fit
            errors[label].append(1000.0 * np.hypot(*fit["shift"]))
    rms = {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in errors.items()}
    # 0.44 vs 0.68 mas here: the faint stars' 11-year proper-motion errors weigh little
    assert rms["weighted"] < 0.75 * rms["unweighted"], rms


def test_weighted_absolute_fit_is_closer_to_the_truth_on_a_simulated_field():
    """Gaia-like catalogs (5 realisations of their errors) of one simulated exposure
    11 years after the catalog epoch: the weighted fit's WCS is nearer the truth."""
    exposures, stars = simulate.make_dataset(1, detectors=("WFI01",), seed=5, epoch=2027.0,
                                             density=16000)  # fmt: skip
    (exposure,) = exposures
    rng = np.random.default_rng(6)
    worst = {"weighted": [], "unweighted": []}
    for _ in range(5):
        refcat = as_refcat(simulate.gaia_like_catalog(stars, rng))
        for label, positions in (("weighted", refcat.placed), ("unweighted", refcat.positions)):
            images = [
                ImageCatalog(i, m.meta.filename, "1",
                             normalize_catalog(m.meta["tweakreg_catalog"], m.meta.filename),
                             m.meta.wcs, dict(m.meta.wcsinfo), exposure.epoch,
                             observer=observer_position(m.meta, exposure.epoch))
                for i, m in enumerate(exposure.models)
            ]  # fmt: skip
            plane = TangentPlane(images)
            result = absolute_align(plane, positions, ABS, observers={"1": images[0].observer})
            assert result.status == "SUCCESS"
            assert result.fit["weighting"] == ("errors" if label == "weighted" else "")
            worst[label].append(max(
                simulate.wcs_difference_mas(plane.corrected_wcs(i), t)
                for i, t in enumerate(exposure.true_wcs)
            ))  # fmt: skip
    rms = {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in worst.items()}
    print(f"worst WCS error (mas), rms of 5 catalogs: {rms}")
    assert rms["weighted"] < 0.8 * rms["unweighted"], worst


# -- fits that state their uncertainty --------------------------------------------------------
@pytest.mark.parametrize(("geometry", "weighted"), [("rscale", True), ("general", False)])
def test_stated_uncertainty_matches_the_scatter_of_200_fits(geometry, weighted):
    rng = np.random.default_rng(2024)
    pars = FitParameters(searchrad=6.0, fitgeometry=geometry)
    img = rng.uniform(-600.0, 600.0, (300, 2))
    sigma = rng.uniform(0.001, 0.010, 300)  # arcsec, 1 to 10 mas
    angle, scale = np.deg2rad(0.5 / 3600.0), 1.0 + 2e-6
    matrix = scale * np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    got, stated = [], []
    for _ in range(200):
        ref = img @ matrix.T + [0.1, -0.05] + rng.standard_normal((300, 2)) * sigma[:, None]
        fit = _fit(ref, img, None, img, pars, (sigma, None) if weighted else None).fit
        assert fit["weighting"] == ("errors" if weighted else "")
        got.append([*(1000.0 * fit["shift"]), 3600.0 * fit["<rot>"], fit["<scale>"]])
        stated.append([*fit["shift_sigma_mas"], fit["rot_sigma_arcsec"], fit["scale_sigma"]])
    ratio = np.mean(stated, axis=0) / np.std(got, axis=0)
    assert np.all(np.abs(ratio - 1.0) < 0.2), ratio
    if geometry == "general":
        assert fit["skew_sigma_arcsec"] > 0


def test_step_records_plausible_uncertainties(two_exposures, tmp_path, caplog):
    exposures, stars = two_exposures
    path = tmp_path / "gaia.ecsv"
    stars.write(path)
    with caplog.at_level(logging.INFO, logger="roman_tweakreg"):
        result = TweakRegStep.call(models_of(exposures), abs_refcat=str(path))
    table = fit_results_table(result)
    with result:
        model = result.borrow(0)
        fit = model.meta.wcs_fit_results
        result.shelve(model, 0, modify=False)
    for phase in ("relative", "absolute"):
        own = fit[phase]
        if own["status"] != "SUCCESS":
            continue
        sx, sy = own["shift_sigma_mas"]
        # about rms / sqrt(2 pairs) for a shift measured about the fit's centre (per axis);
        # the absolute fit is shared by the two groups: twice the pairs of this one's
        pairs = own["nmatches"] * (2 if phase == "absolute" else 1)
        floor = 1000.0 * own["rmse"] / np.sqrt(2 * pairs)
        assert 0.8 * floor < sx < 10 * floor, (phase, own)
        assert 0.8 * floor < sy < 10 * floor, (phase, own)
        assert 0 < own["rot_sigma_arcsec"] < 0.1
        # the table rounds mas to 0.001
        assert table[f"{phase}_shift_x_sigma"][0] == pytest.approx(sx, abs=5e-4)
        assert table[f"{phase}_shift_y_sigma"][0] == pytest.approx(sy, abs=5e-4)
    entries = report.build_report(result, parameters={})["images"]
    rows = [r for r in report.group_rows(entries) if r["phase"] == "absolute"]
    assert rows[0]["shift_x_sigma_mas"] == pytest.approx(fit["absolute"]["shift_sigma_mas"][0])
    assert rows[0]["rotation_sigma_arcsec"] == pytest.approx(fit["absolute"]["rot_sigma_arcsec"])
    text = report.format_report(entries, "table")
    # on a line under the fit's row: "± x 0.03 mas, y 0.03 mas, rot 0.0001 arcsec"
    assert f"    ± x {rows[0]['shift_x_sigma_mas']:.2f} mas, y " in text
    assert f"y {rows[0]['shift_y_sigma_mas']:.2f} mas, rot " in text
    lines = [r.getMessage() for r in caplog.records if "fit" in r.getMessage()]
    assert any(" ± " in m and m.startswith("Absolute fit") for m in lines), lines


def test_hats_catalog_gives_the_same_placed_stars_as_a_file(tmp_path, rng):
    from test_refcat import write_hats

    stars = simulate.make_star_field(150.0, 2.0, 0.3, 20000, rng)
    gaia = simulate.gaia_like_catalog(stars, rng)
    write_hats(tmp_path / "hats", gaia, order=6)
    gaia.write(tmp_path / "gaia.ecsv")
    observer = simulate.l2_observer(2027.0)
    placed = []
    for where in ("hats", "gaia.ecsv"):
        cat = read_local_catalog(tmp_path / where, 150.0, 2.0, 0.2)
        order = np.argsort(np.asarray(cat.table["objID"]))
        placed.append([np.asarray(v)[order] for v in cat.placed(2027.0, observer)])
    hats, ecsv = placed
    assert len(hats[0]) > 500
    assert all(np.array_equal(a, b) for a, b in zip(hats, ecsv, strict=True))
    assert np.nanmax(hats[2]) > 5.0  # the faint stars' errors, carried 11 years
