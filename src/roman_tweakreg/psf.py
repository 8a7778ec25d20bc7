"""Roman ePSF models for source detection: romancal's ``epsf`` reference files.

A file is a roman_datamodels ``EpsfRefModel`` (CRDS reference type ``epsf``):
``psf[defocus, spectral_type, grid_index, y, x]`` holds oversampled ePSF stamps
(the PSF already integrated over a WFI pixel, sampled ``meta.oversample`` times per
pixel) at the detector positions ``meta.pixel_x[grid_index]``,
``meta.pixel_y[grid_index]`` (0-indexed pixels) of one detector
(``meta.instrument.detector``) and optical element
(``meta.instrument.optical_element``).  The stamps' centre -- sample
``((ny - 1) / 2, (nx - 1) / 2)``, as in photutils' ``ImagePSF`` -- is the star's
position, the point the WCS maps.

What is used of a file (:func:`read_epsf`):

* defocus index 0 (in focus);
* spectral type ``G2V`` when the file lists it in ``meta.spectral_type`` (as
  romancal's source catalog does), else the first;
* stamps whose sum is less than half ``oversample**2`` are point-sampled PSFs (the
  early reference files): they are integrated over a pixel (a centred box of
  ``oversample`` samples) first, as romancal does;
* each stamp is normalised so that its samples on a pixel lattice sum to 1 (the
  fit's flux is then the star's flux).

Between grid positions the stamps are interpolated bilinearly in the detector
position, from the four surrounding grid points, and clamped to the nearest grid
edge outside it, as photutils' ``GriddedPSFModel`` does; within a stamp, by cubic
B-splines (photutils' ``ImagePSF`` uses cubic splines too).  The grid positions
must form a rectangular grid (every ``pixel_x`` with every ``pixel_y``).

:func:`find_epsf` picks the file of one image: ``psf_model`` is one file (which
must be for the image's detector and optical element) or a folder of them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import PSFModelError

__all__ = ["SPECTRAL_TYPE", "EPSFModel", "SourceEPSF", "find_epsf", "read_epsf"]

log = logging.getLogger(__name__)

#: The spectral type used when a file lists it (romancal's choice); else the first.
SPECTRAL_TYPE = "G2V"


@dataclass(frozen=True, eq=False)
class EPSFModel:
    """The ePSF of one detector and optical element, on a grid of detector positions.

    Attributes
    ----------
    stamps : numpy.ndarray
        ``(G, ny, nx)`` normalised ePSF stamps (see the module docstring).
    grid_x, grid_y : numpy.ndarray
        ``(G,)`` detector positions (0-indexed pixels) of the stamps.
    oversample : int
        Samples per pixel.
    detector, optical_element : str
        What the stamps are for (``WFI01``, ``F158``...).
    source : str
        Where they were read from (for messages).
    spectral_type : str
        The spectral type used (``''`` when the file names none).
    """

    stamps: np.ndarray
    grid_x: np.ndarray
    grid_y: np.ndarray
    oversample: int
    detector: str = ""
    optical_element: str = ""
    source: str = ""
    spectral_type: str = ""
    _coeffs: np.ndarray = field(init=False, repr=False)
    _grid: tuple = field(init=False, repr=False)

    def __post_init__(self):
        from scipy.ndimage import spline_filter

        stamps = np.asarray(self.stamps, float)
        n_grid = np.size(self.grid_x)
        if stamps.ndim != 3 or not stamps.shape[0] == n_grid == np.size(self.grid_y) > 0:
            raise PSFModelError(
                f"{self.source or 'ePSF'}: stamps of shape {stamps.shape} do not match "
                f"{n_grid} x and {np.size(self.grid_y)} y grid positions"
            )
        coeffs = np.stack([spline_filter(s, order=3, mode="grid-constant") for s in stamps])
        object.__setattr__(self, "_coeffs", coeffs)
        object.__setattr__(self, "_grid", _rectangular_grid(self.grid_x, self.grid_y, self.source))

    @property
    def centre(self) -> tuple[float, float]:
        """The sample ``(y, x)`` of a stamp at the star's position."""
        ny, nx = self.stamps.shape[1:]
        return (ny - 1) / 2.0, (nx - 1) / 2.0

    def corners(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Grid indices ``(N, 4)`` and bilinear weights ``(N, 4)`` of detector positions."""
        xs, ys, index = self._grid
        x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))

        def bracket(values, v):
            if values.size == 1:
                zero = np.zeros(v.size, int)
                return zero, zero, np.zeros(v.size)
            i = np.clip(np.searchsorted(values, v) - 1, 0, values.size - 2)
            t = np.clip((v - values[i]) / (values[i + 1] - values[i]), 0.0, 1.0)
            return i, i + 1, t

        x0, x1, tx = bracket(xs, x)
        y0, y1, ty = bracket(ys, y)
        grid = np.stack([index[y0, x0], index[y0, x1], index[y1, x0], index[y1, x1]], axis=1)
        weight = np.stack([(1 - tx) * (1 - ty), tx * (1 - ty), (1 - tx) * ty, tx * ty], axis=1)
        return grid, weight

    def for_sources(self, x, y, reach: float) -> SourceEPSF:
        """The ePSF at each detector position ``(x, y)``, for offsets up to ``reach`` px.

        Returns a :class:`SourceEPSF` holding, per source, the B-spline
        coefficients of its interpolated ePSF over ``[-reach, reach]`` pixels around
        its centre (float32, about ``16 (reach oversample)**2`` bytes a source).
        """
        grid, weight = self.corners(x, y)
        os_ = self.oversample
        cy, cx = self.centre
        ly, lx = int(np.floor(cy - os_ * reach)) - 1, int(np.floor(cx - os_ * reach)) - 1
        hy, hx = int(np.ceil(cy + os_ * reach)) + 3, int(np.ceil(cx + os_ * reach)) + 3
        coeffs = self._coeffs
        ny, nx = coeffs.shape[1:]
        pad = max(0, -ly, -lx, hy - ny, hx - nx)
        if pad:
            coeffs = np.pad(coeffs, ((0, 0), (pad, pad), (pad, pad)))
        crop = coeffs[:, ly + pad : hy + pad, lx + pad : hx + pad].astype(np.float32)
        per_source = np.zeros((grid.shape[0], *crop.shape[1:]), np.float32)
        for k in range(grid.shape[1]):  # corner by corner: no (N, 4, h, w) temporary
            per_source += weight[:, k, None, None].astype(np.float32) * crop[grid[:, k]]
        return SourceEPSF(per_source, cy - ly, cx - lx, os_)


@dataclass(frozen=True, eq=False)
class SourceEPSF:
    """The ePSF of each of N sources, as B-spline coefficients, ready to be fitted.

    Attributes
    ----------
    coeffs : numpy.ndarray
        ``(N, h, w)`` coefficients.
    origin_y, origin_x : float
        The sample of ``coeffs`` at a source's position.
    oversample : int
        Samples per pixel.
    """

    coeffs: np.ndarray
    origin_y: float
    origin_x: float
    oversample: int

    def model(self, params: np.ndarray, rows, n: int, half: int):
        """Flux times the ePSF on ``n x n`` pixel grids centred on pixel ``half``.

        ``params`` is ``(M, 3)``: flux, x, y (relative to the central pixel) of the
        sources ``rows`` (an index array or slice of the N).  Returns the models
        ``(M, n, n)`` and their derivatives ``(M, n, n, 3)``.
        """
        coeffs = self.coeffs[rows]
        flux, x0, y0 = params.T
        pix = np.arange(n) - half
        wy, dwy, iy = _bspline_taps(self.origin_y + self.oversample * (pix[None, :] - y0[:, None]))
        wx, dwx, ix = _bspline_taps(self.origin_x + self.oversample * (pix[None, :] - x0[:, None]))
        src = np.arange(coeffs.shape[0])[:, None, None, None, None]
        rows_ = iy[:, :, None, :, None]
        cols_ = ix[:, None, :, None, :]
        values = coeffs[src, rows_, cols_].astype(float)  # (M, n, n, 4, 4)
        shape = np.einsum("sap,sbq,sabpq->sab", wy, wx, values)
        d_dx = -self.oversample * np.einsum("sap,sbq,sabpq->sab", wy, dwx, values)
        d_dy = -self.oversample * np.einsum("sap,sbq,sabpq->sab", dwy, wx, values)
        f = flux[:, None, None]
        return f * shape, np.stack([shape, f * d_dx, f * d_dy], axis=-1)


def _bspline_taps(u: np.ndarray):
    """Cubic B-spline weights ``(..., 4)``, their derivatives and the taps' indices at ``u``."""
    base = np.floor(u)
    t = (u - base)[..., None]
    w = (
        np.concatenate(
            [(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], axis=-1
        )
        / 6.0
    )
    dw = (
        np.concatenate(
            [-3 * (1 - t) ** 2, 9 * t**2 - 12 * t, -9 * t**2 + 6 * t + 3, 3 * t**2], axis=-1
        )
        / 6.0
    )
    taps = base.astype(int)[..., None] + np.arange(-1, 3)
    return w, dw, taps


def _rectangular_grid(grid_x, grid_y, source: str):
    x, y = np.asarray(grid_x, float), np.asarray(grid_y, float)
    xs, ys = np.unique(x), np.unique(y)
    index = np.full((ys.size, xs.size), -1)
    index[np.searchsorted(ys, y), np.searchsorted(xs, x)] = np.arange(x.size)
    if x.size != xs.size * ys.size or (index < 0).any():
        raise PSFModelError(
            f"{source or 'ePSF'}: the grid positions (meta.pixel_x, meta.pixel_y) do not form "
            f"a rectangular grid ({x.size} positions, {xs.size} x values, {ys.size} y values)"
        )
    return xs, ys, index


def _pixel_box(stamp: np.ndarray, oversample: int) -> np.ndarray:
    """A point-sampled PSF integrated over a pixel: a centred box of ``oversample`` samples."""
    from scipy.ndimage import correlate1d

    if oversample % 2:
        kernel = np.ones(oversample)
    else:  # a centred box over an even number of samples: half weights at its ends
        kernel = np.concatenate([[0.5], np.ones(oversample - 1), [0.5]])
    kernel /= kernel.sum()
    out = correlate1d(stamp, kernel, axis=0, mode="constant")
    return correlate1d(out, kernel, axis=1, mode="constant")


def _meta(tree, path: str, source: str):
    node = tree
    for key in path.split("."):
        try:
            node = node[key]
        except (KeyError, TypeError, IndexError) as err:
            raise PSFModelError(f"{source}: not an ePSF reference file, it has no {path}") from err
    return node


def _open(path: Path):
    """The file's tree (a roman_datamodels model, or a plain ASDF tree)."""
    import asdf

    try:
        import roman_datamodels as rdm

        return rdm.open(path, lazy_tree=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, asdf.ValidationError):
        try:
            return asdf.open(path, lazy_load=True, memmap=False)
        except (OSError, ValueError) as err:
            raise PSFModelError(f"{path}: not an ASDF ePSF reference file: {err}") from err


def _identity(tree, source: str) -> tuple[str, str]:
    return (
        str(_meta(tree, "meta.instrument.detector", source)).upper(),
        str(_meta(tree, "meta.instrument.optical_element", source)).upper(),
    )


def read_epsf(
    path: str | os.PathLike, detector: str | None = None, optical_element: str | None = None
) -> EPSFModel:
    """Read an ``EpsfRefModel`` file (see the module docstring for what is used).

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    detector, optical_element : str, optional
        When given, the file must be for them.

    Returns
    -------
    EPSFModel

    Raises
    ------
    PSFModelError
        The file cannot be read, is not an ePSF reference file, or is for another
        detector or optical element (naming the file and both).
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise PSFModelError(f"{source}: ePSF file not found")
    opened = _open(path)
    try:
        tree = opened if hasattr(opened, "meta") else opened.tree
        det, element = _identity(tree, source)
        want = tuple(str(v).upper() if v else "" for v in (detector, optical_element))
        if (want[0] and want[0] != det) or (want[1] and want[1] != element):
            raise PSFModelError(
                f"{source}: ePSF for detector {det} and optical element {element}, but the "
                f"image is {want[0] or '?'} {want[1] or '?'}"
            )
        psf = _meta(tree, "psf", source)
        if np.ndim(psf) != 5:
            raise PSFModelError(
                f"{source}: psf has {np.ndim(psf)} dimensions, expected 5 "
                "(defocus, spectral_type, grid_index, y, x)"
            )
        types = [str(t) for t in _optional(tree, "meta.spectral_type", [])]
        spectral = types.index(SPECTRAL_TYPE) if SPECTRAL_TYPE in types else 0
        if spectral >= np.shape(psf)[1]:
            spectral = 0
        stamps = np.array(psf[0, spectral], dtype=float)
        oversample = int(_meta(tree, "meta.oversample", source))
        grid_x = np.asarray(_meta(tree, "meta.pixel_x", source), float)
        grid_y = np.asarray(_meta(tree, "meta.pixel_y", source), float)
    finally:
        opened.close()
    if oversample < 1 or not np.all(np.isfinite(stamps)):
        raise PSFModelError(f"{source}: oversample {oversample} or non-finite stamps")
    sums = stamps.sum(axis=(1, 2))
    if np.median(sums) < oversample**2 / 2:  # point-sampled: integrate over a pixel
        stamps = np.stack([_pixel_box(s, oversample) for s in stamps])
        sums = stamps.sum(axis=(1, 2))
    if not np.all(sums > 0):
        raise PSFModelError(f"{source}: a stamp has no positive flux")
    # normalised: the samples of one pixel lattice sum to about 1 (all samples: oversample**2)
    stamps = stamps * (oversample**2 / sums)[:, None, None]
    model = EPSFModel(
        stamps,
        grid_x,
        grid_y,
        oversample,
        det,
        element,
        source,
        types[spectral] if types else "",
    )
    log.debug(
        "ePSF %s: %s %s, %d positions, oversample %d, spectral type %s",
        source, det, element, grid_x.size, oversample, model.spectral_type or "-",
    )  # fmt: skip
    return model


def _optional(tree, path: str, default):
    try:
        return _meta(tree, path, "")
    except PSFModelError:
        return default


def find_epsf(psf_model: str | os.PathLike, detector: str, optical_element: str) -> EPSFModel:
    """The ePSF of one image: ``psf_model`` itself, or the file of a folder for the image.

    Parameters
    ----------
    psf_model : str or os.PathLike
        An ``EpsfRefModel`` file, or a folder of them (``*.asdf``; the one whose
        ``meta.instrument.detector`` and ``optical_element`` are the image's).
    detector, optical_element : str
        The image's ``meta.instrument.detector`` and ``optical_element``.

    Raises
    ------
    PSFModelError
        No file for the image (naming the folder and the detectors and optical
        elements it has), several, or the file is for another image.
    """
    path = Path(psf_model)
    if not path.is_dir():
        return read_epsf(path, detector, optical_element)
    want = (str(detector).upper(), str(optical_element).upper())
    found, seen = [], []
    for candidate in sorted(path.glob("*.asdf")):
        try:
            opened = _open(candidate)
        except PSFModelError as err:
            log.debug("psf_model folder: %s skipped: %s", candidate, err)
            continue
        try:
            tree = opened if hasattr(opened, "meta") else opened.tree
            ident = _identity(tree, str(candidate))
        except PSFModelError as err:
            log.debug("psf_model folder: %s skipped: %s", candidate, err)
            continue
        finally:
            opened.close()
        seen.append(" ".join(ident))
        if ident == want:
            found.append(candidate)
    if len(found) != 1:
        has = ", ".join(sorted(set(seen))) or "no ePSF file"
        what = "no ePSF file" if not found else f"{len(found)} ePSF files"
        raise PSFModelError(
            f"psf_model folder {path}: {what} for detector {want[0]} and optical element "
            f"{want[1]} (it has: {has})"
        )
    return read_epsf(found[0], detector, optical_element)
