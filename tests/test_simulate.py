import numpy as np
import pytest
from astropy import coordinates as coord

from roman_tweakreg.testing import simulate


def test_siaf_has_18_detectors_with_v2v3_reference_points():
    siaf = simulate.load_siaf()
    assert sorted(siaf) == list(simulate.DETECTORS)
    assert siaf["WFI01"]["V2Ref_arcsec"] == pytest.approx(1312.9491452485)


def test_detector_wcs_round_trip_and_pixel_scale():
    att = simulate.Attitude(270.0, -30.0, 60.0)
    wcs = simulate.detector_wcs("WFI05", att.wcsinfo("WFI05"))
    assert wcs.available_frames == ["detector", "v2v3", "world"]
    ra, dec = wcs([10.0, 2044.0, 4000.0], [20.0, 2044.0, 3000.0])
    x, y = wcs.invert(ra, dec)
    np.testing.assert_allclose(x, [10.0, 2044.0, 4000.0], atol=1e-3)
    np.testing.assert_allclose(y, [20.0, 2044.0, 3000.0], atol=1e-3)
    ra2, dec2 = wcs(2045.0, 2044.0)
    scale = np.hypot((ra2 - ra[1]) * np.cos(np.deg2rad(dec[1])), dec2 - dec[1]) * 3600
    assert scale == pytest.approx(0.11, abs=0.005)


def test_wcsinfo_reproduces_the_attitude():
    att = simulate.Attitude(10.0, 45.0, 120.0)
    for det in ("WFI01", "WFI18"):
        wcs = simulate.detector_wcs(det, att.wcsinfo(det))
        v2v3_to_sky = wcs.get_transform("v2v3", "world")
        np.testing.assert_allclose(
            v2v3_to_sky(1500.0, -900.0), att.model()(1500.0, -900.0), atol=1e-10
        )


def test_injected_error_and_catalog_sizes(two_exposures):
    exposures, _stars = two_exposures
    for exp in exposures:
        for model, true_wcs in zip(exp.models, exp.true_wcs, strict=False):
            n = len(model.meta["tweakreg_catalog"])
            assert 800 < n < 1300  # ~1000 stars per detector
            err = simulate.wcs_difference_mas(model.meta.wcs, true_wcs)
            assert 10 < err < 1000 * 4  # shift <= 1", roll <= 0.05 deg at <= 0.3 deg


def test_old_simulate_module_is_a_deprecated_alias():
    import importlib
    import sys

    sys.modules.pop("roman_tweakreg.simulate", None)
    with pytest.warns(DeprecationWarning, match="moved to roman_tweakreg.testing.simulate"):
        old = importlib.import_module("roman_tweakreg.simulate")
    assert old.make_dataset is simulate.make_dataset
    assert old.propagate is simulate.propagate
    assert old.DETECTORS == simulate.DETECTORS
    assert set(old.__all__) == set(simulate.__all__)


def test_simulated_models_are_calibrated_up_to_tweakreg():
    exposures, _ = simulate.make_dataset(1, detectors=("WFI01",), seed=2, max_sources=50)
    cal_step = exposures[0].models[0].meta.cal_step
    assert cal_step.tweakreg == "INCOMPLETE"
    assert cal_step.dark_decay == "COMPLETE"
    others = {step: str(cal_step[step]) for step in cal_step if step != "tweakreg"}
    assert len(others) > 10
    assert set(others.values()) == {"COMPLETE"}


def _pointing_errors_mas(ra, dec, error):
    rng = np.random.default_rng(0)
    stars = simulate.make_star_field(ra, dec, 0.55, 2000.0, rng)
    exposure = simulate.make_exposure(stars, simulate.Attitude(ra, dec, 60.0),
                                      pointing_error=error, detectors=("WFI01", "WFI18"), rng=rng)
    return np.array([simulate.wcs_difference_mas(m.meta.wcs, t)
                     for m, t in zip(exposure.models, exposure.true_wcs, strict=True)])


@pytest.mark.parametrize(("ra", "dec"), [(10.0, 89.9), (10.0, -89.9), (0.0, 89.99), (359.99, 10.0)])
def test_pointing_errors_are_the_intended_ones_at_any_declination(ra, dec):
    # issue 28: near the poles the simulator's errors were 4-13" (a roll from keeping the
    # angle to the local north), beyond abs_searchrad
    for error in [(0.5, -0.3, 0.0), (-0.6, 0.2, 0.0), (0.0, 0.0, 0.02), (0.4, 0.4, -0.03)]:
        errors = _pointing_errors_mas(ra, dec, error)
        # the same as at Dec -30, detector by detector, to 1 mas
        np.testing.assert_allclose(errors, _pointing_errors_mas(270.0, -30.0, error), atol=1.0)
        if error[2] == 0.0:  # a pure offset moves every detector by it
            np.testing.assert_allclose(errors, 1000 * np.hypot(*error[:2]), atol=1.0)
        att = simulate.Attitude(ra, dec, 60.0)
        moved = att.mispointed(*error)
        sep = coord.angular_separation(*np.deg2rad([att.ra, att.dec, moved.ra, moved.dec]))
        assert np.rad2deg(sep) * 3.6e6 == pytest.approx(1000 * np.hypot(*error[:2]), abs=0.01)
