"""Positions on the PSF's own centre: ePSF reference files (psf_model, override_epsf, CRDS)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.table import Table
from scipy.spatial import cKDTree

from roman_tweakreg import PSFModelError, TweakRegStep
from roman_tweakreg.detection import detect_sources
from roman_tweakreg.psf import find_epsf, read_epsf
from roman_tweakreg.testing import simulate
from roman_tweakreg.testing.epsf import epsf_exposures, render_epsf_stars, write_epsf_file

SHAPE = (256, 256)


def offsets_mpx(x, y, truth_x, truth_y) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (mpx) of the detections from the nearest true stars (within 0.3 px)."""
    dist, index = cKDTree(np.column_stack([truth_x, truth_y])).query(np.column_stack([x, y]))
    ok = dist < 0.3
    return (
        1000.0 * (np.asarray(x)[ok] - np.asarray(truth_x)[index[ok]]),
        1000.0 * (np.asarray(y)[ok] - np.asarray(truth_y)[index[ok]]),
    )


@pytest.fixture(scope="module")
def epsf_file(tmp_path_factory):
    return write_epsf_file(tmp_path_factory.mktemp("epsf") / "wfi01_f158.asdf", SHAPE)


@pytest.fixture(scope="module")
def coma_field():
    """Two exposures of WFI01 whose pixels hold the asymmetric PSF's stars."""
    return epsf_exposures(SHAPE, density=1.5e6)


def test_read_epsf_normalises_and_interpolates_between_grid_points(epsf_file):
    psf = read_epsf(epsf_file, "wfi01", "F158")
    assert (psf.detector, psf.optical_element, psf.spectral_type) == ("WFI01", "F158", "G2V")
    assert psf.stamps.shape == (9, 49, 49)
    np.testing.assert_allclose(psf.stamps.sum(axis=(1, 2)), 16.0, rtol=1e-6)
    grid, weight = psf.corners([0.0, 95.625, 300.0], [255.0, 63.75, -5.0])
    # on a grid point: that stamp only; between: bilinear; outside: clamped to the edge
    assert weight[0, grid[0] == 6].sum() == pytest.approx(1.0)
    assert sorted(grid[1]) == [0, 1, 3, 4]
    np.testing.assert_allclose(weight[1], [0.125, 0.375, 0.125, 0.375])
    assert weight[2, grid[2] == 2].sum() == pytest.approx(1.0)


def test_point_sampled_stamps_are_integrated_over_a_pixel(tmp_path, epsf_file):
    from roman_datamodels import datamodels as rdm

    with rdm.open(epsf_file) as model:
        model.psf = (model.psf / 16.0).astype(np.float32)  # sums to 1: the early format
        model.save(tmp_path / "old.asdf")
    new, old = read_epsf(epsf_file), read_epsf(tmp_path / "old.asdf")
    np.testing.assert_allclose(old.stamps.sum(axis=(1, 2)), 16.0, rtol=1e-6)
    # box of one pixel (4 samples) on top: a lower, wider peak
    assert old.stamps[4].max() < 0.9 * new.stamps[4].max()


def test_epsf_fit_puts_positions_on_the_psf_origin(epsf_file):
    rng = np.random.default_rng(5)
    g = np.arange(16, 248, 16.0)
    x, y = (v.ravel() + rng.uniform(-0.5, 0.5, v.size) for v in np.meshgrid(g, g))
    data, err = render_epsf_stars(SHAPE, x, y, 10 ** rng.uniform(4.5, 5.0, x.size), rng)
    empirical = detect_sources(data, None, err)
    fitted = detect_sources(data, None, err, psf=read_epsf(epsf_file))
    dx0, dy0 = offsets_mpx(empirical["x"], empirical["y"], x, y)
    dx1, dy1 = offsets_mpx(fitted["x"], fitted["y"], x, y)
    assert dx0.size == dx1.size == x.size == 225
    # the symmetric PRF centres the coma-like PSF 0.1-0.15 px off its origin
    assert dx0.mean() > 100
    assert dy0.mean() < -60
    # the ePSF fit: within the noise (about 0.5 mpx per axis here) of the true positions
    assert abs(dx1.mean()) < 1.5
    assert abs(dy1.mean()) < 1.5
    assert np.hypot(dx1, dy1).max() < 30


def test_folder_chooses_the_file_of_the_detector_and_optical_element(tmp_path):
    for det, element in (("WFI01", "F158"), ("WFI02", "F158"), ("WFI01", "F213")):
        write_epsf_file(tmp_path / f"{det}_{element}.asdf", SHAPE, detector=det,
                        optical_element=element)  # fmt: skip
    (tmp_path / "notes.asdf").write_text("not ASDF")
    psf = find_epsf(tmp_path, "WFI02", "F158")
    assert (psf.detector, psf.optical_element) == ("WFI02", "F158")
    assert psf.source.endswith("WFI02_F158.asdf")
    with pytest.raises(
        PSFModelError,
        match=r"psf_model folder .*: no ePSF file for detector WFI03 and optical element "
        r"F158 \(it has: WFI01 F158, WFI01 F213, WFI02 F158\)$",
    ):
        find_epsf(tmp_path, "WFI03", "F158")


def test_file_of_another_detector_is_refused_naming_file_and_detectors(epsf_file):
    with pytest.raises(
        PSFModelError,
        match=r"wfi01_f158\.asdf: ePSF for detector WFI01 and optical element F158, but the "
        r"image is WFI07 F158$",
    ):
        find_epsf(epsf_file, "WFI07", "F158")


def run_step(field, tmp_path, **kwargs):
    models, truths, true_wcs, refcat = field
    models = [m.copy() for m in models]
    tmp_path.mkdir(parents=True, exist_ok=True)
    refcat.write(tmp_path / "refcat.ecsv", overwrite=True)
    result = TweakRegStep.call(
        models,
        abs_refcat=str(tmp_path / "refcat.ecsv"),
        catalog_path=str(tmp_path),
        processes=1,
        tolerance=0.2,  # few stars in 256 x 256 px: a small tolerance for the quality gate
        abs_tolerance=0.2,
        **kwargs,
    )
    out = []
    with result:
        for k in range(len(result)):
            model = result.borrow(k)
            name = model.meta.filename.removesuffix(".asdf")
            catalog = Table.read(tmp_path / f"{name}_cat.ecsv")
            dx, dy = offsets_mpx(catalog["x"], catalog["y"], truths[k]["x"], truths[k]["y"])
            error = simulate.wcs_difference_mas(model.meta.wcs, true_wcs[k])
            out.append((str(model.meta.cal_step.tweakreg), dx, dy, error))
            result.shelve(model, k, modify=False)
    return out


def test_step_without_psf_model_logs_the_convention_offset_once(coma_field, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="roman_tweakreg"):
        images = run_step(coma_field, tmp_path)
    said = [r for r in caplog.records if "PSF-convention offset" in r.getMessage()]
    assert len(said) == 1
    for status, dx, dy, error in images:
        assert status == "COMPLETE"
        assert dx.size > 60
        assert dx.mean() > 100  # the convention offset
        assert dy.mean() < -60
        assert error > 8  # mas: the offset, carried into the WCS


@pytest.mark.parametrize("how", ["override_epsf", "psf_model file", "psf_model folder"])
def test_step_with_an_epsf_aligns_on_the_psf_origin(coma_field, epsf_file, tmp_path, how, caplog):
    if how == "override_epsf":
        kwargs = {"override_epsf": str(epsf_file)}
    elif how == "psf_model file":
        kwargs = {"psf_model": str(epsf_file)}
    else:
        write_epsf_file(tmp_path / "other.asdf", SHAPE, detector="WFI02")
        kwargs = {"psf_model": str(epsf_file.parent)}
    with caplog.at_level(logging.INFO, logger="roman_tweakreg"):
        images = run_step(coma_field, tmp_path, **kwargs)
    assert not [r for r in caplog.records if "PSF-convention offset" in r.getMessage()]
    for status, dx, dy, error in images:
        assert status == "COMPLETE"
        assert dx.size > 60
        assert abs(dx.mean()) < 12  # noise: 2-4 mpx per axis here
        assert abs(dy.mean()) < 12
        # mas: the fit's noise with ~70 stars on 256 x 256 px (0.7-4.3 mas seen over
        # variants of the simulated field); > 8 mas without the ePSF (the test above)
        assert error < 5


def test_missing_psf_model_or_override_is_a_clear_error(coma_field, tmp_path):
    with pytest.raises(PSFModelError, match=r"^psf_model='/nonexistent/epsf': no such file"):
        TweakRegStep.call(coma_field[0][:1], psf_model="/nonexistent/epsf")
    with pytest.raises(PSFModelError, match=r"^override_epsf='.*/missing\.asdf': no such file$"):
        TweakRegStep.call(coma_field[0][:1], override_epsf=str(tmp_path / "missing.asdf"))
    other = write_epsf_file(tmp_path / "wfi02.asdf", SHAPE, detector="WFI02")
    with pytest.raises(
        PSFModelError,
        match=r"wfi02\.asdf: ePSF for detector WFI02 and optical element F158, but the image "
        r"is WFI01 F158$",
    ):
        run_step(coma_field, tmp_path / "run", psf_model=str(other))


def test_no_crds_configured_never_asks_crds(coma_field, tmp_path, monkeypatch):
    from stpipe import crds_client

    def forbidden(*args, **kwargs):
        raise AssertionError("CRDS was asked")

    monkeypatch.delenv("CRDS_SERVER_URL", raising=False)
    monkeypatch.delenv("CRDS_PATH", raising=False)
    monkeypatch.setattr(crds_client, "get_reference_file", forbidden)
    assert [s for s, *_ in run_step(coma_field, tmp_path)] == ["COMPLETE", "COMPLETE"]


def test_crds_epsf_used_when_configured_and_unreachable_crds_falls_back(
    coma_field, epsf_file, tmp_path, monkeypatch, caplog
):
    from stpipe import crds_client

    asked = []

    def crds_answers(parameters, reftype, observatory):
        asked.append((parameters["roman.meta.instrument.detector"], reftype, observatory))
        return str(epsf_file)

    monkeypatch.setenv("CRDS_SERVER_URL", "http://127.0.0.1:9")
    monkeypatch.setattr(crds_client, "get_reference_file", crds_answers)
    images = run_step(coma_field, tmp_path / "reachable")
    assert asked == [("WFI01", "epsf", "roman")] * 2
    assert all(abs(dx.mean()) < 12 and error < 5 for _, dx, _, error in images)

    def crds_down(parameters, reftype, observatory):
        asked.append("down")
        raise crds_client.CrdsError("server not reachable")

    asked.clear()
    monkeypatch.setattr(crds_client, "get_reference_file", crds_down)
    with caplog.at_level(logging.INFO, logger="roman_tweakreg"):
        images = run_step(coma_field, tmp_path / "unreachable")
    assert asked == ["down"]  # once: the other image does not ask again
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warned if "CRDS" in w] == [
        "CRDS epsf reference not available (CrdsError: server not reachable): empirical PRF used"
    ]
    assert all(s == "COMPLETE" and dx.mean() > 100 for s, dx, *_ in images)


# stpipe's CRDS client calls crds's deprecated cache lock (a DeprecationWarning of crds 14)
@pytest.mark.filterwarnings("ignore:'get_cache_lock' is deprecated:DeprecationWarning")
def test_crds_without_server_or_cache_falls_back_in_one_line(
    coma_field, tmp_path, monkeypatch, caplog
):
    # the real CRDS client: a closed local port, an empty cache (CRDS then calls sys.exit)
    monkeypatch.setenv("CRDS_SERVER_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CRDS_PATH", str(tmp_path / "crds_cache"))
    with caplog.at_level(logging.INFO, logger="roman_tweakreg"):
        images = run_step(coma_field, tmp_path / "run")
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("roman_tweakreg")]
    assert [m for m in ours if "CRDS" in m] == [
        "CRDS epsf reference not available (SystemExit: -1): empirical PRF used"
    ]
    assert [s for s, *_ in images] == ["COMPLETE", "COMPLETE"]


def test_fit_epsf_agrees_with_photutils_gridded_psf_model(epsf_file):
    from astropy.nddata import NDData
    from photutils.psf import GriddedPSFModel, PSFPhotometry

    from roman_tweakreg.detection import fit_epsf
    from roman_tweakreg.testing.epsf import coma_epsf

    psf = read_epsf(epsf_file)
    rng = np.random.default_rng(2)
    g = np.arange(20, 240, 40.0)
    x, y = (v.ravel() + rng.uniform(-0.5, 0.5, v.size) for v in np.meshgrid(g, g))
    image, box = np.zeros(SHAPE), np.arange(-8, 9)
    for x0, y0 in zip(x, y, strict=True):  # noise-free stars of the asymmetric PSF
        cols, rows = round(x0) + box, round(y0) + box
        image[np.ix_(rows, cols)] += 1e4 * coma_epsf(
            cols[None, :] - x0, rows[:, None] - y0, x0, y0, SHAPE
        )
    meta = {"grid_xypos": np.column_stack([psf.grid_x, psf.grid_y]), "oversampling": 4}
    photometry = PSFPhotometry(GriddedPSFModel(NDData(psf.stamps, meta=meta)), fit_shape=7)
    start = Table({"x": x + 0.2, "y": y - 0.2, "flux": np.full(x.size, 1e4)})
    theirs = photometry(image, init_params=start)
    ours = fit_epsf(image, None, None, x + 0.2, y - 0.2, psf, 7)
    assert ours["converged"].all()
    apart = np.hypot(ours["x_fit"] - theirs["x_fit"], ours["y_fit"] - theirs["y_fit"])
    assert apart.max() < 0.001  # px (0.16 mpx measured)
    assert np.abs(ours["x_fit"] - x).max() < 0.002  # the truth: interpolation of 4x samples
    assert np.abs(ours["y_fit"] - y).max() < 0.002


def test_grid_that_is_not_rectangular_or_does_not_match_the_stamps(tmp_path, epsf_file):
    from roman_datamodels import datamodels as rdm

    with rdm.open(epsf_file) as model:
        model.meta.pixel_x = [*model.meta.pixel_x[:8], 17.0]  # one position off the grid
        model.save(tmp_path / "skewed.asdf")
        model.meta.pixel_x, model.meta.pixel_y = [0.0, 255.0], [0.0, 255.0]
        model.save(tmp_path / "short.asdf")
    with pytest.raises(
        PSFModelError,
        match=r"skewed\.asdf: the grid positions \(meta.pixel_x, meta.pixel_y\) do not form a "
        r"rectangular grid \(9 positions, 4 x values, 3 y values\)$",
    ):
        read_epsf(tmp_path / "skewed.asdf")
    with pytest.raises(
        PSFModelError,
        match=r"short\.asdf: stamps of shape \(9, 49, 49\) do not match 2 x and 2 y grid",
    ):
        read_epsf(tmp_path / "short.asdf")
