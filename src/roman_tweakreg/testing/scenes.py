"""One WFI detector's pixels with a known truth, for detection tests and benchmarks.

The PSF (:func:`wfi_psf`) is the diffraction pattern of Roman's 2.36 m aperture
(an Airy pattern; the central obstruction and struts are left out) at a filter's
central wavelength, blurred by a Gaussian standing for pointing jitter and
charge diffusion, and integrated over square pixels of 0.11 arcsec.  Its radial
profile is computed once by a Hankel transform of the optical transfer
function (the Airy modulation transfer function times the Gaussian's);
pixel-integrated stamps average it over ``oversample**2`` points per pixel.
At 1.58 um (F158) with the default jitter the FWHM is 1.43 px before
pixel integration: the PSF is undersampled, as on the WFI.

:func:`make_scene` adds, with seeded randomness: a sky with a gradient,
isolated stars of log-uniform S/N, crowded pairs, saturated stars (pixels over
the full well clipped and flagged ``SATURATED``), cosmic-ray hits left in the
data and flagged ``JUMP_DET``, hot pixels flagged ``HOT``, unusable pixels
(a dead column, NaN pixels) flagged ``DO_NOT_USE``, Poisson and read noise, and
an ``err`` array (the per-pixel 1-sigma noise of the noiseless model).  Counts
are electrons.  The DQ bits are roman_datamodels' (:data:`FLAGGED`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from astropy.table import Table
from roman_datamodels.dqflags import pixel as dqflags
from scipy.special import j0

__all__ = [
    "FILTER_WAVELENGTHS",
    "FLAGGED",
    "PSF",
    "Scene",
    "make_scene",
    "match",
    "position_crb",
    "wfi_psf",
]

#: Central wavelengths (micrometres) of the WFI imaging filters.
FILTER_WAVELENGTHS = {
    "F062": 0.620,
    "F087": 0.869,
    "F106": 1.060,
    "F129": 1.293,
    "F158": 1.577,
    "F184": 1.842,
    "F213": 2.125,
}
APERTURE_M = 2.36  # Roman's primary mirror diameter
PIXEL_ARCSEC = 0.11
#: DQ bits that make a pixel unfit for measuring a star.
FLAGGED = int(dqflags.DO_NOT_USE | dqflags.SATURATED | dqflags.JUMP_DET | dqflags.HOT)

_R_STEP = 0.01  # px, radial profile sampling
_R_MAX = 40.0  # px


@lru_cache(maxsize=16)
def _radial_profile(lambda_over_d: float, jitter: float) -> np.ndarray:
    """PSF(r) per unit flux on ``r = 0, _R_STEP, ... _R_MAX`` px (Hankel transform of the OTF)."""
    nu_c = 1.0 / lambda_over_d  # cut-off frequency, cycles per pixel
    nu = np.linspace(0.0, nu_c, 2001)
    q = nu / nu_c
    otf = (2.0 / np.pi) * (np.arccos(q) - q * np.sqrt(1.0 - q**2))
    otf *= np.exp(-2.0 * (np.pi * jitter * nu) ** 2)
    r = np.arange(0.0, _R_MAX + _R_STEP, _R_STEP)
    integrand = otf * nu * j0(2.0 * np.pi * np.outer(r, nu))
    return 2.0 * np.pi * np.trapezoid(integrand, nu, axis=1)


@dataclass(frozen=True)
class PSF:
    """A circular Airy pattern blurred by a Gaussian, in pixels of the detector.

    Attributes
    ----------
    lambda_over_d : float
        Wavelength over aperture diameter, in pixels.
    jitter : float
        Sigma (pixels) of the Gaussian blur (pointing jitter, charge diffusion).
    """

    lambda_over_d: float
    jitter: float = 0.3

    @property
    def profile(self) -> np.ndarray:
        """PSF(r) per unit flux, r in steps of 0.01 px."""
        return _radial_profile(float(self.lambda_over_d), float(self.jitter))

    @property
    def fwhm(self) -> float:
        """FWHM (pixels) of the PSF before pixel integration."""
        prof = self.profile
        below = np.argmax(prof < prof[0] / 2)
        r0 = (below - 1) * _R_STEP
        frac = (prof[below - 1] - prof[0] / 2) / (prof[below - 1] - prof[below])
        return 2.0 * (r0 + frac * _R_STEP)

    def prf(self, dx, dy, half: int = 8, oversample: int = 7) -> np.ndarray:
        """Unit-flux stamps integrated over pixels.

        Parameters
        ----------
        dx, dy : array-like, shape (N,)
            Offsets (pixels) of each star from the centre of its stamp's central pixel.
        half : int
            Stamps are ``2 half + 1`` pixels square.
        oversample : int
            Sample points per pixel and axis (midpoint rule).

        Returns
        -------
        numpy.ndarray, shape (N, 2 half + 1, 2 half + 1)
            Flux fraction per pixel (sums to the encircled energy of the stamp).
        """
        dx, dy = np.atleast_1d(np.asarray(dx, float)), np.atleast_1d(np.asarray(dy, float))
        n = 2 * half + 1
        s = (np.arange(n * oversample) + 0.5) / oversample - 0.5 - half
        prof = self.profile
        out = np.empty((dx.size, n, n))
        for start in range(0, dx.size, 64):
            sl = slice(start, start + 64)
            ddx = s[None, None, :] - dx[sl, None, None]
            ddy = s[None, :, None] - dy[sl, None, None]
            r = np.sqrt(ddx**2 + ddy**2)
            values = np.interp(r / _R_STEP, np.arange(prof.size), prof, right=0.0)
            out[sl] = values.reshape(-1, n, oversample, n, oversample).mean(axis=(2, 4))
        return out


def wfi_psf(filter_name: str = "F158", jitter: float = 0.3) -> PSF:
    """The :class:`PSF` of a WFI filter (see :data:`FILTER_WAVELENGTHS`).

    Raises
    ------
    ValueError
        For an unknown filter name.
    """
    try:
        wavelength = FILTER_WAVELENGTHS[filter_name.upper()]
    except KeyError:
        raise ValueError(
            f"unknown WFI filter {filter_name!r}; expected one of {', '.join(FILTER_WAVELENGTHS)}"
        ) from None
    lambda_over_d = wavelength * 1e-6 / APERTURE_M * 206264.806 / PIXEL_ARCSEC
    return PSF(lambda_over_d, jitter)


@dataclass
class Scene:
    """A rendered detector and its truth.

    Attributes
    ----------
    data : numpy.ndarray, float32
        Counts (electrons), sky included.
    dq : numpy.ndarray, uint32
        roman_datamodels DQ bits.
    err : numpy.ndarray, float32
        1-sigma noise per pixel: ``sqrt(model + read_noise**2)``.
    truth : astropy.table.Table
        One row per star: ``x``, ``y`` (0-indexed pixels), ``flux`` (electrons),
        ``snr`` (optimal S/N: ``sqrt(sum (F p)^2 / (sky + F p + rn^2))`` over the
        stamp, what a fit with known PSF and position reaches), ``kind``
        (``single``, ``pair`` or ``saturated``) and ``flagged`` (a pixel with a
        :data:`FLAGGED` bit lies within 2 px of the star's centre pixel, or a
        ``SATURATED`` one within 6 px).
    psf : PSF
        The PSF used.
    sky : numpy.ndarray
        The noiseless sky.
    read_noise : float
        Electrons.
    """

    data: np.ndarray
    dq: np.ndarray
    err: np.ndarray
    truth: Table
    psf: PSF
    sky: np.ndarray = field(repr=False)
    read_noise: float = 8.0


def _positions(rng, n, shape, margin, min_separation, taken=()):
    """``n`` random positions at least ``min_separation`` from each other and from ``taken``."""
    ny, nx = shape
    cell = max(min_separation, 1.0)
    grid: dict[tuple[int, int], list] = {}

    def free(p):
        cx, cy = int(p[0] // cell), int(p[1] // cell)
        return all(
            np.hypot(*(p - q)) >= min_separation
            for i in (-1, 0, 1)
            for j in (-1, 0, 1)
            for q in grid.get((cx + i, cy + j), ())
        )

    def add(p):
        grid.setdefault((int(p[0] // cell), int(p[1] // cell)), []).append(p)

    for p in np.asarray(taken, float).reshape(-1, 2):
        add(p)
    out: list = []
    for _ in range(1000):
        for p in rng.uniform((margin, margin), (nx - 1 - margin, ny - 1 - margin), (2 * n + 8, 2)):
            if len(out) == n:
                return np.asarray(out).reshape(-1, 2)
            if free(p):
                out.append(p)
                add(p)
        if len(out) == n:
            break
    if len(out) < n:
        raise ValueError(f"cannot place {n} stars {min_separation} px apart in {shape}")
    return np.asarray(out).reshape(-1, 2)


def make_scene(
    shape: tuple[int, int] = (512, 512),
    *,
    seed: int = 0,
    n_stars: int = 250,
    snr_range: tuple[float, float] = (3.0, 1000.0),
    filter_name: str = "F158",
    psf: PSF | None = None,
    sky: tuple[float, float] = (100.0, 250.0),
    read_noise: float = 8.0,
    min_separation: float = 10.0,
    n_pairs: int = 0,
    pair_separation: tuple[float, float] = (2.5, 5.0),
    n_saturated: int = 0,
    full_well: float = 6.5e4,
    n_cosmic_rays: int = 0,
    n_hot: int = 0,
    n_nan: int = 0,
    dead_column: bool = False,
) -> Scene:
    """Render one detector (see the module docstring).

    Parameters
    ----------
    shape : (ny, nx)
        Image shape.
    seed : int
        Seed of ``numpy.random.default_rng``.
    n_stars : int
        Isolated stars (``kind='single'``), each at least ``min_separation`` px
        from every other star, with S/N log-uniform in ``snr_range``.
    filter_name, psf :
        The PSF: ``psf`` if given, else :func:`wfi_psf` of ``filter_name``.
    sky : (low, high)
        Sky (electrons) rising linearly from ``low`` at x = 0 to ``high`` at the far
        corner (half of the rise along y).
    read_noise : float
        Electrons, Gaussian.
    n_pairs : int
        Crowded pairs (``kind='pair'``): two stars ``pair_separation`` px apart,
        S/N in ``snr_range`` (log-uniform) each.
    n_saturated : int
        Stars whose peak exceeds ``full_well`` 3-300 times (``kind='saturated'``).
    n_cosmic_rays, n_hot, n_nan : int
        Cosmic-ray tracks (1-4 px, 2e3-5e4 e- per pixel, ``JUMP_DET``), hot pixels
        (2e3-5e4 e-, ``HOT``), NaN pixels (``DO_NOT_USE``).
    dead_column : bool
        Column ``nx // 2 + 45`` reads 0 and is flagged ``DO_NOT_USE``.

    Returns
    -------
    Scene
    """
    rng = np.random.default_rng(seed)
    psf = psf or wfi_psf(filter_name)
    ny, nx = shape
    half = 8
    margin = half + 2
    yy, xx = np.mgrid[0:ny, 0:nx]
    sky_map = sky[0] + (sky[1] - sky[0]) * (xx / nx + 0.5 * yy / ny) / 1.5
    del xx, yy

    bright = _positions(rng, n_saturated, shape, 3 * margin, 4 * min_separation)
    singles = _positions(rng, n_stars, shape, margin, min_separation, bright)
    centres = _positions(
        rng, n_pairs, shape, margin, min_separation + 6.0, np.concatenate([bright, singles])
    )
    angle = rng.uniform(0, 2 * np.pi, n_pairs)
    sep = rng.uniform(*pair_separation, n_pairs)
    offset = 0.5 * sep[:, None] * np.column_stack([np.cos(angle), np.sin(angle)])
    pairs = np.concatenate([centres - offset, centres + offset]).reshape(-1, 2)
    xy = np.concatenate([singles, pairs, bright])
    kind = np.array(["single"] * len(singles) + ["pair"] * len(pairs) + ["saturated"] * len(bright))
    n = len(xy)

    ix, iy = np.rint(xy[:, 0]).astype(int), np.rint(xy[:, 1]).astype(int)
    stamps = psf.prf(xy[:, 0] - ix, xy[:, 1] - iy, half)
    box = np.arange(-half, half + 1)
    rows = iy[:, None, None] + box[None, :, None]
    cols = ix[:, None, None] + box[None, None, :]
    var0 = sky_map[rows, cols] + read_noise**2
    # flux giving the target S/N, by bisection in log flux (all stars at once)
    target = np.exp(rng.uniform(*np.log(snr_range), n))
    lo, hi = np.zeros(n), np.full(n, np.log(1e9))
    for _ in range(60):
        f = np.exp(0.5 * (lo + hi))[:, None, None]
        s = np.sqrt(np.sum((f * stamps) ** 2 / (var0 + f * stamps), axis=(1, 2)))
        low = s < target
        lo, hi = np.where(low, 0.5 * (lo + hi), lo), np.where(low, hi, 0.5 * (lo + hi))
    flux = np.exp(0.5 * (lo + hi))
    saturated = kind == "saturated"
    flux[saturated] = (
        full_well
        / stamps[saturated].max(axis=(1, 2))
        * np.exp(rng.uniform(np.log(3.0), np.log(300.0), saturated.sum()))
    )
    signal = flux[:, None, None] * stamps
    snr = np.sqrt(np.sum(signal**2 / (var0 + signal), axis=(1, 2)))

    model = sky_map.copy()
    np.add.at(model, (rows, cols), flux[:, None, None] * stamps)
    err = np.sqrt(model + read_noise**2).astype(np.float32)
    data = rng.poisson(model).astype(np.float32)
    data += rng.normal(0.0, read_noise, shape).astype(np.float32)
    dq = np.zeros(shape, np.uint32)
    over = model > full_well
    data[over] = full_well
    dq[over] |= int(dqflags.SATURATED)
    del model

    for _ in range(n_cosmic_rays):
        length = int(rng.integers(1, 5))
        cx, cy = rng.integers(2, (nx - 6, ny - 6))
        step = rng.choice([(1, 0), (0, 1), (1, 1), (1, -1)])
        for k in range(length):
            px, py = cx + k * step[0], min(max(cy + k * step[1], 0), ny - 1)
            data[py, px] += rng.uniform(2e3, 5e4)
            dq[py, px] |= int(dqflags.JUMP_DET)
    hot = rng.integers(0, (nx, ny), (n_hot, 2))
    data[hot[:, 1], hot[:, 0]] += rng.uniform(2e3, 5e4, n_hot)
    dq[hot[:, 1], hot[:, 0]] |= int(dqflags.HOT)
    if dead_column:
        column = min(nx // 2 + 45, nx - 1)
        data[:, column] = 0.0
        dq[:, column] |= int(dqflags.DO_NOT_USE)
    nan = rng.integers(0, (nx, ny), (n_nan, 2))
    data[nan[:, 1], nan[:, 0]] = np.nan
    dq[nan[:, 1], nan[:, 0]] |= int(dqflags.DO_NOT_USE)

    near = np.zeros(n, bool)
    flagged = (dq & FLAGGED) != 0
    saturated_px = (dq & int(dqflags.SATURATED)) != 0
    for dy in range(-6, 7):
        for dx in range(-6, 7):
            rr, cc = np.clip(iy + dy, 0, ny - 1), np.clip(ix + dx, 0, nx - 1)
            near |= saturated_px[rr, cc]
            if max(abs(dx), abs(dy)) <= 2:
                near |= flagged[rr, cc]
    truth = Table(
        {"x": xy[:, 0], "y": xy[:, 1], "flux": flux, "snr": snr, "kind": kind, "flagged": near}
    )
    return Scene(data, dq, err, truth, psf, sky_map, read_noise)


def position_crb(scene: Scene, index=None, step: float = 1e-3) -> np.ndarray:
    """Cramer-Rao bound of the 2-D position error of stars of ``scene``.

    For each star the Fisher information of its flux and position is summed over
    its stamp, from the PSF's pixel derivatives (central differences of
    :meth:`PSF.prf`, ``step`` px) and the per-pixel variance ``err**2``; the
    bound is ``sqrt(var(x) + var(y))`` from its inverse, with the sky known.
    Neighbours are ignored (meant for isolated stars).

    Parameters
    ----------
    scene : Scene
    index : array-like of int, optional
        Rows of ``scene.truth``; all when omitted.

    Returns
    -------
    numpy.ndarray
        Pixels, one per star.
    """
    truth = scene.truth if index is None else scene.truth[np.asarray(index)]
    half = 6  # the position information beyond 6 px is negligible
    x, y, flux = (np.asarray(truth[c], float) for c in ("x", "y", "flux"))
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    dx, dy = x - ix, y - iy
    box = np.arange(-half, half + 1)
    rows = np.clip(iy[:, None, None] + box[None, :, None], 0, scene.err.shape[0] - 1)
    cols = np.clip(ix[:, None, None] + box[None, None, :], 0, scene.err.shape[1] - 1)
    var = scene.err[rows, cols].astype(float) ** 2
    prf, scale = scene.psf.prf, flux[:, None, None] / (2 * step)
    jac = np.stack(
        [
            prf(dx, dy, half),
            scale * (prf(dx + step, dy, half) - prf(dx - step, dy, half)),
            scale * (prf(dx, dy + step, half) - prf(dx, dy - step, half)),
        ],
        axis=-1,
    ).reshape(len(x), -1, 3)
    fisher = np.einsum("npi,np,npj->nij", jac, 1.0 / var.reshape(len(x), -1), jac)
    cov = np.linalg.inv(fisher)
    return np.sqrt(cov[:, 1, 1] + cov[:, 2, 2])


def match(x, y, truth: Table, radius: float = 0.5):
    """Nearest detection to each true star.

    Returns
    -------
    found : numpy.ndarray of bool
        A detection lies within ``radius`` px of the star.
    index : numpy.ndarray of int
        That detection's row (meaningless where not found).
    offset : numpy.ndarray, shape (N, 2)
        Detection minus truth (NaN where not found).
    """
    from scipy.spatial import cKDTree

    n = len(truth)
    if len(x) == 0:
        return np.zeros(n, bool), np.zeros(n, int), np.full((n, 2), np.nan)
    txy = np.column_stack([truth["x"], truth["y"]])
    dist, index = cKDTree(np.column_stack([x, y])).query(txy)
    found = dist < radius
    offset = np.column_stack([np.asarray(x)[index], np.asarray(y)[index]]) - txy
    offset[~found] = np.nan
    return found, index, offset
