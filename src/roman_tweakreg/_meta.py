"""Reading Roman metadata the same way from models, stnode objects and raw ASDF trees."""

from __future__ import annotations

import warnings
from typing import Any

import erfa
import numpy as np

__all__ = ["AU_KM", "exposure_epoch", "meta_get", "observer_position"]

#: The astronomical unit in km (IAU 2012).
AU_KM = 149_597_870.7

# A barycentric position of Roman is usable within this range of the Sun (AU), at a time
# within this many days of the exposure start; else the Earth's + L2 offset is used.
_OBSERVER_AU = (0.9, 1.1)
_OBSERVER_DAYS = 2.0


def meta_get(node: Any, key: str, default: Any = None) -> Any:
    """``node[key]`` for dicts, stnode objects and ASDF lazy nodes; ``default`` when absent."""
    if node is None:
        return default
    try:
        return node[key] if key in node else default
    except TypeError:
        return getattr(node, key, default)


def exposure_epoch(meta: Any) -> float | None:
    """Decimal year of ``meta.exposure.start_time``, or None when it is missing."""
    start = meta_get(meta_get(meta, "exposure"), "start_time")
    try:
        with warnings.catch_warnings():
            # ERFA calls far-future UTC dates "dubious" (unknown leap seconds): harmless here
            warnings.simplefilter("ignore", erfa.ErfaWarning)
            return float(start.decimalyear)
    except (AttributeError, TypeError, ValueError):
        return None


def observer_position(meta: Any, epoch: float | None) -> np.ndarray | None:
    """Roman's barycentric position (AU) from ``meta.ephemeris``, or None when unusable.

    ``spatial_x/y/z`` (km, ICRS axes) at ``time`` (MJD) are used when finite, between
    0.9 and 1.1 AU from the barycentre, and ``time`` within 2 days of ``epoch`` (the
    exposure start, decimal year; not checked when None).  Placeholders such as
    ``-999999`` fail these checks.
    """
    eph = meta_get(meta, "ephemeris")
    try:
        xyz = np.array([float(meta_get(eph, f"spatial_{a}")) for a in "xyz"]) / AU_KM
        mjd = float(meta_get(eph, "time"))
    except (TypeError, ValueError):
        return None
    distance = float(np.linalg.norm(xyz))
    if not (np.isfinite(distance) and _OBSERVER_AU[0] <= distance <= _OBSERVER_AU[1]):
        return None
    if epoch is not None:
        # Julian years from J2000 (MJD 51544.5) are within a minute of decimal years here
        days = abs(mjd - (51544.5 + (float(epoch) - 2000.0) * 365.25))
        if not days <= _OBSERVER_DAYS:
            return None
    return xyz
