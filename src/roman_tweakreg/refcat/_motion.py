"""Carry catalog positions to another epoch and observer, vectorised; their errors too.

Each star moves on a straight line in space at constant velocity with zero
radial velocity (Gaia gives none for most stars).  Its barycentric direction at
the new epoch is then the unit vector of ``u0 + dt * (pmra * e_ra + pmdec * e_dec)``
whatever its distance (:func:`carry`); seen from an observer at barycentric
position ``b`` (AU) it is that of ``u0 + dt * pm - parallax * b`` (:func:`place`,
ERFA's ``pmpx``, which also counts the light time across the observer's
offset).  :func:`l2_position` is where Roman is when a file does not say
(the Earth plus the Sun-Earth L2 offset), :func:`sigma_at` the position error of
a star carried to an epoch from the catalog's errors and correlations.
"""

from __future__ import annotations

import warnings

import erfa
import numpy as np

__all__ = ["ERROR_COLUMNS", "L2_OFFSET_AU", "MAS_PER_RAD", "carry", "l2_position", "place",
           "sigma_at"]  # fmt: skip

MAS_PER_RAD = np.rad2deg(1.0) * 3600e3

#: Distance of the Sun-Earth L2 point beyond the Earth, away from the Sun (AU).
L2_OFFSET_AU = 0.01

#: Gaia's error and correlation columns (mas, mas/yr, dimensionless) :func:`sigma_at` uses.
ERROR_COLUMNS = (
    "ra_error", "dec_error", "pmra_error", "pmdec_error", "ra_dec_corr", "pmra_pmdec_corr",
    "ra_pmra_corr", "dec_pmdec_corr", "ra_pmdec_corr", "dec_pmra_corr",
)  # fmt: skip


def carry(
    ra: np.ndarray,
    dec: np.ndarray,
    pmra: np.ndarray,
    pmdec: np.ndarray,
    dt: np.ndarray | float,
) -> tuple[np.ndarray, np.ndarray]:
    """Move stars by their proper motions over ``dt`` years.

    Parameters
    ----------
    ra, dec : numpy.ndarray
        Positions (deg) at the catalog epoch.
    pmra, pmdec : numpy.ndarray
        Proper motions (mas/yr); ``pmra`` is ``mu_alpha* = dRA/dt cos(Dec)``
        (the Gaia convention).  Rows where either is NaN stay where they are.
    dt : numpy.ndarray or float
        New epoch minus catalog epoch (years); NaN keeps a row unmoved.

    Returns
    -------
    ra, dec : numpy.ndarray
        Positions (deg) at the new epoch, RA in ``[0, 360)``.
    """
    ra = np.asarray(ra, float)
    dec = np.asarray(dec, float)
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    ca, sa, cd, sd = np.cos(a), np.sin(a), np.cos(d), np.sin(d)
    step = np.broadcast_to(np.asarray(dt, float), ra.shape) / MAS_PER_RAD
    pa = np.asarray(pmra, float) * step
    pd = np.asarray(pmdec, float) * step
    moving = np.isfinite(pa) & np.isfinite(pd)
    pa, pd = np.where(moving, pa, 0.0), np.where(moving, pd, 0.0)
    # u0 + pa * e_ra + pd * e_dec, with e_ra = (-sa, ca, 0), e_dec = (-sd ca, -sd sa, cd)
    x = cd * ca - pa * sa - pd * sd * ca
    y = cd * sa + pa * ca - pd * sd * sa
    z = sd + pd * cd
    new_ra = np.rad2deg(np.arctan2(y, x)) % 360.0
    new_dec = np.rad2deg(np.arctan2(z, np.hypot(x, y)))
    return np.where(moving, new_ra, ra), np.where(moving, new_dec, dec)


def place(
    ra: np.ndarray,
    dec: np.ndarray,
    pmra: np.ndarray | None,
    pmdec: np.ndarray | None,
    parallax: np.ndarray | None,
    dt: np.ndarray | float,
    observer: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Directions of stars ``dt`` years on, as seen from ``observer`` (ERFA ``pmpx``).

    Parameters
    ----------
    ra, dec : numpy.ndarray
        Barycentric positions (deg) at the catalog epoch (Gaia's).
    pmra, pmdec : numpy.ndarray or None
        Proper motions (mas/yr, ``pmra`` includes ``cos(Dec)``); NaN (or None for
        all) is no motion.
    parallax : numpy.ndarray or None
        Parallaxes (mas); NaN, negative or None is no parallax displacement.
    dt : numpy.ndarray or float
        New epoch minus catalog epoch (years); NaN keeps a row unmoved (no motion).
    observer : numpy.ndarray or None
        Barycentric position of the observer (AU, ICRS axes, 3 values); None is
        the barycentre (no parallax displacement).

    Returns
    -------
    ra, dec : numpy.ndarray
        Directions (deg) from the observer, RA in ``[0, 360)``.
    """
    ra = np.asarray(ra, float)
    dec = np.asarray(dec, float)

    def column(values):
        if values is None:
            return np.zeros(ra.shape)
        values = np.broadcast_to(np.asarray(values, float), ra.shape)
        return np.where(np.isfinite(values), values, 0.0)

    step = np.broadcast_to(np.asarray(dt, float), ra.shape)
    moving = np.isfinite(step)
    if pmra is not None and pmdec is not None:
        moving = moving & np.isfinite(np.asarray(pmra, float)) & np.isfinite(
            np.asarray(pmdec, float)
        )
    pmra, pmdec = column(pmra), column(pmdec)
    plx = column(parallax)
    plx = np.where(plx > 0, plx, 0.0)
    rad_dec = np.deg2rad(dec)
    cos_dec = np.cos(rad_dec)
    # pmpx wants dRA/dt (rad/yr, without cos(Dec)) and the parallax in arcsec
    pr = np.where(moving & (cos_dec > 0), pmra / MAS_PER_RAD / np.where(cos_dec > 0, cos_dec, 1), 0)
    pd = np.where(moving, pmdec / MAS_PER_RAD, 0.0)
    pob = np.zeros(3) if observer is None else np.asarray(observer, float).reshape(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", erfa.ErfaWarning)
        pco = erfa.pmpx(np.deg2rad(ra), rad_dec, pr, pd, plx / 1000.0, 0.0,
                        np.where(moving, step, 0.0), pob)  # fmt: skip
    new_ra, new_dec = erfa.c2s(pco)
    changed = moving | ((plx > 0) & (observer is not None))  # the others exactly as given
    return (
        np.where(changed, np.rad2deg(new_ra) % 360.0, ra),
        np.where(changed, np.rad2deg(new_dec), dec),
    )


def sigma_at(errors: dict[str, np.ndarray], dt: np.ndarray | float, n: int) -> np.ndarray:
    """Isotropic 1-sigma position error (mas) of stars carried ``dt`` years.

    The position ``p(t) = p0 + dt * pm`` has the covariance
    ``C_pp + dt (C_p,pm + C_pm,p) + dt**2 C_pm,pm``; its per-axis mean variance
    (half the trace: RA and Dec alike) is returned as a standard deviation; of the
    correlations only ``ra_pmra_corr`` and ``dec_pmdec_corr`` enter the trace (the
    others tilt the error ellipse, which a scalar weight cannot express).  Errors
    of ``ra_error``/``dec_error`` (mas) and ``pmra_error``/``pmdec_error`` (mas/yr) are
    used with the correlations given (absent ones are zero).

    Parameters
    ----------
    errors : dict
        Columns of :data:`ERROR_COLUMNS` present in the catalog.
    dt : numpy.ndarray or float
        Epoch gap (years); NaN counts as 0 (positions used as stored).
    n : int
        Number of stars.

    Returns
    -------
    numpy.ndarray
        Per star, NaN where the catalog gives no position error.
    """

    def col(name, fill):
        if name not in errors:
            return np.full(n, fill)
        values = np.asarray(errors[name], float)
        return np.where(np.isfinite(values), values, fill)

    gap = np.broadcast_to(np.nan_to_num(np.asarray(dt, float)), (n,))
    s_ra, s_dec = col("ra_error", np.nan), col("dec_error", np.nan)
    s_pmra, s_pmdec = col("pmra_error", 0.0), col("pmdec_error", 0.0)
    var_ra = s_ra**2 + 2 * gap * col("ra_pmra_corr", 0.0) * s_ra * s_pmra + (gap * s_pmra) ** 2
    var_dec = (
        s_dec**2 + 2 * gap * col("dec_pmdec_corr", 0.0) * s_dec * s_pmdec + (gap * s_pmdec) ** 2
    )
    return np.sqrt(np.clip(0.5 * (var_ra + var_dec), 0.0, None))


def l2_position(epoch: float) -> np.ndarray:
    """Barycentric position (AU, ICRS axes) of the Sun-Earth L2 point at ``epoch``.

    The Earth's position from astropy's built-in solar-system ephemeris (no
    download) plus :data:`L2_OFFSET_AU` along the Sun -> Earth direction.

    Parameters
    ----------
    epoch : float
        Decimal year (TDB).
    """
    import astropy.units as u
    from astropy.coordinates import get_body_barycentric
    from astropy.time import Time

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", erfa.ErfaWarning)
        time = Time(float(epoch), format="decimalyear", scale="tdb")
        earth = get_body_barycentric("earth", time, ephemeris="builtin").xyz.to_value(u.au)
        sun = get_body_barycentric("sun", time, ephemeris="builtin").xyz.to_value(u.au)
    away = earth - sun
    return earth + L2_OFFSET_AU * away / np.linalg.norm(away)
