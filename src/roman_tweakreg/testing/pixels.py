"""Small associations of L2 files whose pixels hold their stars: inputs for detection.

:func:`write_pixel_association` writes dithered exposures whose pixel arrays are the
first ``shape`` pixels of each detector (the WCS's bounding box cut to them), with the
stars of a dense Gaia-like field rendered as pixel-integrated Gaussians with Poisson
and read noise, and no catalog: the step detects their sources.  The first
``keep_catalog`` images keep a catalog file of their own (true positions), named in
``meta.source_catalog.tweakreg_catalog_name``.  Used by the batch's detection tests and
benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table, vstack
from scipy.special import erf

from . import simulate

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["render_stars", "write_pixel_association"]

_PIXEL_DEG = 0.11 / 3600.0


def render_stars(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    rng: np.random.Generator,
    *,
    fwhm: float = 2.0,
    sky: float = 50.0,
    read_noise: float = 5.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Stars as pixel-integrated circular Gaussians on a flat sky, with noise.

    Parameters
    ----------
    shape : (ny, nx)
        Image shape.
    x, y, flux : arrays
        0-indexed positions and total fluxes (electrons).
    rng : numpy.random.Generator
        Noise.
    fwhm, sky, read_noise : float
        Gaussian FWHM (px), sky (electrons), read noise (electrons).

    Returns
    -------
    data, err : numpy.ndarray
        float32 image and its noise (the model's noise, sqrt(model + read noise^2)).
    """
    ny, nx = shape
    model = np.full(shape, sky, dtype=float)
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    half = int(np.ceil(4 * sigma))
    edges = np.arange(-half, half + 2) - 0.5
    for x0, y0, f in zip(x, y, flux, strict=True):
        ix, iy = int(np.rint(x0)), int(np.rint(y0))
        cx = np.diff(erf((ix + edges - x0) / (np.sqrt(2) * sigma))) / 2
        cy = np.diff(erf((iy + edges - y0) / (np.sqrt(2) * sigma))) / 2
        x_lo, y_lo = ix - half, iy - half
        xs = slice(max(x_lo, 0), min(ix + half + 1, nx))
        ys = slice(max(y_lo, 0), min(iy + half + 1, ny))
        stamp = f * np.outer(cy, cx)
        model[ys, xs] += stamp[ys.start - y_lo : ys.stop - y_lo, xs.start - x_lo : xs.stop - x_lo]
    data = rng.poisson(model) + rng.normal(0.0, read_noise, shape)
    return data.astype(np.float32), np.sqrt(model + read_noise**2).astype(np.float32)


def write_pixel_association(
    directory: str | Path,
    *,
    shape: tuple[int, int] = (256, 256),
    detectors: Sequence[str] = ("WFI01", "WFI02"),
    n_exposures: int = 2,
    keep_catalog: int = 1,
    density: float = 1.5e6,
    seed: int = 7,
) -> Path:
    """Write an association of images that need source detection (see the module doc).

    Parameters
    ----------
    directory : path
        Created; gets the ASDF files, ``gaia.ecsv`` (the field at the exposures'
        epoch, RA/DEC) and ``<directory name>.json``.
    shape : (ny, nx)
        Pixels of each image (the corner of its detector).
    detectors : sequence of str
        Detectors of each exposure.
    n_exposures : int
        Exposures, dithered by 2 arcsec along RA and 1.5 along Dec each.
    keep_catalog : int
        How many images (the first ones) keep a catalog of their own.
    density : float
        Stars per square degree (1.5e6 gives about 80 per 256 x 256 image).
    seed : int
        Seed of everything random.

    Returns
    -------
    pathlib.Path
        The association file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    attitude = simulate.Attitude(270.0, -30.0, 60.0)
    radius = 0.75 * max(shape) * _PIXEL_DEG + 0.003
    parts = []
    for detector in detectors:
        wcs = simulate.detector_wcs(detector, attitude.wcsinfo(detector))
        ra, dec = wcs(shape[1] / 2, shape[0] / 2)
        parts.append(simulate.make_star_field(float(ra), float(dec), radius, density, rng))
    stars = vstack(parts)
    box = ((-0.5, shape[1] - 0.5), (-0.5, shape[0] - 0.5))
    members = []
    for k in range(n_exposures):
        error = (rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(-0.01, 0.01))
        exposure = simulate.make_exposure(
            stars,
            attitude.perturbed(2.0 * k, 1.5 * k, 0.0),
            exposure=k + 1,
            pointing_error=error,
            detectors=detectors,
            centroid_noise=0.0,
            rng=rng,
            data_shape=shape,
        )
        for model in exposure.models:
            catalog = model.meta["tweakreg_catalog"]
            x, y = np.asarray(catalog["x"]), np.asarray(catalog["y"])
            inside = (x > box[0][0]) & (x < box[0][1]) & (y > box[1][0]) & (y < box[1][1])
            catalog = catalog[inside]
            flux = rng.uniform(2e3, 3e4, len(catalog))
            data, err = render_stars(shape, x[inside], y[inside], flux, rng)
            model.data[:], model.err[:], model.dq[:] = data, err, 0
            model.meta.wcs.bounding_box = box
            del model.meta["tweakreg_catalog"]
            if len(members) < keep_catalog:
                name = model.meta.filename.removesuffix("_cal.asdf") + "_own.ecsv"
                Table({"x": catalog["x"], "y": catalog["y"]}).write(directory / name)
                model.meta["source_catalog"] = {"tweakreg_catalog_name": name}
            model.save(directory / model.meta.filename)
            members.append({"expname": model.meta.filename, "exptype": "science"})
    ra, dec = simulate.propagate(stars, 2028.0, simulate.l2_observer(2028.0))
    Table({"RA": ra, "DEC": dec}).write(directory / "gaia.ecsv", overwrite=True)
    asn = directory / f"{directory.name}.json"
    products = [{"name": directory.name, "members": members}]
    asn.write_text(json.dumps({"asn_type": "image", "asn_pool": "pixels", "products": products}))
    return asn
