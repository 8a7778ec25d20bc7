"""Carry catalog positions to another epoch with their proper motions, vectorised.

Each star moves on a straight line in space at constant velocity with zero
radial velocity (Gaia gives none for most stars).  Its direction at the new
epoch is then the unit vector of ``u0 + dt * (pmra * e_ra + pmdec * e_dec)``
whatever its distance, so the parallax is not needed: astropy's
``SkyCoord.apply_space_motion`` (ERFA ``pmsafe``) differs only by light-time
terms, well below a microarcsecond for Gaia-like motions over decades.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAS_PER_RAD", "carry"]

MAS_PER_RAD = np.rad2deg(1.0) * 3600e3


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
