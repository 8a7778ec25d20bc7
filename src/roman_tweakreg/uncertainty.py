"""How sure a fit is of its correction, and how much each pair weighs in it.

* :func:`fit_uncertainty`: the 1-sigma uncertainties of a fit's shift, rotation,
  scale and skew, from the covariance of the weighted linear least-squares solution
  (the design matrix of the pairs the fit kept, linearised at the solution) scaled by
  the weighted residual variance (reduced chi-square), so that they hold whether the
  weights are absolute (``1 / sigma**2``) or relative;
* :func:`pair_weights`: each pair's weight ``1 / (sigma_ref**2 + sigma_img**2)`` from
  the reference catalog's position errors carried to the epoch and the image
  sources' own errors; where the image catalog gives none, one common image error is
  estimated from the residuals of an unweighted fit (:func:`common_image_sigma`).

The matrix convention is tweakwcs's: ``ref = matrix @ img + shift`` with, for the
``rshift`` and ``rscale`` geometries, ``matrix = s [[cos r, sin r], [-sin r, cos r]]``;
for ``general`` the rotations of the axes ``rot_x = atan2(-m10, m00)``,
``rot_y = atan2(m01, m11)``, ``<rot>`` their mean, ``skew = rot_y - rot_x`` and
``<scale> = sqrt(|det|)`` (tweakwcs's documented definitions).
"""

from __future__ import annotations

import numpy as np

from .geometry import affine

__all__ = ["SIGMA_KEYS", "common_image_sigma", "filled_sigma", "fit_uncertainty", "pair_weights"]

#: The keys :func:`fit_uncertainty` adds to a fit (declared in results.FIT_KEYS).
SIGMA_KEYS = ("shift_sigma_mas", "rot_sigma_arcsec", "scale_sigma", "skew_sigma_arcsec")

_ARCSEC_PER_RAD = np.rad2deg(1.0) * 3600.0
# Smallest position error (arcsec) a pair is given: no pair weighs more than 0.01 mas.
_SIGMA_FLOOR = 1e-5


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, s], [-s, c]])


def _design(img: np.ndarray, fit: dict) -> tuple[np.ndarray, list[str]]:
    """Jacobian (2N x p) of the model ``matrix @ img + shift`` in the fit's parameters.

    Rows are x of every pair, then y of every pair.
    """
    geometry = fit.get("fitgeom", "general")
    n = len(img)
    u, v = img[:, 0], img[:, 1]
    one, zero = np.ones(n), np.zeros(n)
    columns = [(one, zero), (zero, one)]  # d/d shift_x, d/d shift_y
    names = ["shift_x", "shift_y"]
    matrix = np.asarray(fit["matrix"], float)
    if geometry in ("rshift", "rscale"):
        scale = float(np.sqrt(abs(np.linalg.det(matrix))))
        angle = float(np.arctan2(matrix[0, 1], matrix[0, 0]))
        c, s = np.cos(angle), np.sin(angle)
        d_rot = scale * np.array([[-s, c], [-c, -s]])
        columns.append((d_rot[0, 0] * u + d_rot[0, 1] * v, d_rot[1, 0] * u + d_rot[1, 1] * v))
        names.append("rot")
        if geometry == "rscale":
            moved = img @ matrix.T
            columns.append((moved[:, 0], moved[:, 1]))  # d/d ln(scale)
            names.append("log_scale")
    elif geometry == "general":
        columns += [(u, zero), (v, zero), (zero, u), (zero, v)]
        names += ["m00", "m01", "m10", "m11"]
    return np.column_stack([np.concatenate(c) for c in columns]), names


def _general_terms(m: np.ndarray) -> np.ndarray:
    """``(<rot>, <scale>, skew)`` of a general matrix, rotations in radians."""
    rot_x = np.arctan2(-m[1, 0], m[0, 0])
    rot_y = np.arctan2(m[0, 1], m[1, 1])
    return np.array([0.5 * (rot_x + rot_y), np.sqrt(abs(np.linalg.det(m))), rot_y - rot_x])


def fit_uncertainty(
    ref: np.ndarray, img: np.ndarray, fit: dict, weights: np.ndarray | None = None
) -> dict:
    """The 1-sigma uncertainties of a fit's parameters.

    Parameters
    ----------
    ref, img : numpy.ndarray
        The matched reference and image positions the fit was made of (N x 2, arcsec),
        in the fit's order; only the pairs of ``fit["fitmask"]`` (when given) are used.
    fit : dict
        The fit (``matrix``, ``shift`` about the plane's origin, ``fitgeom``).
    weights : numpy.ndarray or None
        The pairs' weights in the fit (None: equal).

    Returns
    -------
    dict
        ``shift_sigma_mas`` ``[x, y]`` (mas, the shift about the plane's origin);
        ``rot_sigma_arcsec`` where the rotation was fitted; ``scale_sigma`` (of
        ``<scale>``) for ``rscale`` and ``general``; ``skew_sigma_arcsec`` for
        ``general``; each None where its term was not fitted.  Empty when there are no
        more pairs than parameters or the design is singular.
    """
    ref, img = np.asarray(ref, float), np.asarray(img, float)
    keep = np.asarray(fit.get("fitmask", np.ones(len(img), bool)), bool)
    ref, img = ref[keep], img[keep]
    w = np.ones(len(img)) if weights is None else np.asarray(weights, float)[keep]
    design, names = _design(img, fit)
    n_par = design.shape[1]
    dof = 2 * len(img) - n_par
    if dof <= 0 or not np.all(np.isfinite(w)):
        return {}
    resid = ref - affine(img, fit)
    w2 = np.concatenate([w, w])
    chi2 = float(np.sum(w2 * np.concatenate([resid[:, 0], resid[:, 1]]) ** 2))
    normal = design.T @ (design * w2[:, None])
    try:
        cov = np.linalg.inv(normal) * (chi2 / dof)
    except np.linalg.LinAlgError:
        return {}
    sigma = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    out = {"shift_sigma_mas": [1000.0 * float(sigma[0]), 1000.0 * float(sigma[1])],
           "rot_sigma_arcsec": None, "scale_sigma": None, "skew_sigma_arcsec": None}
    geometry = fit.get("fitgeom", "general")
    if geometry in ("rshift", "rscale"):
        out["rot_sigma_arcsec"] = float(sigma[names.index("rot")]) * _ARCSEC_PER_RAD
        if geometry == "rscale":
            scale = float(np.sqrt(abs(np.linalg.det(np.asarray(fit["matrix"], float)))))
            out["scale_sigma"] = scale * float(sigma[names.index("log_scale")])
    elif geometry == "general":
        # propagate the matrix terms' covariance to <rot>, <scale> and skew
        m = np.asarray(fit["matrix"], float)
        base = _general_terms(m)
        jac = np.empty((3, 4))
        step = 1e-7
        for k in range(4):
            dm = m.copy()
            dm.flat[k] += step
            jac[:, k] = (_general_terms(dm) - base) / step
        terms = jac @ cov[2:, 2:] @ jac.T
        rot, scale, skew = np.sqrt(np.clip(np.diag(terms), 0.0, None))
        out["rot_sigma_arcsec"] = float(rot) * _ARCSEC_PER_RAD
        out["scale_sigma"] = float(scale)
        out["skew_sigma_arcsec"] = float(skew) * _ARCSEC_PER_RAD
    return out


def common_image_sigma(resid: np.ndarray, ref_sigma: np.ndarray, n_par: int = 2) -> float:
    """One image position error (arcsec) that, with ``ref_sigma``, explains ``resid``.

    The variance ``v`` that makes the reduced chi-square of the residuals one:
    ``sum(|r|**2 / (2 (ref_sigma**2 + v))) = N - n_par / 2``, found by bisection
    (the left side falls as ``v`` grows); at least :data:`_SIGMA_FLOOR`.

    Parameters
    ----------
    resid : numpy.ndarray
        Residuals (N x 2, arcsec) of a fit (the pairs it kept).
    ref_sigma : numpy.ndarray
        The reference stars' position errors (arcsec, N).
    n_par : int
        Parameters of the fit.
    """
    r2 = np.sum(np.asarray(resid, float) ** 2, axis=1)
    s2 = np.asarray(ref_sigma, float) ** 2
    target = len(r2) - 0.5 * n_par
    if target <= 0 or not len(r2):
        return _SIGMA_FLOOR

    def excess(v):
        return np.sum(r2 / (2.0 * (s2 + v))) - target

    lo, hi = _SIGMA_FLOOR**2, max(float(np.max(r2)), _SIGMA_FLOOR**2) * 4.0
    if excess(lo) <= 0:
        return _SIGMA_FLOOR
    for _ in range(80):  # in log space: 80 halvings are far below a per mille
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return float(np.sqrt(np.sqrt(lo * hi)))


def pair_weights(ref_sigma: np.ndarray, img_sigma: np.ndarray | float) -> np.ndarray:
    """``1 / (sigma_ref**2 + sigma_img**2)`` per pair (arcsec**-2).

    Unknown (NaN) errors count as the median of the known ones of their kind
    (:func:`filled_sigma`); the total error is at least :data:`_SIGMA_FLOOR`.
    """
    ref_sigma = filled_sigma(ref_sigma)
    img_sigma = np.broadcast_to(filled_sigma(np.atleast_1d(img_sigma)), ref_sigma.shape)
    total = np.maximum(ref_sigma**2 + img_sigma**2, _SIGMA_FLOOR**2)
    return 1.0 / total


def filled_sigma(sigma: np.ndarray) -> np.ndarray:
    """``sigma`` with unknown (NaN) values replaced by the median of the known ones (0 when
    none is known)."""
    sigma = np.asarray(sigma, float)
    known = sigma[np.isfinite(sigma)]
    return np.where(np.isfinite(sigma), sigma, np.median(known) if known.size else 0.0)
