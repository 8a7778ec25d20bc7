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
5. Positions: :func:`fit_gaussian_prf` fits a pixel-integrated circular
   Gaussian (free x, y, flux and FWHM) to the ``2 ceil(1.5 FWHM) + 1`` square
   around each peak, weighted by the noise, masked pixels left out; all
   sources at once (vectorised Levenberg-Marquardt with the analytic
   Jacobian).  It reaches the same least-squares minimum as photutils
   ``PSFPhotometry`` with ``CircularGaussianPRF`` (tested to 0.001 px) at a
   thousandth of the cost.  Fits that do not converge, end at the 1.5 px
   position bound or at a FWHM bound are dropped, as is the less significant
   of two centroids closer than ``min_separation``.
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
from ._io import write_atomically, write_parquet
from .errors import OutputError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = [
    "DO_NOT_USE",
    "DetectionJob",
    "DetectionParameters",
    "catalog_filename",
    "detect_sources",
    "fit_gaussian_prf",
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


def _prf_and_jacobian(params: np.ndarray, n: int, half: int):
    """Pixel-integrated circular Gaussian on an ``n x n`` grid centred on pixel ``half``.

    ``params`` is ``(N, 4)``: flux, x, y (relative to the central pixel), sigma.
    Returns the model ``(N, n, n)`` and its derivatives ``(N, n, n, 4)``.
    """
    from scipy.special import ndtr

    flux, x0, y0, sigma = params.T
    edges = np.arange(n + 1) - half - 0.5
    s = sigma[:, None]
    bx = (edges[None, :] - x0[:, None]) / s
    by = (edges[None, :] - y0[:, None]) / s
    pdf_x = np.exp(-0.5 * bx**2) / np.sqrt(2 * np.pi)
    pdf_y = np.exp(-0.5 * by**2) / np.sqrt(2 * np.pi)
    ex, ey = np.diff(ndtr(bx), axis=1), np.diff(ndtr(by), axis=1)
    dex_dx = -np.diff(pdf_x, axis=1) / s
    dey_dy = -np.diff(pdf_y, axis=1) / s
    dex_ds = -np.diff(bx * pdf_x, axis=1) / s
    dey_ds = -np.diff(by * pdf_y, axis=1) / s
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
    px, py = np.rint(x_init).astype(int), np.rint(y_init).astype(int)
    n_src = px.size
    data = _windows(image, px, py, half, np.nan).astype(float)
    weight = np.ones_like(data) if error is None else 1.0 / _windows(error, px, py, half, np.nan)
    bad = ~np.isfinite(data) | ~np.isfinite(weight)
    if mask is not None:
        bad |= _windows(mask, px, py, half, True)
    data, weight = np.where(bad, 0.0, data), np.where(bad, 0.0, weight)
    lo = np.array([1e-30, -max_shift, -max_shift, fwhm_bounds[0] * fwhm * _FWHM_TO_SIGMA])
    hi = np.array([np.inf, max_shift, max_shift, fwhm_bounds[1] * fwhm * _FWHM_TO_SIGMA])
    params = np.column_stack(
        [
            np.maximum(data.sum(axis=(1, 2)), 1.0),
            x_init - px,
            y_init - py,
            np.full(n_src, fwhm * _FWHM_TO_SIGMA),
        ]
    )
    params = np.clip(params, lo, hi)
    damping = np.full(n_src, 1e-3)
    converged = np.zeros(n_src, bool)

    def chi2(p, rows):
        model, jac = _prf_and_jacobian(p, fit_shape, half)
        return np.sum(((data[rows] - model) * weight[rows]) ** 2, axis=(1, 2)), model, jac

    cost, model, jac = chi2(params, slice(None))
    active = np.ones(n_src, bool)
    for _ in range(max_iter):
        if not active.any():
            break
        a = np.flatnonzero(active)
        jw = (jac[a] * weight[a, ..., None]).reshape(a.size, -1, 4)
        resid = ((data[a] - model[a]) * weight[a]).reshape(a.size, -1)
        normal = np.einsum("npi,npj->nij", jw, jw)
        grad = np.einsum("npi,np->ni", jw, resid)
        diag = np.einsum("nii->ni", normal)
        damped = normal + (damping[a, None] * np.maximum(diag, 1e-30))[:, :, None] * np.eye(4)
        try:
            step = np.linalg.solve(damped, grad[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(damped.reshape(-1, 4), grad.reshape(-1), rcond=None)[0]
        trial = np.clip(params[a] + step, lo, hi)
        new_cost, new_model, new_jac = chi2(trial, a)
        better = new_cost <= cost[a]
        moved = np.abs(trial - params[a])[:, 1:3].max(axis=1)
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
        Detection settings; the defaults when omitted.

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
    import sep
    from scipy.ndimage import correlate1d

    params = (params or DetectionParameters()).validate()
    image = np.asarray(getattr(data, "value", data))
    if image.ndim != 2:
        raise ValueError(f"detect_sources needs a 2-D image, got shape {image.shape}")
    masked, saturated = _masks(image, dq)
    if err is not None:
        err = np.asarray(getattr(err, "value", err))
        if err.shape != image.shape:
            raise ValueError(f"err shape {err.shape} differs from data shape {image.shape}")
    if masked.all():
        log.warning("No usable pixel: every pixel is non-finite or flagged")
        return _empty()

    # 1-2: a float32 copy with masked pixels 0, background subtracted
    work = np.array(image, dtype=np.float32, order="C")
    work[masked] = 0.0
    box = min(int(params.bkg_boxsize), *image.shape)
    no_bkg = masked if saturated is None else masked | saturated
    background = sep.Background(
        work, mask=no_bkg, bw=box, bh=box, fw=params.bkg_filter_size, fh=params.bkg_filter_size
    )
    background.subfrom(work)
    work[masked] = 0.0
    del no_bkg
    global_rms = float(background.globalrms)
    if err is not None:
        good_err = ~masked & np.isfinite(err) & (err > 0)
        noise_floor = float(np.min(err, where=good_err, initial=np.inf))
        noise_floor = min(max(noise_floor, 0.5 * global_rms), global_rms)
        del good_err
    else:
        noise_floor = global_rms
    if not global_rms > 0:
        log.info("The background has no noise: no significance can be measured")
        return _empty()

    # 3: matched filter; candidates above a lower bound of the threshold, then exact
    kernel = _gaussian_kernel_1d(params.kernel_fwhm).astype(np.float32)
    signal = correlate1d(work, kernel, axis=1, mode="constant")
    signal = correlate1d(signal, kernel, axis=0, mode="constant", output=signal)
    k_norm = float(np.sum(kernel**2))  # ||k2d||_2 = sum(k1d^2) for a separable kernel
    bound = _NOISE_MARGIN * params.snr_threshold * k_norm * noise_floor
    index = np.flatnonzero(signal > bound)
    index = _local_maxima(signal, index, params.min_separation)
    py, px = np.divmod(index, image.shape[1])
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
    px, py, significance = px[above], py[above], significance[above]
    n_found = px.size
    if n_found == 0:
        log.info("No source above S/N %s", params.snr_threshold)
        return _empty()

    # 4: sharp peaks, masked cores, saturation
    core = _windows(work, px, py, 1).reshape(n_found, 9)
    peak = core.max(axis=1).astype(float)
    total = core.sum(axis=1, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        sharp_ok = (total > 0) & (peak <= params.max_peak_fraction * total)
    core_masked = _windows(masked, px, py, 1, True).reshape(n_found, 9).any(axis=1)
    near_saturated = np.zeros(n_found, bool)
    if saturated is not None:
        near_saturated = _windows(saturated, px, py, params.fit_half + 2, False).any(axis=(1, 2))
    keep = sharp_ok & ~core_masked & ~near_saturated

    # 5: positions
    fit_mask = masked if saturated is None else masked | saturated
    fit = fit_gaussian_prf(
        work, None, fit_mask, px[keep], py[keep], params.kernel_fwhm, 2 * params.fit_half + 1
    )
    del fit_mask
    usable = np.asarray(fit["converged"]) & ~np.asarray(fit["at_bound"])
    x, y = np.asarray(fit["x_fit"])[usable], np.asarray(fit["y_fit"])[usable]
    peak, significance = peak[keep][usable], significance[keep][usable]
    log.debug(
        "%d peaks; dropped %d sharp (hot pixel / cosmic ray), %d near masked pixels, "
        "%d near saturated pixels, %d failed fits",
        n_found,
        int((~sharp_ok).sum()),
        int((sharp_ok & core_masked).sum()),
        int((sharp_ok & ~core_masked & near_saturated).sum()),
        int((~usable).sum()),
    )
    x, y, peak, significance = _drop_duplicates(x, y, peak, significance, params.min_separation)
    if x.size == 0:
        return _empty()

    # 6: fluxes, peakmax, brightest
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
    log.info(
        "Detected %d sources (%d peaks above S/N %s)", len(table), n_found, params.snr_threshold
    )
    return table


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
    """

    image: str
    catalog_file: Path
    catalog_format: str
    params: DetectionParameters
    image_file: str | None = None
    arrays: tuple | None = None

    def run(self) -> Table:
        """Detect the sources, write the catalog and return it."""
        if self.arrays is not None:
            data, dq, err = self.arrays
            table = detect_sources(data, dq, err, self.params)
        else:
            import roman_datamodels as rdm

            with rdm.open(self.image_file) as model:
                err = getattr(model, "err", None)
                table = detect_sources(model.data, model.dq, err, self.params)
        try:
            write_catalog(table, self.catalog_file, self.catalog_format)
        except (OSError, MemoryError) as err:
            raise OutputError(
                f"{self.image}: the detected catalog cannot be written to {self.catalog_file}: "
                f"{type(err).__name__}: {err}"
            ) from err
        log.info(
            "%s: %d sources detected, catalog written to %s",
            self.image,
            len(table),
            self.catalog_file,
        )
        return table


_EXTENSIONS = {"ascii.ecsv": "ecsv", "ascii.csv": "csv", "ascii.commented_header": "txt"}


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
    fmt = catalog_format.lower()
    ext = _EXTENSIONS.get(fmt, fmt.rsplit(".", 1)[-1])
    return Path(catalog_path) / f"{name}_cat.{ext}"


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
