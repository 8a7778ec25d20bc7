"""The quality of a fit: is it real?  (:class:`Quality`, :func:`quality`, :func:`gates`)

Before a fit may change a WCS, its matches are compared with what chance gives for
the same source densities, and its residuals and spread are checked (see
docs/algorithm.rst for the derivation of the gates and their thresholds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import shapely
from scipy.stats import binom, norm, poisson

from ._types import ImageCheck, Quality
from .geometry import affine, convex_hull
from .search import count_at, offset_search

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._types import FitParameters

__all__ = [
    "CHANCE_MARGIN",
    "FALSE_ALARM",
    "OWN_OFFSET_FLOOR",
    "OWN_OFFSET_SIGMA",
    "RMSE_OVER_NOISE",
    "RMSE_OVER_TOLERANCE",
    "SPREAD_CAP",
    "Quality",
    "gates",
    "image_check",
    "quality",
    "refusals",
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
#: An image's own offset disagrees with its group's solution beyond this many standard
#: errors (``own_scatter / sqrt(own_matches)``) ...
OWN_OFFSET_SIGMA = 5.0
#: ... plus this floor (arcsec), a margin for systematics between detectors.
OWN_OFFSET_FLOOR = 0.002
#: An image matching fewer than this fraction of the pairs its group's match rate
#: predicts (and improbably few, see :func:`refusals`) does not share the solution.
LOW_MATCH_FRACTION = 0.25


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
    covered = convex_hull(img_m[kept]).area if kept.any() else 0.0
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


def image_check(ref_xy: np.ndarray, img_xy: np.ndarray, pars: FitParameters) -> ImageCheck:
    """One image's own view of its group's fit: :class:`~roman_tweakreg.quality.ImageCheck`.

    ``img_xy`` are the image's sources where the group's fit puts them, ``ref_xy`` the
    reference positions of the fit.  The image's own offset is searched
    (:func:`~roman_tweakreg.search.offset_search`) among the reference sources within
    ``searchrad + tolerance`` of its footprint; its significance is that of gate 1 of
    :func:`gates` for the image alone.
    """
    tol, reach = pars.tolerance, pars.searchrad + pars.tolerance
    n_img = len(img_xy)
    empty = ImageCheck(n_img, 0, 0, 0, (0.0, 0.0), 0, float("nan"), 0.0, False)
    if n_img == 0 or len(ref_xy) == 0:
        return empty
    hull = convex_hull(img_xy)
    region = hull.buffer(reach)
    near = ref_xy[shapely.contains_xy(region, ref_xy[:, 0], ref_xy[:, 1])]
    if len(near) == 0:
        return empty
    n_ref = _inside(hull.buffer(tol), near)
    own = offset_search(near, img_xy, pars.searchrad, tol)
    chance = n_img * len(near) * np.pi * tol**2 / region.area
    trials = (reach / tol) ** 2 if pars.use2dhist else 1.0
    significant = False
    if own.count >= 3:
        log_fa = np.log(trials) + poisson.logsf(own.count - 1, chance)
        significant = bool(log_fa < np.log(FALSE_ALARM) and own.count >= CHANCE_MARGIN * chance)
    return ImageCheck(
        n_sources=n_img,
        n_reference=n_ref,
        possible=min(n_img, n_ref),
        matched=count_at(near, img_xy, tol),
        own_offset=(float(own.offset[0]), float(own.offset[1])),
        own_matches=own.count,
        own_scatter=own.scatter,
        expected_chance=float(chance),
        significant=significant,
    )


def _disagrees(check: ImageCheck, offset=(0.0, 0.0), error: float = 0.0) -> bool:
    """Whether the image's own offset is away from ``offset`` (known to ``error``)."""
    distance = np.hypot(check.own_offset[0] - offset[0], check.own_offset[1] - offset[1])
    sigma = np.hypot(check.own_error, error)
    return bool(distance > OWN_OFFSET_SIGMA * sigma + OWN_OFFSET_FLOOR)


def refusals(
    checks: dict[int, ImageCheck], exposures: dict[int, str] | None = None
) -> dict[int, str]:
    """The images (keys of ``checks``) that do not share their group's solution, and why.

    Per-image gates (see docs/algorithm.rst):

    1. *own offset*: an image whose own sources say where it belongs
       (``significant``) and whose own offset is more than :data:`OWN_OFFSET_SIGMA`
       standard errors plus :data:`OWN_OFFSET_FLOOR` from the solution does not share
       it.  When the group holds several exposures (``exposures``: image -> exposure),
       the exposure whose images match the solution most is the solution's, and the
       disagreeing images of the others are refused; otherwise the images agreeing with
       each other and holding the most own matches are taken as the solution's and the
       others are refused.  The caller fits again without the refused images (a fit
       pulled between two exposures agrees with neither);
    2. *too few matches*: an image matching fewer than :data:`LOW_MATCH_FRACTION` of
       the pairs the group's match rate predicts for its ``possible`` pairs, where a
       binomial count at that rate would be so low with probability below
       :data:`FALSE_ALARM`, does not share it either (an image whose own offset lies
       beyond the search).  An image with few sources is never refused by this: at
       most ``possible`` misses are improbable only beyond about 15 possible pairs.
    """
    out: dict[int, str] = {}
    sure = {k: c for k, c in checks.items() if c.significant}
    off = {k for k, c in sure.items() if _disagrees(c)}
    labels = exposures or {}
    several = len({labels.get(k, "") for k in checks}) > 1
    if off and several:
        matched: dict[str, int] = {}
        for k, c in checks.items():
            matched[labels.get(k, "")] = matched.get(labels.get(k, ""), 0) + c.matched
        chosen = max(matched, key=matched.__getitem__)
        refuse = {k for k in off if labels.get(k, "") != chosen}
    elif off:
        best: list[int] = []
        for seed in sure.values():  # the largest set of images agreeing with each other
            agree = [
                k for k, c in sure.items() if not _disagrees(c, seed.own_offset, seed.own_error)
            ]
            if sum(sure[k].own_matches for k in agree) > sum(sure[k].own_matches for k in best):
                best = agree
        refuse = set(sure) - set(best)
    else:
        refuse = set()
    for k in sorted(refuse):
        c = sure[k]
        out[k] = (
            f"its own {c.own_matches} matches put it {1000 * c.own_shift:.0f} mas "
            f"from the group's solution (offset ({1000 * c.own_offset[0]:.0f}, "
            f"{1000 * c.own_offset[1]:.0f}) mas), where {c.matched} of its "
            f"{c.possible} possible pairs match"
        )
    kept = [c for k, c in checks.items() if k not in out]
    agreeing = [c for c in kept if c.significant] or kept
    possible = sum(c.possible for c in agreeing)
    rate = min(1.0, sum(c.matched for c in agreeing) / possible) if possible else 0.0
    for k, c in checks.items():
        expected = rate * c.possible
        if k in out or c.matched >= LOW_MATCH_FRACTION * expected:
            continue
        if binom.cdf(c.matched, c.possible, rate) < FALSE_ALARM:
            out[k] = (
                f"{c.matched} of its {c.possible} possible pairs match the group's solution "
                f"where about {expected:.0f} were expected (the group's match rate "
                f"{rate:.2f})"
            )
    return out
