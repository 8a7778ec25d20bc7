"""An asymmetric, position-dependent PSF, its ePSF reference file and images of it.

The PSF is a sum of circular Gaussians: a core on the star's position (the point
the WCS maps) and a wider coma-like lobe offset from it, so that the PSF's
centroid (and the centre a symmetric model fits) is not its origin.  The lobe's
offset varies linearly across the detector.  Pixel values are integrated over
the pixel exactly (``erf``), so images and ePSF stamps are exact and independent
of the detection's interpolation.  :func:`write_epsf_file` writes the ePSF as a
roman_datamodels ``EpsfRefModel`` (romancal's CRDS ``epsf`` format) on a grid of
detector positions; :func:`render_epsf_stars` renders stars with noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import erf

if TYPE_CHECKING:
    import os

__all__ = ["coma_epsf", "epsf_exposures", "render_epsf_stars", "write_epsf_file"]

#: (flux fraction, sigma px) of the core and of the lobe.
_CORE = (0.6, 0.65)
_LOBE = (0.4, 1.3)


def _lobe_offset(x, y, shape):
    """The lobe's offset (px) from the star at detector position ``(x, y)``."""
    u = 2.0 * np.asarray(x, float) / max(shape[1] - 1, 1) - 1.0
    v = 2.0 * np.asarray(y, float) / max(shape[0] - 1, 1) - 1.0
    return 0.55 + 0.25 * u, -0.35 + 0.15 * v


def _pixel_integral(d, sigma):
    s = np.sqrt(2.0) * sigma
    return 0.5 * (erf((d + 0.5) / s) - erf((d - 0.5) / s))


def coma_epsf(dx, dy, x, y, shape) -> np.ndarray:
    """The PSF of a star at detector position ``(x, y)``, integrated over the pixel
    whose centre is ``(dx, dy)`` px from the star (arrays broadcast)."""
    ox, oy = _lobe_offset(x, y, shape)
    core = _CORE[0] * _pixel_integral(dx, _CORE[1]) * _pixel_integral(dy, _CORE[1])
    lobe = _LOBE[0] * _pixel_integral(dx - ox, _LOBE[1]) * _pixel_integral(dy - oy, _LOBE[1])
    return core + lobe


def write_epsf_file(
    path: str | os.PathLike,
    shape: tuple[int, int],
    *,
    detector: str = "WFI01",
    optical_element: str = "F158",
    grid: int = 3,
    oversample: int = 4,
    half: int = 6,
) -> Path:
    """Write the ePSF of :func:`coma_epsf` as an ``EpsfRefModel`` ASDF file.

    Stamps of ``2 half oversample + 1`` samples, on a ``grid x grid`` grid of
    detector positions spanning an image of ``shape``; one defocus (0) and one
    spectral type (``G2V``).
    """
    from roman_datamodels import datamodels as rdm

    xs = np.linspace(0, shape[1] - 1, grid)
    ys = np.linspace(0, shape[0] - 1, grid)
    gx, gy = np.meshgrid(xs, ys)
    gx, gy = gx.ravel(), gy.ravel()
    d = (np.arange(2 * half * oversample + 1) - half * oversample) / oversample
    stamps = np.stack(
        [coma_epsf(d[None, :], d[:, None], x, y, shape) for x, y in zip(gx, gy, strict=True)]
    )
    model = rdm.EpsfRefModel.create_fake_data(shape=(1, 1, *stamps.shape))
    model.psf = stamps[None, None].astype(np.float32)  # samples of one pixel lattice sum to 1
    model.meta.instrument.detector = detector
    model.meta.instrument.optical_element = optical_element
    model.meta["oversample"] = oversample
    model.meta["spectral_type"] = ["G2V"]
    model.meta["defocus"] = [0]
    model.meta.pixel_x = [float(v) for v in gx]
    model.meta.pixel_y = [float(v) for v in gy]
    path = Path(path)
    model.save(path)
    return path


def render_epsf_stars(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    rng: np.random.Generator,
    *,
    sky: float = 50.0,
    read_noise: float = 5.0,
    half: int = 7,
) -> tuple[np.ndarray, np.ndarray]:
    """Stars of :func:`coma_epsf` (each with the PSF of its own position) with noise.

    Returns the float32 image and its noise (``sqrt(model + read_noise**2)``).
    """
    ny, nx = shape
    model = np.full(shape, sky, dtype=float)
    box = np.arange(-half, half + 1)
    for x0, y0, f in zip(x, y, flux, strict=True):
        ix, iy = int(np.rint(x0)), int(np.rint(y0))
        cols, rows = ix + box, iy + box
        stamp = f * coma_epsf(cols[None, :] - x0, rows[:, None] - y0, x0, y0, shape)
        keep_r, keep_c = (rows >= 0) & (rows < ny), (cols >= 0) & (cols < nx)
        model[np.ix_(rows[keep_r], cols[keep_c])] += stamp[np.ix_(keep_r, keep_c)]
    data = rng.poisson(model) + rng.normal(0.0, read_noise, shape)
    return data.astype(np.float32), np.sqrt(model + read_noise**2).astype(np.float32)


def epsf_exposures(
    shape: tuple[int, int] = (256, 256),
    *,
    detector: str = "WFI01",
    optical_element: str = "F158",
    n_exposures: int = 2,
    density: float = 2.5e6,
    flux: tuple[float, float] = (2e4, 1e5),
    seed: int = 11,
):
    """Exposures of one detector whose first ``shape`` pixels hold stars of :func:`coma_epsf`.

    Like :func:`roman_tweakreg.testing.pixels.write_pixel_association`, in memory:
    dithered exposures (2 arcsec along RA and 1.5 along Dec each) with pointing
    errors, each image's stars rendered at their true positions with noise, no
    catalog (the step detects the sources), ``meta.instrument.optical_element``
    set.

    Returns
    -------
    models : list
        The ImageModels.
    truths : list of astropy.table.Table
        Each image's true star positions ``x``, ``y``.
    true_wcs : list
        Each image's true WCS.
    refcat : astropy.table.Table
        The star field at the exposures' epoch (``RA``, ``DEC``).
    """
    from astropy.table import Table

    from . import simulate

    rng = np.random.default_rng(seed)
    attitude = simulate.Attitude(270.0, -30.0, 60.0)
    wcs = simulate.detector_wcs(detector, attitude.wcsinfo(detector))
    ra, dec = wcs(shape[1] / 2, shape[0] / 2)
    radius = 0.75 * max(shape) * 0.11 / 3600.0 + 0.003
    stars = simulate.make_star_field(float(ra), float(dec), radius, density, rng)
    brightness = dict(
        zip(
            np.asarray(stars["objID"]),
            10 ** rng.uniform(*np.log10(flux), len(stars)),
            strict=True,
        )
    )
    box = ((-0.5, shape[1] - 0.5), (-0.5, shape[0] - 0.5))
    models, truths, true_wcs = [], [], []
    for k in range(n_exposures):
        error = (rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(-0.01, 0.01))
        exposure = simulate.make_exposure(
            stars,
            attitude.perturbed(2.0 * k, 1.5 * k, 0.0),
            exposure=k + 1,
            pointing_error=error,
            detectors=(detector,),
            centroid_noise=0.0,
            rng=rng,
            data_shape=shape,
        )
        model = exposure.models[0]
        catalog = model.meta["tweakreg_catalog"]
        x, y = np.asarray(catalog["x"]), np.asarray(catalog["y"])
        inside = (x > box[0][0]) & (x < box[0][1]) & (y > box[1][0]) & (y < box[1][1])
        fluxes = np.array([brightness[i] for i in np.asarray(catalog["objID"])[inside]])
        data, err = render_epsf_stars(shape, x[inside], y[inside], fluxes, rng)
        model.data[:], model.err[:], model.dq[:] = data, err, 0
        model.meta.wcs.bounding_box = box
        model.meta.instrument.optical_element = optical_element
        del model.meta["tweakreg_catalog"]
        models.append(model)
        truths.append(Table({"x": x[inside], "y": y[inside]}))
        true_wcs.append(exposure.true_wcs[0])
    ra_now, dec_now = simulate.propagate(stars, 2028.0, simulate.l2_observer(2028.0))
    return models, truths, true_wcs, Table({"RA": ra_now, "DEC": dec_now})
