"""The quality of a fit: is it real?  (:class:`Quality`, :func:`quality`, :func:`gates`)

Before a fit may change a WCS, its matches are compared with what chance gives for
the same source densities, and its residuals and spread are checked (see
docs/algorithm.rst for the derivation of the gates and their thresholds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import shapely
from scipy.stats import norm, poisson
from shapely.geometry import MultiPoint

from ._types import Quality
from .geometry import affine

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._types import FitParameters

__all__ = [
    "CHANCE_MARGIN",
    "FALSE_ALARM",
    "RMSE_OVER_NOISE",
    "RMSE_OVER_TOLERANCE",
    "SPREAD_CAP",
    "Quality",
    "gates",
    "quality",
]

#: False-alarm probability a fit may have of being chance alone: one-sided 5 sigma.
FALSE_ALARM = float(norm.sf(5.0))
#: The matches must outnumber the pairs chance gives by at least this factor.
CHANCE_MARGIN = 10.0
#: A fit's rmse may exceed its robust core (tweakwcs ``mad``) by this factor ...
RMSE_OVER_NOISE = 3.0
#: ... or be this fraction of the tolerance, but not both (see :func:`gates`).
RMSE_OVER_TOLERANCE = 0.25
#: Largest footprint fraction the matches' hull may be required to cover.
SPREAD_CAP = 0.25


def _inside(polygon, xy: np.ndarray) -> int:
    if len(xy) == 0 or polygon.is_empty:
        return 0
    return int(np.count_nonzero(shapely.contains_xy(polygon, xy[:, 0], xy[:, 1])))


def _significance(false_alarm_log: float) -> float:
    """One-sided Gaussian significance of a probability given by its natural log."""
    if not np.isfinite(false_alarm_log):
        return float("inf")  # no chance pairs possible (no sources to pair by chance)
    if false_alarm_log > -700.0:
        return max(0.0, float(norm.isf(np.exp(false_alarm_log))))
    return float(np.sqrt(-2.0 * false_alarm_log))  # asymptotic, where exp() underflows


def quality(
    searches: Sequence[tuple[np.ndarray, np.ndarray, object]],
    pairs: tuple[np.ndarray, np.ndarray],
    fit: dict,
    footprint,
    pars: FitParameters,
) -> Quality:
    """The :class:`Quality` of ``fit`` of the matched ``pairs`` (reference, image positions).

    Parameters
    ----------
    searches : sequence of (ref_xy, img_xy, overlap)
        One entry per separate match (offset search) whose pairs were fitted
        together: the reference and image positions that took part and their
        overlap (a shapely polygon), in which the densities are counted.
    pairs : (ndarray, ndarray)
        Matched reference and image positions (N x 2 each), in the fit's order.
    fit : dict
        The fit (``matrix``, ``shift`` about the plane's origin, ``fitmask``).
    footprint : shapely geometry
        The footprint the pairs should cover (for ``spread``).
    pars : FitParameters
        ``tolerance``, ``searchrad`` and ``use2dhist`` of the matching.
    """
    ref_m, img_m = pairs
    m = len(img_m)
    tol = pars.tolerance
    n_img = n_ref = 0
    expected = smaller = 0.0
    for ref_xy, img_xy, overlap in searches:
        ni, nr = _inside(overlap, img_xy), _inside(overlap, ref_xy)
        n_img, n_ref, smaller = n_img + ni, n_ref + nr, smaller + min(ni, nr)
        if ni and nr:
            expected += ni * nr * np.pi * tol**2 / overlap.area
    per_search = ((pars.searchrad + tol) / tol) ** 2 if pars.use2dhist else 1.0
    log_trials = max(len(searches), 1) * np.log(per_search)
    log_fa = 0.0
    if m and expected > 0:
        log_tail = poisson.logsf(m - 1, expected)
        if not np.isfinite(log_tail):  # underflow far out in the tail: its first term
            log_tail = poisson.logpmf(m, expected)
        log_fa = min(0.0, float(log_trials + log_tail))
    elif m:
        log_fa = -np.inf
    kept = np.asarray(fit.get("fitmask", np.ones(m, bool)), bool)
    resid = ref_m[kept] - affine(img_m[kept], fit) if m else np.empty((0, 2))
    norms = np.hypot(*resid.T)
    rmse = float(np.sqrt(np.mean(norms**2))) if len(norms) else float("nan")
    noise = float(np.median(norms) / np.sqrt(np.log(2.0))) if len(norms) else float("nan")
    area = float(footprint.area)
    covered = MultiPoint(img_m[kept]).convex_hull.area if kept.any() else 0.0
    return Quality(
        nmatches=m,
        nkept=int(np.count_nonzero(kept)),
        n_image=n_img,
        n_reference=n_ref,
        overlap_area=area,
        expected_chance=float(expected),
        trials=float(np.exp(log_trials)),
        false_alarm=float(np.exp(log_fa)),
        significance=_significance(log_fa),
        rmse=rmse,
        mae=float(np.mean(norms)) if len(norms) else float("nan"),
        noise=noise,
        matched_fraction=min(1.0, m / smaller) if smaller else 0.0,
        spread=min(1.0, covered / area) if area > 0 else 0.0,
    )


def gates(q: Quality, pars: FitParameters, searchrad_name: str = "searchrad") -> str:
    """Why a fit of quality ``q`` cannot be trusted, naming the gate; '' when it passes.

    The gates, in order (see docs/algorithm.rst for their derivation):

    1. *significance*: the chance that pairs as many as ``q.nmatches`` arise by
       chance (Poisson with mean ``q.expected_chance``, at the best of
       ``q.trials`` offsets) is at most :data:`FALSE_ALARM` (5 sigma);
    2. *matched fraction*: the pairs are at least :data:`CHANCE_MARGIN` times
       what chance gives (``matched_fraction`` at least that multiple of the
       chance fraction), a margin for stellar fields being clumpier than the
       uniform densities of gate 1 assume;
    3. *rmse*: chance pairs lie uniformly in the tolerance disk (rmse
       ``tolerance / sqrt(2)``); the rmse fails when it is both above
       :data:`RMSE_OVER_TOLERANCE` of the tolerance (mismatches then make up more
       than about an eighth of the pairs) and :data:`RMSE_OVER_NOISE` times the
       residuals' robust core (which Gaussian errors of any size meet, even for
       15 pairs at 5 sigma and with moderately unequal errors);
    4. *spread*: if the pairs were spread uniformly over the overlap, all ``k``
       of them would lie in a region of area fraction ``s`` with probability
       ``s**k``; the hull of the kept pairs must cover at least
       ``min(SPREAD_CAP, FALSE_ALARM**(1/k))`` of the overlap.

    When gate 1 or 2 fails, the reason suggests widening ``searchrad_name``:
    the true offset may lie outside the search.
    """
    wider = (
        f"; if the pointing may be off by more than {searchrad_name}={pars.searchrad:g} "
        f"arcsec, widen {searchrad_name} (see the troubleshooting page)"
    )
    if q.false_alarm > FALSE_ALARM:
        return (
            f"quality gate 'significance' failed: {q.nmatches} matches where chance gives "
            f"{q.expected_chance:.3g} (significance {q.significance:.2f} sigma after "
            f"{q.trials:.3g} trial offsets, 5 sigma needed); the matches are likely chance "
            f"coincidences{wider}"
        )
    if q.nmatches < CHANCE_MARGIN * q.expected_chance:
        return (
            f"quality gate 'matched fraction' failed: {q.nmatches} matches "
            f"({q.matched_fraction:.3g} of the sources in the overlap) are fewer than "
            f"{CHANCE_MARGIN:g} x the {q.expected_chance:.3g} that chance gives{wider}"
        )
    if q.rmse > RMSE_OVER_TOLERANCE * pars.tolerance and q.rmse > RMSE_OVER_NOISE * q.noise:
        return (
            f"quality gate 'rmse' failed: fit rmse {q.rmse:.3g} arcsec is "
            f"{q.rmse_over_noise:.3g} x the residuals' core {q.noise:.3g} arcsec and more than "
            f"{RMSE_OVER_TOLERANCE:g} x the tolerance {pars.tolerance:g} arcsec: mismatched pairs"
        )
    need = min(SPREAD_CAP, FALSE_ALARM ** (1.0 / max(q.nkept, 1)))
    if q.spread < need:
        return (
            f"quality gate 'spread' failed: the matches cover {q.spread:.3g} of the overlap, "
            f"less than {need:.3g}; a fit on one corner does not constrain the rest"
        )
    return ""
