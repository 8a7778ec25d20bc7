"""Point-source catalogs for images that come without one.

Algorithm (see ``docs/detection.rst`` for the measured accuracy and speed):

1. Unusable pixels -- non-finite, or with a DQ bit ``DO_NOT_USE``,
   ``JUMP_DET`` (cosmic ray) or ``HOT`` -- are masked: set to 0, no weight.
   ``SATURATED`` pixels keep their values in the filtered image (so a
   saturated star stays one smooth peak) but are left out of the background
   and of the fits, and no source within ``fit half-size + 2`` px of one is kept.
2. Background: SEP (Source Extractor's mesh: sigma-clipped mode in boxes of
   ``bkg_boxsize`` px, median-filtered over ``bkg_filter_size`` boxes,
   spline-interpolated), subtracted from a float32 copy of the image.
   Noise of a pixel: ``err`` where finite and positive, else SEP's global rms.
3. Matched filter: the background-subtracted image is correlated with a
   normalised Gaussian of FWHM ``kernel_fwhm`` (separable, two 1-D passes).
   Pixels whose filtered value could reach ``snr_threshold`` times its noise
   are found with one comparison against a lower bound of that noise; among
   them local maxima (none higher within ``min_separation``) whose
   significance -- filtered value over its propagated noise
   ``sqrt(sum k^2 sigma^2)`` -- is at least ``snr_threshold`` are candidates.
4. Dropped: candidates whose brightest pixel holds more than
   ``max_peak_fraction`` of the 3x3 flux around it (unflagged hot pixels and
   cosmic rays), with a masked pixel in the 3x3 box around the peak, or near a
   saturated pixel (step 1).
5. Positions: the PRF shape -- two concentric circular Gaussians integrated
   over pixels, core width, halo width and core fraction -- is measured on
   up to 200 bright (significance >= 50), isolated candidates
   (:func:`measure_prf_shape`, started from :func:`fit_gaussian_prf`
   positions); then :func:`fit_prf` fits flux and position of every
   candidate with that shape to the ``2 ceil(1.5 FWHM) + 1`` square around
   its peak, weighted by ``err``, masked pixels left out; all sources at
   once (vectorised Levenberg-Marquardt with the analytic Jacobian, tested
   against per-source ``scipy.optimize.least_squares`` to 0.001 px).  With
   fewer than 10 such stars each source gets instead a pixel-integrated
   Gaussian of free FWHM, unweighted (:func:`fit_gaussian_prf`, the minimum
   of photutils ``PSFPhotometry`` with ``CircularGaussianPRF``).  Fits that
   do not converge, end at the 1.5 px position bound or at a FWHM bound are
   dropped, as is the less significant of two centroids closer than
   ``min_separation``.  With the image's Roman ePSF (``psf``: ``psf_model``,
   ``override_epsf`` or CRDS, see :mod:`roman_tweakreg.psf`) no shape is
   measured: :func:`fit_epsf` fits every source with it instead, with the
   same square, weights and rules, and positions lie on the ePSF's origin.
   Crowded pairs: a companion 1.5-5 px from a fitted
   source (or from a saturated star, fitted on its unsaturated pixels and
   never kept) is found in the source's residual, against the residual the
   PRF leaves around the bright stars (``_residual_profile``), and
   fitted jointly with it (``_add_companions``).
6. Fluxes: SEP circular-aperture sums of radius ``aperture_radius *
   kernel_fwhm`` on the background-subtracted image; ``peakmax`` then
   ``brightest`` are applied.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table
from roman_datamodels.dqflags import pixel as _dqflags

from . import parameters
from ._io import table_suffix, write_atomically, write_parquet
from .errors import OutputError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from .psf import EPSFModel

__all__ = [
    "DO_NOT_USE",
    "DetectionJob",
    "DetectionParameters",
    "catalog_filename",
    "detect_sources",
    "fit_epsf",
    "fit_gaussian_prf",
    "fit_prf",
    "measure_prf_shape",
    "write_catalog",
]

log = logging.getLogger(__name__)

DO_NOT_USE = int(_dqflags.DO_NOT_USE)
"""The DQ bit of unusable pixels (``roman_datamodels.dqflags.pixel.DO_NOT_USE``)."""
_MASKED = int(_dqflags.DO_NOT_USE | _dqflags.JUMP_DET | _dqflags.HOT)
_SATURATED = int(_dqflags.SATURATED)

_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
_MAX_SHIFT = 1.5  # px, per axis: the fitted centroid's bound around its peak pixel
_FWHM_BOUNDS = (0.2, 5.0)  # fitted FWHM range, in units of kernel_fwhm
_SHAPE_MIN_SNR = 50.0  # significance of the stars the PRF shape is measured on
_SHAPE_MIN_STARS = 10  # fewer: each source gets a Gaussian of free FWHM instead
_SHAPE_MAX_STARS = 200  # the brightest this many are used
_COMPANION_MODEL_ERROR = 0.03  # of the PRF model, added to the residual's noise ...
_COMPANION_RING_ERROR = 0.03  # ... and of the flux (rings): without a measured profile
_PROFILE_BIN = 0.5  # px: radial bins of the residual profile
_PROFILE_MIN_PIXELS = 20  # a bin with fewer pixels takes the one inside it
_COMPANION_SNR_FACTOR = 1.5  # a companion needs this times snr_threshold
_NOISE_MARGIN = 0.95  # the pre-selection's noise bound may be this much too high
# (a masked pixel in the filter's outer ring lowers the noise by < 1 %)


@dataclass(frozen=True)
class DetectionParameters:
    """Tunable parameters of :func:`detect_sources`; defaults suit Roman WFI L2 images.

    Each field's default, accepted values and one-line doc are defined once in
    :mod:`roman_tweakreg.parameters` (section ``detection``; docs/detection.rst shows
    the table); :meth:`validate` checks them.

    Attributes
    ----------
    kernel_fwhm : float
        FWHM (pixels) of the Gaussian used as matched filter and as starting
        width of the centroid fit (it sets the fit's cutout size).  The WFI
        PSF has a FWHM of about 1.2-2 px (0.11"/px).
    snr_threshold : float
        Minimum matched-filter significance of a detection (S/N of the
        filtered image at the peak).
    bkg_boxsize : int
        Box size (pixels) of the background mesh; clipped to the image size.
    bkg_filter_size : int
        Median-filter size (boxes) applied to the background mesh (odd).
    min_separation : float
        Minimum distance (pixels) between two detections.
    max_peak_fraction : float
        Largest fraction of the 3x3 (background-subtracted) flux allowed in
        the brightest pixel; higher means a hot pixel or cosmic ray.  A
        well-sampled star has about 0.3 (1 disables).
    aperture_radius : float
        Radius of the flux aperture, in units of ``kernel_fwhm``.
    brightest : int or None
        Keep only this many sources of highest flux; ``None`` keeps all.
    peakmax : float or None
        Drop sources whose brightest background-subtracted pixel exceeds
        this (e.g. saturated stars); ``None`` disables.
    psf_model : str or None
        An ePSF reference file (romancal's ``EpsfRefModel``) or a folder of them,
        chosen per image by detector and optical element
        (:func:`roman_tweakreg.psf.find_epsf`, in :meth:`DetectionJob.run`);
        ``None``: the empirical PRF.
    """

    kernel_fwhm: float = parameters.default("kernel_fwhm")
    snr_threshold: float = parameters.default("snr_threshold")
    bkg_boxsize: int = parameters.default("bkg_boxsize")
    bkg_filter_size: int = parameters.default("bkg_filter_size")
    min_separation: float = parameters.default("min_separation")
    max_peak_fraction: float = parameters.default("max_peak_fraction")
    aperture_radius: float = parameters.default("aperture_radius")
    brightest: int | None = parameters.default("brightest")
    peakmax: float | None = parameters.default("peakmax")
    psf_model: str | None = parameters.default("psf_model")

    def validate(self) -> DetectionParameters:
        """Check every field against its definition in :mod:`roman_tweakreg.parameters`.

        Returns
        -------
        DetectionParameters
            ``self``.

        Raises
        ------
        InvalidParameterError
            ``detection parameter <name>=<value>: expected ...``, naming the first
            field not accepted and what is accepted.
        """
        for f in fields(self):
            parameters.check(f.name, getattr(self, f.name))
        return self

    @property
    def fit_half(self) -> int:
        """Half-size (pixels) of the square fitted around each peak."""
        return max(2, int(np.ceil(1.5 * self.kernel_fwhm)))


def _gaussian_kernel_1d(fwhm: float) -> np.ndarray:
    sigma = fwhm * _FWHM_TO_SIGMA
    half = int(np.ceil(3.0 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    return kernel / kernel.sum()


def _windows(image: np.ndarray, px, py, half: int, fill=0):
    """Cutouts ``(N, 2 half + 1, 2 half + 1)`` of ``image`` at ``(px, py)``; ``fill`` off it."""
    ny, nx = image.shape
    box = np.arange(-half, half + 1)
    rows = py[:, None, None] + box[None, :, None]
    cols = px[:, None, None] + box[None, None, :]
    inside = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    values = image[np.clip(rows, 0, ny - 1), np.clip(cols, 0, nx - 1)]
    return np.where(inside, values, fill)


def _local_maxima(signal: np.ndarray, index: np.ndarray, radius: float) -> np.ndarray:
    """Of the flat pixel indices ``index``, those where ``signal`` is highest within ``radius``.

    Ties go to the first pixel in raster order.
    """
    ny, nx = signal.shape
    py, px = np.divmod(index, nx)
    value = signal.ravel()[index]
    keep = np.ones(index.size, bool)
    r = int(np.floor(radius))
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dy == 0 and dx == 0) or dx * dx + dy * dy > radius * radius:
                continue
            qy, qx = py + dy, px + dx
            inside = (qy >= 0) & (qy < ny) & (qx >= 0) & (qx < nx)
            other = signal[np.clip(qy, 0, ny - 1), np.clip(qx, 0, nx - 1)]
            earlier = dy < 0 or (dy == 0 and dx < 0)
            beaten = other >= value if earlier else other > value
            keep &= ~(inside & beaten)
    return index[keep]


def _pixel_integrals(centre: np.ndarray, sigma: np.ndarray, n: int, half: int):
    """A unit 1-D Gaussian integrated over the pixels of an ``n``-pixel row.

    ``centre`` and ``sigma`` are ``(N,)`` (pixels, relative to pixel ``half``).
    Returns the integrals ``(N, n)`` and their derivatives by the centre and by sigma.
    """
    from scipy.special import ndtr

    edges = np.arange(n + 1) - half - 0.5
    s = sigma[:, None]
    b = (edges[None, :] - centre[:, None]) / s
    pdf = np.exp(-0.5 * b**2) / np.sqrt(2 * np.pi)
    return np.diff(ndtr(b), axis=1), -np.diff(pdf, axis=1) / s, -np.diff(b * pdf, axis=1) / s


def _prf_and_jacobian(params: np.ndarray, n: int, half: int):
    """Pixel-integrated circular Gaussian on an ``n x n`` grid centred on pixel ``half``.

    ``params`` is ``(N, 4)``: flux, x, y (relative to the central pixel), sigma.
    Returns the model ``(N, n, n)`` and its derivatives ``(N, n, n, 4)``.
    """
    flux, x0, y0, sigma = params.T
    ex, dex_dx, dex_ds = _pixel_integrals(x0, sigma, n, half)
    ey, dey_dy, dey_ds = _pixel_integrals(y0, sigma, n, half)
    f = flux[:, None, None]
    shape = ey[:, :, None] * ex[:, None, :]
    jac = np.stack(
        [
            shape,
            f * ey[:, :, None] * dex_dx[:, None, :],
            f * dey_dy[:, :, None] * ex[:, None, :],
            f * (ey[:, :, None] * dex_ds[:, None, :] + dey_ds[:, :, None] * ex[:, None, :]),
        ],
        axis=-1,
    )
    return f * shape, jac


def _two_gaussian_prf(params: np.ndarray, prf_shape, n: int, half: int):
    """Pixel-integrated sum of two concentric circular Gaussians (see :func:`fit_prf`).

    ``params`` is ``(N, 3)``: flux, x, y; ``prf_shape`` is
    ``(sigma_core, sigma_halo, core_fraction)``.  Returns the model ``(N, n, n)``
    and its derivatives ``(N, n, n, 3)``.
    """
    flux, x0, y0 = params.T
    model = np.zeros((flux.size, n, n))
    d_dx, d_dy = np.zeros_like(model), np.zeros_like(model)
    for sigma, weight in ((prf_shape[0], prf_shape[2]), (prf_shape[1], 1.0 - prf_shape[2])):
        if weight == 0:
            continue
        sig = np.full(flux.size, float(sigma))
        ex, dex, _ = _pixel_integrals(x0, sig, n, half)
        ey, dey, _ = _pixel_integrals(y0, sig, n, half)
        model += weight * ey[:, :, None] * ex[:, None, :]
        d_dx += weight * ey[:, :, None] * dex[:, None, :]
        d_dy += weight * dey[:, :, None] * ex[:, None, :]
    f = flux[:, None, None]
    return f * model, np.stack([model, f * d_dx, f * d_dy], axis=-1)


def _cutouts(image, error, mask, x_init, y_init, half):
    """Data and weights ``(N, n, n)`` around the pixels nearest ``(x_init, y_init)``."""
    px, py = np.rint(x_init).astype(int), np.rint(y_init).astype(int)
    data = _windows(image, px, py, half, np.nan).astype(float)
    weight = np.ones_like(data) if error is None else 1.0 / _windows(error, px, py, half, np.nan)
    bad = ~np.isfinite(data) | ~np.isfinite(weight)
    if mask is not None:
        bad |= _windows(mask, px, py, half, True)
    return px, py, np.where(bad, 0.0, data), np.where(bad, 0.0, weight)


def _levenberg_marquardt(model_and_jac, data, weight, params, lo, hi, max_iter, positions=(1, 2)):
    """Weighted least squares of every source at once; ``positions``: the columns of x, y.

    ``model_and_jac(params, rows)`` returns the models ``(M, n, n)`` and their
    derivatives ``(M, n, n, P)`` of the sources ``rows`` (an index array or
    ``slice(None)``), whose parameters ``params`` are ``(M, P)``.  Each source
    has its own damping and stops when its position moves by less than 1e-6 px.
    Returns the parameters and a ``converged`` flag per source.
    """
    n_src, n_par = params.shape
    params = np.clip(params, lo, hi)
    damping = np.full(n_src, 1e-3)
    converged = np.zeros(n_src, bool)

    def chi2(p, rows):
        model, jac = model_and_jac(p, rows)
        return np.sum(((data[rows] - model) * weight[rows]) ** 2, axis=(1, 2)), model, jac

    cost, model, jac = chi2(params, slice(None))
    active = np.ones(n_src, bool)
    for _ in range(max_iter):
        if not active.any():
            break
        a = np.flatnonzero(active)
        jw = (jac[a] * weight[a, ..., None]).reshape(a.size, -1, n_par)
        resid = ((data[a] - model[a]) * weight[a]).reshape(a.size, -1)
        normal = np.einsum("npi,npj->nij", jw, jw)
        grad = np.einsum("npi,np->ni", jw, resid)
        diag = np.einsum("nii->ni", normal)
        damped = normal + (damping[a, None] * np.maximum(diag, 1e-30))[:, :, None] * np.eye(n_par)
        try:
            step = np.linalg.solve(damped, grad[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.stack(
                [np.linalg.lstsq(m, g, rcond=None)[0] for m, g in zip(damped, grad, strict=True)]
            )
        trial = np.clip(params[a] + step, lo, hi)
        new_cost, new_model, new_jac = chi2(trial, a)
        better = new_cost <= cost[a]
        moved = np.abs(trial - params[a])[:, list(positions)].max(axis=1)
        ok = a[better]
        params[ok], cost[ok], model[ok], jac[ok] = (
            trial[better],
            new_cost[better],
            new_model[better],
            new_jac[better],
        )
        damping[ok] = np.maximum(damping[ok] / 10.0, 1e-9)
        damping[a[~better]] *= 10.0
        done = (better & (moved < 1e-6)) | (damping[a] > 1e10)
        converged[a[done & better]] = True
        converged[a[done & ~better]] = moved[done & ~better] < 1e-6
        active[a[done]] = False
    return params, converged


def fit_gaussian_prf(
    image: np.ndarray,
    error: np.ndarray | None,
    mask: np.ndarray | None,
    x_init: ArrayLike,
    y_init: ArrayLike,
    fwhm: float,
    fit_shape: int,
    *,
    max_shift: float = _MAX_SHIFT,
    fwhm_bounds: tuple[float, float] = _FWHM_BOUNDS,
    max_iter: int = 100,
) -> Table:
    """Fit a pixel-integrated circular Gaussian to every source at once.

    The model and the fit are those of photutils ``PSFPhotometry`` with a
    ``CircularGaussianPRF`` whose FWHM is free (no local background): for each
    source the ``fit_shape`` square of ``image`` centred on the pixel nearest
    ``(x_init, y_init)`` is fitted by weighted least squares (weights
    ``1 / error``; ``mask``-ed pixels and pixels off the image left out) with
    free flux, x, y and FWHM.  All sources iterate together: Levenberg-Marquardt
    steps with the analytic Jacobian, each source with its own damping, until
    every position moves by less than 1e-6 px.

    Parameters
    ----------
    image : numpy.ndarray, 2-D
        Background-subtracted image.
    error : numpy.ndarray or None
        1-sigma noise per pixel (None: unweighted).
    mask : numpy.ndarray of bool or None
        Pixels to leave out.
    x_init, y_init : array-like
        Initial positions (0-indexed pixels).
    fwhm : float
        Initial FWHM (pixels).
    fit_shape : int
        Odd side (pixels) of the fitted square.
    max_shift : float
        Bound (pixels, per axis) of the position around the central pixel.
    fwhm_bounds : (float, float)
        Bounds of the FWHM, in units of ``fwhm``.
    max_iter : int
        Iterations at most.

    Returns
    -------
    astropy.table.Table
        ``x_fit``, ``y_fit``, ``flux_fit``, ``fwhm_fit``, ``converged`` (bool),
        ``at_bound`` (bool: the position or FWHM ended within 1 % of its bound),
        one row per source in input order.
    """
    x_init = np.atleast_1d(np.asarray(x_init, float))
    y_init = np.atleast_1d(np.asarray(y_init, float))
    half = fit_shape // 2
    px, py, data, weight = _cutouts(image, error, mask, x_init, y_init, half)
    lo = np.array([1e-30, -max_shift, -max_shift, fwhm_bounds[0] * fwhm * _FWHM_TO_SIGMA])
    hi = np.array([np.inf, max_shift, max_shift, fwhm_bounds[1] * fwhm * _FWHM_TO_SIGMA])
    start = np.column_stack(
        [
            np.maximum(data.sum(axis=(1, 2)), 1.0),
            x_init - px,
            y_init - py,
            np.full(px.size, fwhm * _FWHM_TO_SIGMA),
        ]
    )
    params, converged = _levenberg_marquardt(
        lambda p, _: _prf_and_jacobian(p, fit_shape, half), data, weight, start, lo, hi, max_iter
    )
    flux, dx, dy, sigma = params.T
    fwhm_fit = sigma / _FWHM_TO_SIGMA
    at_bound = (
        (np.abs(dx) >= max_shift - 0.01)
        | (np.abs(dy) >= max_shift - 0.01)
        | (fwhm_fit <= fwhm_bounds[0] * fwhm * 1.01)
        | (fwhm_fit >= fwhm_bounds[1] * fwhm * 0.99)
    )
    return Table(
        {
            "x_fit": px + dx,
            "y_fit": py + dy,
            "flux_fit": flux,
            "fwhm_fit": fwhm_fit,
            "converged": converged,
            "at_bound": at_bound,
        }
    )


def fit_prf(
    image: np.ndarray,
    error: np.ndarray | None,
    mask: np.ndarray | None,
    x_init: ArrayLike,
    y_init: ArrayLike,
    prf_shape: tuple[float, float, float],
    fit_shape: int,
    *,
    max_shift: float = _MAX_SHIFT,
    max_iter: int = 100,
) -> Table:
    """Fit flux and position of every source at once with a PRF of known shape.

    The PRF is the sum of two concentric circular Gaussians -- a core of
    width ``sigma_core`` holding ``core_fraction`` of the flux and a halo of
    width ``sigma_halo`` -- integrated over square pixels (exactly, with
    ``erf``); its shape comes from :func:`measure_prf_shape`.  For each source
    the ``fit_shape`` square centred on the pixel nearest ``(x_init, y_init)``
    is fitted by weighted least squares (weights ``1 / error``; ``mask``-ed
    pixels and pixels off the image left out) with free flux, x and y, by the
    vectorised Levenberg-Marquardt iteration of :func:`fit_gaussian_prf`.

    Parameters
    ----------
    image, error, mask, x_init, y_init, fit_shape, max_shift, max_iter
        As for :func:`fit_gaussian_prf`.
    prf_shape : (float, float, float)
        ``(sigma_core, sigma_halo, core_fraction)``: Gaussian sigmas in pixels
        and the core's share of the flux in ``[0, 1]``.

    Returns
    -------
    astropy.table.Table
        ``x_fit``, ``y_fit``, ``flux_fit``, ``converged`` (bool), ``at_bound``
        (bool: the position ended within 0.01 px of its bound), one row per
        source in input order.
    """
    x_init = np.atleast_1d(np.asarray(x_init, float))
    y_init = np.atleast_1d(np.asarray(y_init, float))
    half = fit_shape // 2
    px, py, data, weight = _cutouts(image, error, mask, x_init, y_init, half)
    lo = np.array([1e-30, -max_shift, -max_shift])
    hi = np.array([np.inf, max_shift, max_shift])
    start = np.column_stack([np.maximum(data.sum(axis=(1, 2)), 1.0), x_init - px, y_init - py])
    shape = tuple(float(v) for v in prf_shape)
    params, converged = _levenberg_marquardt(
        lambda p, _: _two_gaussian_prf(p, shape, fit_shape, half),
        data,
        weight,
        start,
        lo,
        hi,
        max_iter,
    )
    flux, dx, dy = params.T
    at_bound = (np.abs(dx) >= max_shift - 0.01) | (np.abs(dy) >= max_shift - 0.01)
    return Table(
        {
            "x_fit": px + dx,
            "y_fit": py + dy,
            "flux_fit": flux,
            "converged": converged,
            "at_bound": at_bound,
        }
    )


_FIT_COLUMNS = (("x_fit", float), ("y_fit", float), ("flux_fit", float), ("converged", bool),
                ("at_bound", bool))  # fmt: skip
_EPSF_CHUNK = 1024  # sources whose ePSFs are held together (about 25 kB each while fitted)


def fit_epsf(
    image: np.ndarray,
    error: np.ndarray | None,
    mask: np.ndarray | None,
    x_init: ArrayLike,
    y_init: ArrayLike,
    epsf: EPSFModel,
    fit_shape: int,
    *,
    max_shift: float = _MAX_SHIFT,
    max_iter: int = 100,
) -> Table:
    """Fit flux and position of every source at once with a Roman ePSF model.

    Each source's ePSF is ``epsf`` interpolated to its detector position
    (bilinearly between the grid's stamps, as photutils' ``GriddedPSFModel``;
    :meth:`~roman_tweakreg.psf.EPSFModel.for_sources`), evaluated by cubic
    B-splines; the fit is that of :func:`fit_prf` (weighted least squares of
    the ``fit_shape`` square, free flux, x and y, vectorised Levenberg-Marquardt
    with the analytic Jacobian), in blocks of 1024 sources.  The fitted position
    is the ePSF's origin: the point the image's WCS maps.

    Parameters
    ----------
    image, error, mask, x_init, y_init, fit_shape, max_shift, max_iter
        As for :func:`fit_gaussian_prf`.
    epsf : roman_tweakreg.psf.EPSFModel
        The image's ePSF (:func:`roman_tweakreg.psf.find_epsf`).

    Returns
    -------
    astropy.table.Table
        As :func:`fit_prf`.
    """
    x_init = np.atleast_1d(np.asarray(x_init, float))
    y_init = np.atleast_1d(np.asarray(y_init, float))
    half = fit_shape // 2
    lo = np.array([1e-30, -max_shift, -max_shift])
    hi = np.array([np.inf, max_shift, max_shift])
    parts = []
    if x_init.size == 0:
        return Table({name: np.zeros(0, t) for name, t in _FIT_COLUMNS})
    for start_row in range(0, x_init.size, _EPSF_CHUNK):
        rows = slice(start_row, start_row + _EPSF_CHUNK)
        px, py, data, weight = _cutouts(image, error, mask, x_init[rows], y_init[rows], half)
        start = np.column_stack(
            [np.maximum(data.sum(axis=(1, 2)), 1.0), x_init[rows] - px, y_init[rows] - py]
        )
        sources = epsf.for_sources(px, py, half + max_shift)
        params, converged = _levenberg_marquardt(
            lambda p, r, s=sources: s.model(p, r, fit_shape, half),
            data,
            weight,
            start,
            lo,
            hi,
            max_iter,
        )
        parts.append((px + params[:, 1], py + params[:, 2], params[:, 0], converged, params))
    x, y, flux, converged, params = (np.concatenate(v) for v in zip(*parts, strict=True))
    at_bound = np.any(np.abs(params[:, 1:]) >= max_shift - 0.01, axis=1)
    return Table(
        {"x_fit": x, "y_fit": y, "flux_fit": flux, "converged": converged, "at_bound": at_bound}
    )


def measure_prf_shape(
    image: np.ndarray,
    mask: np.ndarray | None,
    x: ArrayLike,
    y: ArrayLike,
    fwhm: float,
    fit_shape: int,
    *,
    max_rounds: int = 10,
    tol: float = 1e-3,
) -> tuple[float, float, float]:
    """The two-Gaussian PRF shape (see :func:`fit_prf`) that best fits bright stars.

    The shape is common to all stars, flux and position are each star's own:
    the two are fitted in turn -- the shape by ``scipy.optimize.least_squares``
    with each star's flux solved linearly at every trial shape, then the
    positions by :func:`fit_prf` -- starting from ``(x, y)``, until a round
    changes no shape parameter by more than ``tol`` (the sigmas in units of
    the starting sigma) or after ``max_rounds`` rounds.  Pixels are weighted
    equally.

    Parameters
    ----------
    image : numpy.ndarray, 2-D
        Background-subtracted image.
    mask : numpy.ndarray of bool or None
        Pixels to leave out.
    x, y : array-like
        Approximate positions (0-indexed pixels) of bright, isolated stars.
    fwhm : float
        Approximate FWHM (pixels) of the PSF, the starting width.
    fit_shape : int
        Odd side (pixels) of the square fitted around each star.
    max_rounds : int
        Shape-then-positions rounds at most.
    tol : float
        Convergence tolerance of the shape.

    Returns
    -------
    (float, float, float)
        ``(sigma_core, sigma_halo, core_fraction)``.
    """
    from scipy.optimize import least_squares

    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    half = fit_shape // 2
    sigma = fwhm * _FWHM_TO_SIGMA
    px, py, data, weight = _cutouts(image, None, mask, x, y, half)
    shape = np.array([0.8 * sigma, 2.0 * sigma, 0.8])
    lo, hi = np.array([0.05, 0.05, 0.0]), np.array([5.0 * sigma, 10.0 * sigma, 1.0])
    dx, dy = x - px, y - py

    def residuals(q):
        unit = np.column_stack([np.ones(px.size), dx, dy])
        model, _ = _two_gaussian_prf(unit, q, fit_shape, half)
        mw = model * weight
        norm = np.maximum(np.sum(mw**2, axis=(1, 2)), 1e-300)
        flux = np.sum(mw * data * weight, axis=(1, 2)) / norm  # linear least squares
        return ((data - flux[:, None, None] * model) * weight).ravel()

    for _ in range(max_rounds):
        previous = shape
        shape = least_squares(residuals, shape, bounds=(lo, hi), x_scale=[sigma, sigma, 1.0]).x
        fit = fit_prf(image, None, mask, px + dx, py + dy, shape, fit_shape)
        dx, dy = np.asarray(fit["x_fit"]) - px, np.asarray(fit["y_fit"]) - py
        if np.max(np.abs(shape - previous) / [sigma, sigma, 1.0]) < tol:
            break
    return tuple(float(v) for v in shape)


def _masks(image: np.ndarray, dq):
    """``(masked, saturated)`` boolean images (see the module docstring, step 1)."""
    masked = ~np.isfinite(image)
    saturated = None
    if dq is not None:
        dq = np.asarray(dq)
        if dq.shape != image.shape:
            raise ValueError(f"dq shape {dq.shape} differs from data shape {image.shape}")
        if not np.issubdtype(dq.dtype, np.integer):
            raise ValueError(f"dq must hold integer flags, got dtype {dq.dtype}")
        masked |= (dq & dq.dtype.type(_MASKED)) != 0
        saturated = (dq & dq.dtype.type(_SATURATED)) != 0
        if not saturated.any():
            saturated = None
    return masked, saturated


def detect_sources(
    data: ArrayLike,
    dq: ArrayLike | None = None,
    err: ArrayLike | None = None,
    params: DetectionParameters | None = None,
    *,
    psf: EPSFModel | None = None,
) -> Table:
    """Find point sources in a 2-D image and measure their centroids.

    Parameters
    ----------
    data : array-like, 2-D
        The image (any units; a Quantity's value is used).
    dq : array-like of int, optional
        roman_datamodels data-quality flags: pixels with ``DO_NOT_USE``,
        ``JUMP_DET`` or ``HOT`` are ignored, sources near ``SATURATED``
        pixels are dropped.
    err : array-like, optional
        Per-pixel 1-sigma uncertainty, in the units of ``data``: the noise of
        each pixel where finite and positive (elsewhere the background rms).
    params : DetectionParameters, optional
        Detection settings; the defaults when omitted (``params.psf_model`` is
        not read here: the caller gives the image's ePSF as ``psf``).
    psf : roman_tweakreg.psf.EPSFModel, optional
        The image's ePSF: positions are fitted with it (:func:`fit_epsf`) and lie
        on the ePSF's origin, the point the WCS maps; without it, with the PRF
        shape measured on the image's bright stars (:func:`fit_prf`), whose
        centre may differ from that point by a few milli-pixels for an
        asymmetric PSF.

    Returns
    -------
    astropy.table.Table
        Columns ``x``, ``y`` (0-indexed pixel centroids), ``flux``, ``peak``
        (brightest background-subtracted pixel) and ``snr`` (matched-filter
        significance), sorted by decreasing ``flux``.  Possibly empty.

    Raises
    ------
    ValueError
        If ``data`` is not 2-D or ``dq``/``err`` do not have its shape.
    InvalidParameterError
        If ``params`` fails :meth:`DetectionParameters.validate`.
    """
    params = (params or DetectionParameters()).validate()
    image, err, masked, saturated = _checked_arrays(data, dq, err)
    if masked.all():
        log.warning("No usable pixel: every pixel is non-finite or flagged")
        return _empty()
    work, global_rms, noise_floor = _subtract_background(image, err, masked, saturated, params)
    if not global_rms > 0:
        log.info("The background has no noise: no significance can be measured")
        return _empty()
    peaks = _candidates(work, err, masked, global_rms, noise_floor, params)
    if peaks.x.size == 0:
        log.info("No source above S/N %s", params.snr_threshold)
        return _empty()
    screen = _screen(work, masked, saturated, peaks, params)
    x, y, peak, significance = _positions(work, err, masked, saturated, peaks, screen, params, psf)
    if x.size == 0:
        return _empty()
    table = _measure(work, masked, x, y, peak, significance, params)
    log.info(
        "Detected %d sources (%d peaks above S/N %s)",
        len(table),
        peaks.x.size,
        params.snr_threshold,
    )
    return table


@dataclass
class _Peaks:
    """Step 3's candidates: peak pixels (x, y) and their matched-filter significance."""

    x: np.ndarray
    y: np.ndarray
    significance: np.ndarray


@dataclass
class _Screen:
    """Step 4's verdicts per peak: kept, and why others are not (or are searched for
    companions: ``hosts``, saturated stars); ``peak`` is each one's brightest pixel."""

    keep: np.ndarray
    sharp_ok: np.ndarray
    core_masked: np.ndarray
    near_saturated: np.ndarray
    hosts: np.ndarray
    peak: np.ndarray


def _checked_arrays(data, dq, err):
    """The image, its error array (or None) and its masks (unusable, saturated), checked."""
    image = np.asarray(getattr(data, "value", data))
    if image.ndim != 2:
        raise ValueError(f"detect_sources needs a 2-D image, got shape {image.shape}")
    masked, saturated = _masks(image, dq)
    if err is not None:
        err = np.asarray(getattr(err, "value", err))
        if err.shape != image.shape:
            raise ValueError(f"err shape {err.shape} differs from data shape {image.shape}")
    return image, err, masked, saturated


def _subtract_background(image, err, masked, saturated, params):
    """Steps 1-2: a float32 copy, masked pixels 0, SEP's background subtracted; with the
    background's global rms and the noise floor of the thresholds."""
    import sep

    work = np.array(image, dtype=np.float32, order="C")
    work[masked] = 0.0
    box = min(int(params.bkg_boxsize), *image.shape)
    no_bkg = masked if saturated is None else masked | saturated
    background = sep.Background(
        work, mask=no_bkg, bw=box, bh=box, fw=params.bkg_filter_size, fh=params.bkg_filter_size
    )
    background.subfrom(work)
    work[masked] = 0.0
    global_rms = float(background.globalrms)
    if err is None:
        return work, global_rms, global_rms
    good_err = ~masked & np.isfinite(err) & (err > 0)
    noise_floor = float(np.min(err, where=good_err, initial=np.inf))
    return work, global_rms, min(max(noise_floor, 0.5 * global_rms), global_rms)


def _candidates(work, err, masked, global_rms, noise_floor, params) -> _Peaks:
    """Step 3: matched filter; local maxima above a lower bound of the threshold, then
    the exact significance of each against its own pixels' noise."""
    from scipy.ndimage import correlate1d

    kernel = _gaussian_kernel_1d(params.kernel_fwhm).astype(np.float32)
    signal = correlate1d(work, kernel, axis=1, mode="constant")
    signal = correlate1d(signal, kernel, axis=0, mode="constant", output=signal)
    k_norm = float(np.sum(kernel**2))  # ||k2d||_2 = sum(k1d^2) for a separable kernel
    bound = _NOISE_MARGIN * params.snr_threshold * k_norm * noise_floor
    index = np.flatnonzero(signal > bound)
    index = _local_maxima(signal, index, params.min_separation)
    py, px = np.divmod(index, work.shape[1])
    khalf = kernel.size // 2
    k2 = np.outer(kernel, kernel).astype(float) ** 2
    if err is None:
        sigma_win = np.full((px.size, kernel.size, kernel.size), global_rms)
    else:
        sigma_win = _windows(err, px, py, khalf, global_rms).astype(float)
        sigma_win = np.where(np.isfinite(sigma_win) & (sigma_win > 0), sigma_win, global_rms)
    good_win = ~_windows(masked, px, py, khalf, True)
    noise = np.sqrt(np.sum(k2 * sigma_win**2 * good_win, axis=(1, 2)))
    with np.errstate(divide="ignore", invalid="ignore"):
        significance = signal[py, px] / noise
    above = significance >= params.snr_threshold
    return _Peaks(px[above], py[above], significance[above])


def _screen(work, masked, saturated, peaks: _Peaks, params) -> _Screen:
    """Step 4: sharp peaks (hot pixels, cosmic rays), masked cores and saturation out;
    saturated stars are never kept but searched for companions (crowded pairs)."""
    px, py, n = peaks.x, peaks.y, peaks.x.size
    core = _windows(work, px, py, 1).reshape(n, 9)
    peak = core.max(axis=1).astype(float)
    total = core.sum(axis=1, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        sharp_ok = (total > 0) & (peak <= params.max_peak_fraction * total)
    core_masked = _windows(masked, px, py, 1, True).reshape(n, 9).any(axis=1)
    near_saturated = np.zeros(n, bool)
    hosts = np.zeros(n, bool)
    if saturated is not None:
        near_saturated = _windows(saturated, px, py, params.fit_half + 2, False).any(axis=(1, 2))
        hosts = ~core_masked & _windows(saturated, px, py, 1, False).any(axis=(1, 2))
    keep = sharp_ok & ~core_masked & ~near_saturated
    return _Screen(keep, sharp_ok, core_masked, near_saturated, hosts, peak)


def _positions(work, err, masked, saturated, peaks: _Peaks, screen: _Screen, params, psf):
    """Step 5: the kept sources' (and companions') fitted positions, their peaks and
    significances; failed fits and duplicates dropped."""
    keep = screen.keep
    fit_mask = masked if saturated is None else masked | saturated
    fit = _fit_positions(
        work, err, fit_mask, saturated, peaks.x, peaks.y, keep, peaks.significance, params,
        screen.hosts, psf,
    )  # fmt: skip
    n_alone = int(keep.sum())
    peak, significance = screen.peak[keep], peaks.significance[keep]
    if len(fit) > n_alone:  # companions found in the residuals (crowded pairs)
        cx = np.rint(np.asarray(fit["x_fit"][n_alone:])).astype(int)
        cy = np.rint(np.asarray(fit["y_fit"][n_alone:])).astype(int)
        peak = np.concatenate([peak, _windows(work, cx, cy, 1).max(axis=(1, 2))])
        significance = np.concatenate([significance, fit["companion_snr"][n_alone:]])
    usable = np.asarray(fit["converged"]) & ~np.asarray(fit["at_bound"])
    x, y = np.asarray(fit["x_fit"])[usable], np.asarray(fit["y_fit"])[usable]
    log.debug(
        "%d peaks; dropped %d sharp (hot pixel / cosmic ray), %d near masked pixels, "
        "%d near saturated pixels, %d failed fits",
        peaks.x.size,
        int((~screen.sharp_ok).sum()),
        int((screen.sharp_ok & screen.core_masked).sum()),
        int((screen.sharp_ok & ~screen.core_masked & screen.near_saturated).sum()),
        int((~usable).sum()),
    )
    return _drop_duplicates(x, y, peak[usable], significance[usable], params.min_separation)


def _measure(work, masked, x, y, peak, significance, params) -> Table:
    """Step 6: aperture fluxes; ``peakmax`` and ``brightest`` applied, brightest first."""
    import sep

    flux, _, _ = sep.sum_circle(
        work, x, y, params.aperture_radius * params.kernel_fwhm, mask=masked, subpix=5
    )
    table = Table(
        {"x": x, "y": y, "flux": np.asarray(flux, float), "peak": peak, "snr": significance}
    )
    if params.peakmax is not None:
        table = table[table["peak"] <= params.peakmax]
    table.sort("flux", reverse=True)
    if params.brightest is not None:
        table = table[: int(params.brightest)]
    return table


def _fit_positions(
    work, err, fit_mask, saturated, px, py, keep, significance, params, hosts, psf=None
):
    """Step 5: every kept source's position, with the image's ePSF ``psf`` when given,
    else with the PRF shape measured on bright isolated stars.

    ``hosts`` (saturated stars, never kept) are fitted on their unsaturated
    pixels only to search their residuals for companions.
    """
    from scipy.spatial import cKDTree

    fit_shape = 2 * params.fit_half + 1
    if psf is not None:
        fit = fit_epsf(work, err, fit_mask, px[keep | hosts], py[keep | hosts], psf, fit_shape)
        return _with_companions(
            work, err, fit_mask, saturated, fit, hosts[keep | hosts], _epsf_models(psf), params
        )
    neighbours = cKDTree(np.column_stack([px, py])).query(np.column_stack([px, py]), k=2)[0]
    isolated = neighbours[:, 1] > fit_shape if px.size > 1 else np.ones(px.size, bool)
    bright = np.flatnonzero(keep & isolated & (significance >= _SHAPE_MIN_SNR))
    bright = bright[np.argsort(-significance[bright], kind="stable")][:_SHAPE_MAX_STARS]
    if bright.size >= _SHAPE_MIN_STARS:
        first = fit_gaussian_prf(
            work, None, fit_mask, px[bright], py[bright], params.kernel_fwhm, fit_shape
        )
        good = np.asarray(first["converged"]) & ~np.asarray(first["at_bound"])
        if good.sum() >= _SHAPE_MIN_STARS:
            prf_shape = measure_prf_shape(
                work,
                fit_mask,
                first["x_fit"][good],
                first["y_fit"][good],
                float(np.median(first["fwhm_fit"][good])),
                fit_shape,
            )
            log.debug(
                "PRF shape from %d stars: sigma %.3f and %.3f px, core fraction %.3f",
                int(good.sum()),
                *prf_shape,
            )
            fit = fit_prf(
                work, err, fit_mask, px[keep | hosts], py[keep | hosts], prf_shape, fit_shape
            )
            return _with_companions(
                work,
                err,
                fit_mask,
                saturated,
                fit,
                hosts[keep | hosts],
                _two_gaussian_models(prf_shape),
                params,
            )
    log.debug(
        "%d bright isolated stars (S/N >= %s): too few for a PRF shape, Gaussian fits",
        bright.size,
        _SHAPE_MIN_SNR,
    )
    return fit_gaussian_prf(work, None, fit_mask, px[keep], py[keep], params.kernel_fwhm, fit_shape)


def _with_companions(work, err, fit_mask, saturated, fit, host, models, params):
    """The fit's rows with the crowded pairs refitted and their companions added
    (:func:`_add_companions`), the saturated ``host`` rows left out."""
    fit["host"] = host
    fit = _add_companions(work, err, fit_mask, saturated, fit, models, params)
    fit = fit[~np.asarray(fit["host"])]
    del fit["host"]
    return fit


def _two_gaussian_models(prf_shape):
    """The PRF model of :func:`fit_prf`, as ``models(px, py, n, half, reach)`` gives it:
    a ``model_and_jac(params, rows)`` of those sources (see :func:`_add_companions`)."""
    shape = tuple(float(v) for v in prf_shape)

    def models(px, py, n, half, reach):
        return lambda p, rows: _two_gaussian_prf(p, shape, n, half)

    return models


def _epsf_models(psf):
    """The ePSF model of :func:`fit_epsf`, as ``models(px, py, n, half, reach)`` gives it."""

    def models(px, py, n, half, reach):
        px, py = np.asarray(px), np.asarray(py)
        if px.size <= _EPSF_CHUNK:  # held while fitted (the pairs)
            sources = psf.for_sources(px, py, reach)
            return lambda p, rows: sources.model(p, rows, n, half)

        def evaluate(p, rows):  # many sources (the residuals): made block by block
            index = np.arange(px.size)[rows]
            parts = [
                psf.for_sources(px[index[b]], py[index[b]], reach).model(
                    p[b], slice(None), n, half
                )
                for b in (slice(i, i + _EPSF_CHUNK) for i in range(0, index.size, _EPSF_CHUNK))
            ]
            return tuple(np.concatenate(v) for v in zip(*parts, strict=True))

        return evaluate

    return models


def _add_companions(work, err, fit_mask, saturated, fit, models, params):
    """Crowded pairs: a star hidden in a brighter one's peak, found in its fit's residual.

    Around each fitted source the residual (data minus its model) is
    filtered with the detection kernel, less the median the bright stars
    leave at that distance (:func:`_residual_profile`); where its
    significance -- over the pixel noise and the bright stars' scatter at
    that distance -- reaches 1.5 times ``snr_threshold`` between 1.5 and
    ``fit half + 2`` px from the source (no masked pixel in the 3x3 around
    it; no saturated pixel in the 3x3 nor, but around a saturated ``host``,
    within twice that box), a companion is fitted jointly with it (two PRFs,
    6 parameters, a square 4 px wider).  ``models(px, py, n, half, reach)``
    gives the PSF model of the sources at pixels ``(px, py)`` on ``n x n``
    squares (offsets up to ``reach`` px), as ``model_and_jac(params, rows)``
    (see :func:`_levenberg_marquardt`).  Rows of ``fit`` with ``host`` true
    are saturated stars fitted on their unsaturated pixels: searched, never
    kept.  Returns ``fit`` with the pairs' rows replaced and the companions
    appended (``companion_snr`` column: the companion's, NaN for the
    sources fitted alone).
    """
    from scipy.ndimage import correlate1d

    fit = fit.copy()
    fit["companion_snr"] = np.full(len(fit), np.nan)
    ok = np.flatnonzero(np.asarray(fit["converged"]) & ~np.asarray(fit["at_bound"]))
    if ok.size == 0:
        return fit
    half = params.fit_half + 2
    n = 2 * half + 1
    x, y = np.asarray(fit["x_fit"])[ok], np.asarray(fit["y_fit"])[ok]
    px, py, data, weight = _cutouts(work, err, fit_mask, x, y, half)
    unit = np.column_stack([np.asarray(fit["flux_fit"])[ok], x - px, y - py])
    model, _ = models(px, py, n, half, half + 1.0)(unit, slice(None))
    kernel = _gaussian_kernel_1d(params.kernel_fwhm)
    resid = np.where(weight > 0, data - model, 0.0)
    filtered = correlate1d(
        correlate1d(resid, kernel, axis=2, mode="constant"), kernel, axis=1, mode="constant"
    )
    with np.errstate(divide="ignore"):
        sigma = np.where(weight > 0, 1.0 / weight, np.inf)
    box = np.arange(n) - half
    dist = np.hypot(
        box[None, None, :] - unit[:, 1, None, None], box[None, :, None] - unit[:, 2, None, None]
    )
    flux = unit[:, 0, None, None]
    host = np.asarray(fit["host"])[ok]
    profile = _residual_profile(filtered / flux, dist, model * weight, weight, host)
    if profile is not None:  # the PRF's error (Airy rings), measured on the bright stars
        median, scatter = profile
        rbin = np.minimum((dist / _PROFILE_BIN).astype(int), median.size - 1)
        signif = (filtered - flux * median[rbin]) / np.hypot(
            np.sum(kernel**2) * sigma, flux * scatter[rbin]
        )
    else:
        # the PRF model's own error (its core and the Airy rings it leaves out) counts as noise
        model_error = model + _COMPANION_RING_ERROR * flux
        sigma = np.hypot(sigma, _COMPANION_MODEL_ERROR * model_error)
        signif = filtered / (np.sum(kernel**2) * sigma)
    signif[(dist < 1.5) | (dist > half)] = -np.inf
    best = signif.reshape(ok.size, -1).argmax(axis=1)
    best_snr = signif.reshape(ok.size, -1)[np.arange(ok.size), best]
    by, bx = np.divmod(best, n)
    unmasked = ~_windows(weight.reshape(-1, n) == 0, bx, by + n * np.arange(ok.size), 1, True)
    has = np.flatnonzero(
        (best_snr >= _COMPANION_SNR_FACTOR * params.snr_threshold) & unmasked.all(axis=(1, 2))
    )
    if has.size == 0:
        return fit
    cy, cx = by[has], bx[has]

    def near_saturated(x, y, rows):
        """A saturated pixel in the 3x3 box or, but for a saturated host's companion, within
        twice the residual box's half-size (the unfitted wings of a saturated star)."""
        if saturated is None:
            return np.zeros(x.size, bool)
        core = _windows(saturated, x, y, 1, False).any(axis=(1, 2))
        wide = _windows(saturated, x, y, 2 * half, False).any(axis=(1, 2))
        return core | (wide & ~host[rows])

    near = near_saturated(px[has] + cx - half, py[has] + cy - half, has)
    has, cy, cx = (v[~near] for v in (has, cy, cx))
    if has.size == 0:
        return fit
    start = np.column_stack(
        [unit[has], np.maximum(3.0 * resid[has, cy, cx], 1.0), cx - half, cy - half]
    )
    lo = np.array([1e-30, -half, -half, 1e-30, -half, -half], float)
    hi = -lo
    hi[[0, 3]] = np.inf

    one = models(px[has], py[has], n, half, 2.0 * half + 1.0)  # the pair's own PSF

    def pair_model(p, rows):
        m1, j1 = one(p[:, :3], rows)
        m2, j2 = one(p[:, 3:], rows)
        return m1 + m2, np.concatenate([j1, j2], axis=-1)

    pars, conv = _levenberg_marquardt(
        pair_model, data[has], weight[has], start, lo, hi, 100, positions=(1, 2, 4, 5)
    )
    inside = np.all(np.abs(pars[:, [1, 2, 4, 5]]) < half - 0.01, axis=1)
    apart = np.hypot(pars[:, 1] - pars[:, 4], pars[:, 2] - pars[:, 5]) >= 1.0
    # the companion must stay by its residual peak, off masked and saturated pixels
    fx = np.rint(px[has] + pars[:, 4]).astype(int)
    fy = np.rint(py[has] + pars[:, 5]).astype(int)
    stayed = np.hypot(pars[:, 4] - (cx - half), pars[:, 5] - (cy - half)) < 1.0
    clean = ~_windows(fit_mask, fx, fy, 1, True).any(axis=(1, 2)) & ~near_saturated(fx, fy, has)
    good = conv & inside & apart & stayed & clean
    rows = ok[has[good]]
    fit["x_fit"][rows] = px[has[good]] + pars[good, 1]
    fit["y_fit"][rows] = py[has[good]] + pars[good, 2]
    fit["flux_fit"][rows] = pars[good, 0]
    extra = Table(
        {
            "x_fit": px[has[good]] + pars[good, 4],
            "y_fit": py[has[good]] + pars[good, 5],
            "flux_fit": pars[good, 3],
            "converged": np.ones(good.sum(), bool),
            "at_bound": np.zeros(good.sum(), bool),
            "companion_snr": best_snr[has[good]],
            "host": np.zeros(good.sum(), bool),
        }
    )
    log.debug("%d companions found in fit residuals", len(extra))
    from astropy.table import vstack

    return vstack([fit, extra])


def _residual_profile(filtered, dist, snr_map, weight, host):
    """The PRF model's error, measured: the filtered residual of bright stars by distance.

    ``filtered`` is the filtered residual per unit flux ``(N, n, n)``, ``dist``
    each pixel's distance from the fitted centre, ``snr_map`` the model over
    the noise.  Over the sources (not ``host``) whose model peaks at S/N
    >= 50, the median (what the PRF systematically leaves, e.g. Airy rings)
    and the scatter (1.4826 MAD: pixel phase, noise) in ``_PROFILE_BIN``-px
    rings; medians are robust to the few pairs among them.  ``None`` with
    fewer than ``_SHAPE_MIN_STARS`` such sources.
    """
    bright = ~host & (snr_map.max(axis=(1, 2)) >= _SHAPE_MIN_SNR)
    if bright.sum() < _SHAPE_MIN_STARS:
        return None
    rbin = (dist[bright] / _PROFILE_BIN).astype(int)
    valid = weight[bright] > 0
    median, scatter = np.zeros(int(rbin.max()) + 1), np.zeros(int(rbin.max()) + 1)
    for b in range(median.size):
        v = filtered[bright][(rbin == b) & valid]
        if v.size < _PROFILE_MIN_PIXELS:  # (bin 0 is always full: dist < 1 is 4+ px a star)
            median[b], scatter[b] = median[b - 1], scatter[b - 1]
            continue
        median[b] = np.median(v)
        scatter[b] = 1.4826 * np.median(np.abs(v - median[b]))
    return median, scatter


def _drop_duplicates(x, y, peak, significance, radius):
    """Of centroids closer than ``radius``, keep the most significant (peaks of one star)."""
    from scipy.spatial import cKDTree

    order = np.argsort(-significance, kind="stable")
    x, y, peak, significance = x[order], y[order], peak[order], significance[order]
    keep = np.ones(x.size, bool)
    for i, j in sorted(cKDTree(np.column_stack([x, y])).query_pairs(radius)):
        if keep[i]:
            keep[j] = False
    return x[keep], y[keep], peak[keep], significance[keep]


def _empty() -> Table:
    return Table({name: np.zeros(0) for name in ("x", "y", "flux", "peak", "snr")})


@dataclass(frozen=True)
class DetectionJob:
    """Detection of one image and the writing of its catalog, ready to run anywhere.

    A small picklable value the step hands to a worker process: the image's
    arrays are read from ``image_file`` by the worker itself (so they never
    pass through the main process) or, for an image that exists only in
    memory, given in ``arrays``.

    Attributes
    ----------
    image : str
        The image's name (for messages).
    catalog_file : pathlib.Path
        Where the catalog is written (:func:`write_catalog`).
    catalog_format : str
        Its astropy format.
    params : DetectionParameters
        Detection settings.
    image_file : str or None
        ASDF file holding ``data``, ``dq`` and ``err``.
    arrays : tuple or None
        ``(data, dq, err)`` when there is no ``image_file``.
    detector, optical_element : str
        The image's ``meta.instrument.detector`` and ``optical_element``: they
        choose its ePSF when ``params.psf_model`` is a folder.
    """

    image: str
    catalog_file: Path
    catalog_format: str
    params: DetectionParameters
    image_file: str | None = None
    arrays: tuple | None = None
    detector: str = ""
    optical_element: str = ""

    def psf(self) -> EPSFModel | None:
        """The image's ePSF (:func:`roman_tweakreg.psf.find_epsf`), or None without
        ``params.psf_model``.

        Raises
        ------
        PSFModelError
            No ePSF for the image's detector and optical element, or unreadable.
        """
        if not self.params.psf_model:
            return None
        from .psf import find_epsf

        return find_epsf(self.params.psf_model, self.detector, self.optical_element)

    def run(self) -> Table:
        """Detect the sources, write the catalog and return it."""
        psf = self.psf()
        if self.arrays is not None:
            data, dq, err = self.arrays
            table = detect_sources(data, dq, err, self.params, psf=psf)
        else:
            import roman_datamodels as rdm

            with rdm.open(self.image_file) as model:
                err = getattr(model, "err", None)
                table = detect_sources(model.data, model.dq, err, self.params, psf=psf)
        try:
            write_catalog(table, self.catalog_file, self.catalog_format)
        except (OSError, MemoryError) as err:
            raise OutputError(
                f"{self.image}: the detected catalog cannot be written to {self.catalog_file}: "
                f"{type(err).__name__}: {err}"
            ) from err
        log.info(
            "%s: %d sources detected (positions fitted with %s), catalog written to %s",
            self.image,
            len(table),
            f"the ePSF {psf.source}" if psf is not None else "the empirical PRF",
            self.catalog_file,
        )
        return table


def catalog_filename(
    image_filename: str | os.PathLike, catalog_path: str | os.PathLike, catalog_format: str
) -> Path:
    """Where the detected catalog of an image goes: ``<catalog_path>/<root>_cat.<ext>``.

    ``root`` is the image file name without directories and without a
    ``.asdf`` suffix; ``ext`` follows ``catalog_format`` (``ascii.ecsv`` ->
    ``ecsv``, ``ascii.csv`` -> ``csv``, ``fits`` -> ``fits``, ``parquet`` ->
    ``parquet``; otherwise its last dotted part).

    Examples
    --------
    >>> catalog_filename("r0001_wfi01_cal.asdf", "cats", "ascii.ecsv").as_posix()
    'cats/r0001_wfi01_cal_cat.ecsv'
    """
    name = Path(image_filename).name
    if name.lower().endswith(".asdf"):
        name = name[: -len(".asdf")]
    return Path(catalog_path) / f"{name}_cat{table_suffix(catalog_format)}"


def write_catalog(
    table: Table, path: str | os.PathLike, catalog_format: str = "ascii.ecsv"
) -> Path:
    """Write ``table`` atomically: to a temporary file in the same folder, then renamed.

    Parameters
    ----------
    table : astropy.table.Table
        The catalog.
    path : str or os.PathLike
        Destination; a ``.parquet`` suffix writes Parquet (pyarrow),
        anything else ``table.write(format=catalog_format)``.
    catalog_format : str
        astropy Table format for non-Parquet files.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        write_atomically(path, lambda p: write_parquet(table, p))
    else:
        write_atomically(path, lambda p: table.write(p, format=catalog_format))
    log.debug("Wrote catalog of %d sources to %s", len(table), path)
    return path
