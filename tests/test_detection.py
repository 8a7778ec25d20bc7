"""Source detection on simulated WFI-like images: completeness, centroid accuracy, masks, I/O.

The simulated images (:func:`simulate`) are 512x512 pixels with a sky of
100-250 e- (a gradient), read noise 8 e-, Poisson noise, a PSF that is a
pixel-integrated Moffat (FWHM 1.8 px, beta 2.5: undersampled and with wings,
unlike the Gaussian the detector assumes), isolated stars (>= 10 px apart)
whose S/N is drawn log-uniformly in [3, 1000], a bad column, NaN pixels and
bright cosmic-ray blobs, all flagged DO_NOT_USE.

The S/N of an injected star is the optimal (PSF-weighted) one,
``sqrt(sum_i (F p_i)^2 / (sky_i + F p_i + rn^2))``: the S/N of a PSF fit
with known PSF and position, the most any measurement can reach.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.table import Table
from scipy.spatial import cKDTree

from roman_tweakreg.detection import (
    DetectionParameters,
    catalog_filename,
    detect_sources,
    write_catalog,
)
from roman_tweakreg.errors import InvalidParameterError

SHAPE = (512, 512)
FWHM, BETA, READ_NOISE, HALF = 1.8, 2.5, 8.0, 7
MATCH_RADIUS = 0.5  # px


def moffat_prf(dx, dy, fwhm=FWHM, beta=BETA, half=HALF, oversample=5):
    """Unit-flux Moffat integrated over pixels, centred (dx, dy) off the central pixel."""
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    n = 2 * half + 1
    sub = (np.arange(n * oversample) + 0.5) / oversample - 0.5 - half
    r2 = (sub[None, :] - dx) ** 2 + (sub[:, None] - dy) ** 2
    density = (beta - 1) / (np.pi * alpha**2) * (1 + r2 / alpha**2) ** (-beta)
    return density.reshape(n, oversample, n, oversample).mean(axis=(1, 3))


def simulate(seed, n_stars=250, min_sep=10.0, defects=True):
    """A seeded image; returns data, dq, err and the truth table (x, y, flux, snr)."""
    rng = np.random.default_rng(seed)
    ny, nx = SHAPE
    yy, xx = np.mgrid[0:ny, 0:nx]
    sky = 100.0 + 100.0 * (xx / nx + 0.5 * yy / ny)
    positions = []
    while len(positions) < n_stars:
        p = rng.uniform(HALF + 3, np.array([nx, ny]) - HALF - 4)
        if all(np.hypot(*(p - q)) >= min_sep for q in positions):
            positions.append(p)
    x, y = np.array(positions).T
    target = np.exp(rng.uniform(np.log(3.0), np.log(1000.0), n_stars))
    model, flux, snr = sky.copy(), np.empty(n_stars), np.empty(n_stars)
    for i in range(n_stars):
        ix, iy = round(x[i]), round(y[i])
        box = np.s_[iy - HALF : iy + HALF + 1, ix - HALF : ix + HALF + 1]
        prf, var0 = moffat_prf(x[i] - ix, y[i] - iy), sky[box] + READ_NOISE**2
        lo, hi = 1.0, 1e8  # bisect (in log) the flux giving the target S/N
        for _ in range(50):
            f = np.sqrt(lo * hi)
            s = np.sqrt(np.sum((f * prf) ** 2 / (var0 + f * prf)))
            lo, hi = (f, hi) if s < target[i] else (lo, f)
        flux[i], snr[i] = f, s
        model[box] += f * prf
    data = rng.poisson(model).astype(float) + rng.normal(0.0, READ_NOISE, SHAPE)
    err = np.sqrt(model + READ_NOISE**2)
    dq = np.zeros(SHAPE, np.uint32)
    if defects:
        dq[:, 300] |= 1  # a dead column
        data[:, 300] = 0.0
        for cx, cy in rng.integers(20, 490, (15, 2)):  # cosmic-ray blobs
            data[cy : cy + 2, cx : cx + 2] += 5e4
            dq[cy : cy + 2, cx : cx + 2] |= 1 | 4  # DO_NOT_USE | JUMP_DET
        for cx, cy in rng.integers(0, 512, (20, 2)):
            data[cy, cx] = np.nan
            dq[cy, cx] |= 1
    truth = Table({"x": x, "y": y, "flux": flux, "snr": snr})
    return data, dq, err, truth


def match(catalog, truth):
    """Nearest detection of each star: (matched within MATCH_RADIUS, its index, distance)."""
    dist, index = cKDTree(np.column_stack([catalog["x"], catalog["y"]])).query(
        np.column_stack([truth["x"], truth["y"]])
    )
    return dist < MATCH_RADIUS, index


def near_flagged(truth, dq, radius=2):
    """Stars whose true centre is within ``radius`` px of a DO_NOT_USE pixel."""
    from scipy.ndimage import binary_dilation

    bad = binary_dilation((dq & 1) != 0, np.ones((2 * radius + 1,) * 2, bool))
    return bad[np.rint(truth["y"]).astype(int), np.rint(truth["x"]).astype(int)]


@pytest.fixture(scope="module")
def measured():
    """Detections with default parameters on four images, pooled (~1000 stars)."""
    rows = []
    for seed in range(4):
        data, dq, err, truth = simulate(seed)
        catalog = detect_sources(data, dq, err)
        found, index = match(catalog, truth)
        dx = np.where(found, catalog["x"][index] - truth["x"], np.nan)
        dy = np.where(found, catalog["y"][index] - truth["y"], np.nan)
        spurious = (
            cKDTree(np.column_stack([truth["x"], truth["y"]])).query(
                np.column_stack([catalog["x"], catalog["y"]])
            )[0]
            > 1.5
        )
        rows.append(
            (truth, found, dx, dy, near_flagged(truth, dq), int(spurious.sum()), catalog, dq)
        )
    return rows


def pooled(measured):
    snr = np.concatenate([r[0]["snr"] for r in measured])
    found = np.concatenate([r[1] for r in measured])
    err = np.hypot(
        np.concatenate([r[2] for r in measured]), np.concatenate([r[3] for r in measured])
    )
    usable = ~np.concatenate([r[4] for r in measured])
    return snr, found, err, usable


def test_completeness(measured):
    snr, found, _, usable = pooled(measured)
    fraction = found[usable & (snr >= 10)].mean()
    bright = found[usable & (snr >= 15)].mean()
    print(f"recovered: S/N>=10 {fraction:.3f}, S/N>=15 {bright:.3f}")
    for lo, hi in [(5, 8), (8, 10), (10, 12), (12, 15), (15, 20), (20, np.inf)]:
        sel = usable & (snr >= lo) & (snr < hi)
        print(f"  S/N {lo}-{hi}: {found[sel].mean():.2f} of {sel.sum()}")
    assert fraction >= 0.95
    assert bright >= 0.99
    assert found[usable & (snr < 5)].mean() < 0.1  # the threshold means something


def test_centroid_accuracy(measured):
    snr, found, err, usable = pooled(measured)
    rms = {
        lim: float(np.sqrt(np.mean(err[found & usable & (snr >= lim)] ** 2)))
        for lim in (10, 20, 100)
    }
    print("centroid rms (px): " + ", ".join(f"S/N>={k}: {v:.4f}" for k, v in rms.items()))
    assert rms[10] < 0.07  # noise-limited: the optimal per-axis error at S/N 10 is ~0.1 px
    assert rms[20] < 0.05
    assert rms[100] < 0.02


@pytest.mark.parametrize("kernel_fwhm", [1.5, 2.5])
def test_centroids_robust_to_kernel_fwhm(kernel_fwhm):
    """The fit's FWHM is free: a filter narrower or wider than the PSF keeps centroids good."""
    data, dq, err, truth = simulate(0)
    catalog = detect_sources(data, dq, err, DetectionParameters(kernel_fwhm=kernel_fwhm))
    found, index = match(catalog, truth)
    err2d = np.hypot(catalog["x"][index] - truth["x"], catalog["y"][index] - truth["y"])
    usable = found & ~near_flagged(truth, dq)
    for lim, limit in ((20, 0.05), (100, 0.02)):
        sel = usable & (truth["snr"] >= lim)
        assert np.sqrt(np.mean(err2d[sel] ** 2)) < limit
    assert found[~near_flagged(truth, dq) & (truth["snr"] >= 15)].mean() >= 0.95


def test_few_false_detections_and_none_on_flagged_pixels(measured):
    for _, _, _, _, _, n_spurious, catalog, dq in measured:
        assert n_spurious <= 2
        ix, iy = np.rint(catalog["x"]).astype(int), np.rint(catalog["y"]).astype(int)
        assert not np.any(dq[iy, ix] & 1)
        assert np.all(np.diff(catalog["flux"]) <= 0)
        assert set(catalog.colnames) >= {"x", "y", "flux"}


def test_do_not_use_pixels_make_no_detection():
    rng = np.random.default_rng(7)
    data = rng.normal(100.0, 10.0, (256, 256))
    dq = np.zeros(data.shape, np.uint16)
    for cx, cy in rng.integers(10, 240, (12, 2)):  # bright 3x3 blobs: star-like if not flagged
        data[cy - 1 : cy + 2, cx - 1 : cx + 2] += 2e4 * moffat_prf(0, 0, half=1) / 0.5
        dq[cy - 1 : cy + 2, cx - 1 : cx + 2] |= 1
    data[:, 100] = 1e5
    dq[:, 100] |= 1
    assert len(detect_sources(data)) >= 12  # unflagged they are found
    assert len(detect_sources(data, dq=dq)) == 0
    assert len(detect_sources(np.where(dq & 1, np.nan, data))) == 0


def test_unflagged_hot_pixels_rejected_as_too_sharp():
    rng = np.random.default_rng(8)
    data = rng.normal(100.0, 10.0, (256, 256))
    data[rng.integers(5, 250, 30), rng.integers(5, 250, 30)] += 5e3
    assert len(detect_sources(data)) == 0


def test_brightest_and_peakmax():
    data, dq, err, _ = simulate(11, n_stars=120, defects=False)
    full = detect_sources(data, dq, err)
    top = detect_sources(data, dq, err, DetectionParameters(brightest=10))
    assert len(top) == 10
    np.testing.assert_allclose(top["flux"], full["flux"][:10])
    limit = float(np.median(full["peak"]))
    capped = detect_sources(data, dq, err, DetectionParameters(peakmax=limit))
    assert 0 < len(capped) < len(full)
    assert np.all(capped["peak"] <= limit)
    assert len(detect_sources(data, dq, err, DetectionParameters(peakmax=limit, brightest=3))) == 3


def test_inputs():
    data, _, _, _ = simulate(12, n_stars=40, defects=False)
    plain = detect_sources(data)
    np.testing.assert_allclose(detect_sources(data * u.electron)["x"], plain["x"])
    with pytest.raises(ValueError, match="2-D"):
        detect_sources(data[None])
    with pytest.raises(ValueError, match="dq shape"):
        detect_sources(data, dq=np.zeros((3, 3), np.uint32))
    assert len(detect_sources(np.full((64, 64), np.nan))) == 0
    empty = detect_sources(np.random.default_rng(0).normal(0, 1, (64, 64)))
    assert len(empty) == 0
    assert "x" in empty.colnames


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel_fwhm": 0.1}, r"kernel_fwhm=0\.1.*\[0\.8, 10\]"),
        ({"snr_threshold": 0}, "snr_threshold.*> 0"),
        ({"snr_threshold": float("nan")}, "snr_threshold.*finite"),
        ({"bkg_boxsize": 4}, "bkg_boxsize.*>= 8"),
        ({"bkg_filter_size": 2}, "bkg_filter_size.*odd"),
        ({"min_separation": 0.5}, "min_separation.*>= 1"),
        ({"max_peak_fraction": 1.5}, r"max_peak_fraction.*\(0, 1\]"),
        ({"aperture_radius": -1}, "aperture_radius.*> 0"),
        ({"brightest": 0}, "brightest.*integer >= 1"),
        ({"brightest": 2.5}, "brightest.*integer >= 1"),
        ({"peakmax": "big"}, "peakmax.*number"),
        ({"snr_threshold": True}, "snr_threshold.*number"),
    ],
)
def test_invalid_parameters(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        DetectionParameters(**kwargs).validate()
    with pytest.raises(InvalidParameterError, match=match):
        detect_sources(np.zeros((32, 32)), params=DetectionParameters(**kwargs))


def test_parameters_frozen_and_defaults_valid():
    params = DetectionParameters()
    assert params.validate() is params
    with pytest.raises(AttributeError):
        params.snr_threshold = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("catalog_format", "ext"), [("ascii.ecsv", "ecsv"), ("parquet", "parquet")]
)
def test_write_catalog_round_trip(tmp_path, catalog_format, ext):
    data, _, _, _ = simulate(13, n_stars=30, defects=False)
    table = detect_sources(data)
    path = catalog_filename(
        "r0000101001001001001_0001_wfi01_cal.asdf", tmp_path / "cats", catalog_format
    )
    assert path == tmp_path / "cats" / f"r0000101001001001001_0001_wfi01_cal_cat.{ext}"
    assert write_catalog(table, path, catalog_format) == path
    if ext == "parquet":
        import pyarrow.parquet as pq

        back = Table(pq.read_table(path).to_pydict())
    else:
        back = Table.read(path, format=catalog_format)
    assert back.colnames == table.colnames
    for name in table.colnames:
        np.testing.assert_array_equal(back[name], table[name])
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    write_catalog(table[:3], path, catalog_format)  # overwrite in place
    assert (
        len(Table.read(path, format=catalog_format) if ext == "ecsv" else pq.read_table(path)) == 3
    )


def test_write_catalog_failure_leaves_nothing(tmp_path):
    path = tmp_path / "x_cat.ecsv"
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever astropy raises
        write_catalog(Table({"x": [1.0]}), path, "no-such-format")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("image", "catalog_format", "expected"),
    [
        ("dir/a_cal.asdf", "ascii.ecsv", "a_cal_cat.ecsv"),
        ("a_cal.ASDF", "fits", "a_cal_cat.fits"),
        ("a_cal", "ascii.csv", "a_cal_cat.csv"),
        ("a.b_cal.asdf", "parquet", "a.b_cal_cat.parquet"),
    ],
)
def test_catalog_filename(image, catalog_format, expected):
    assert catalog_filename(image, "out", catalog_format) == Path("out") / expected
