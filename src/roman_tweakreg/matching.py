"""Matching and fitting with tweakwcs's matcher and fitter, for both alignment phases.

tweakwcs does the matching (``XYXYMatch``, configured in one place:
:meth:`FitParameters.matcher`) and the fitting (``iter_linear_fit``).  This module
adds, for the relative and the absolute phase alike (:func:`match_and_fit`):

* matches are made one-to-one (see :func:`unique_pairs`), so that a small
  ``separation`` next to a larger ``tolerance`` cannot pair one reference
  source with several image sources;
* after a fit whose roll moves far sources beyond a quarter of the tolerance,
  sources are matched again where it moved them and fitted once more;
* a fit is applied only when it succeeded *and* its correction is plausible
  (no source moves by more than the search radius) *and* it passes the quality
  gates (:mod:`roman_tweakreg.quality`).  A rejected fit leaves the WCS
  untouched and says why (:class:`FitResult`).

A matching tolerance or any other matching parameter (its default, accepted values,
doc) is changed in :mod:`roman_tweakreg.parameters`; the step's spec, its checks,
:class:`FitParameters` and the docs read them from there.  The rules this module derives
from the tolerance (the retry after source confusion, the second matching) are stated
here (:data:`DERIVED`), and the docs' parameter tables state them with ``tolerance``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from astropy.table import Table
from tweakwcs.linearfit import (
    NotEnoughPointsError,
    SingularMatrixError,
    iter_linear_fit,
)
from tweakwcs.matchutils import MatchSourceConfusionError, XYXYMatch

from . import parameters
from ._types import FitParameters, FitResult, Matches, Quality, Status
from .geometry import affine
from .quality import gates
from .uncertainty import common_image_sigma, filled_sigma, fit_uncertainty, pair_weights

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "CONFUSION_SEPARATION",
    "DERIVED",
    "MIN_MATCHES",
    "REMATCH_MOTION",
    "Derived",
    "FitParameters",
    "FitResult",
    "Matches",
    "Pairs",
    "confusion_retry",
    "match_and_fit",
    "rematch",
    "rematch_motion",
    "unique_pairs",
]

log = logging.getLogger(__name__)

#: Minimum matches each fit geometry needs.
MIN_MATCHES = {"shift": 1, "rshift": 2, "rscale": 2, "general": 3}
_PIXEL_SCALE = parameters.MATCH_PIXEL_SCALE  # arcsec, WFI; sets the 2D-histogram bin size
_N_PARAMETERS = {"shift": 2, "rshift": 3, "rscale": 4, "general": 6}


#: After tweakwcs's matcher runs out of room (source confusion), it is tried once more
#: with ``separation`` raised to this many times ``tolerance``.
CONFUSION_SEPARATION = 2.0
#: After a fit, sources are matched again where it moved them when it moves some of them,
#: relative to the matched sources' centre, by more than this fraction of ``tolerance``.
REMATCH_MOTION = 0.25


@dataclass(frozen=True)
class Derived:
    """A value the alignment derives from matching parameters (documented with them)."""

    name: str
    parameters: tuple[str, ...]
    doc: str


#: The derived rules, documented with ``tolerance`` and ``abs_tolerance`` (the docs' tables:
#: :func:`roman_tweakreg.parameters.table_rst`).
DERIVED: tuple[Derived, ...] = (
    Derived(
        "confusion retry",
        ("separation", "tolerance"),
        "when tweakwcs's matcher runs out of room (many sources within the tolerance of one), "
        f"matching is tried once more with separation = {CONFUSION_SEPARATION:g} x tolerance "
        "(unless separation is that large already)",
    ),
    Derived(
        "second matching",
        ("tolerance",),
        "after a fit that moves some sources, relative to the matched ones' centre, by more "
        f"than {REMATCH_MOTION:g} x tolerance (a roll), sources are matched again where the fit "
        "moved them",
    ),
    Derived(
        "second matcher",
        ("tolerance", "use2dhist", "searchrad"),
        "the second matching searches within the tolerance (search radius = tolerance, no 2D "
        "histogram), with the same separation",
    ),
)


def confusion_retry(pars: FitParameters) -> FitParameters | None:
    """The matching parameters of the retry after source confusion (see :data:`DERIVED`).

    ``pars`` is a dataclass with ``separation`` and ``tolerance`` (a
    :class:`~roman_tweakreg.matching.FitParameters`).  Returns ``None`` when its
    ``separation`` is already that large (no retry).
    """
    separation = CONFUSION_SEPARATION * pars.tolerance
    return None if pars.separation >= separation else replace(pars, separation=separation)


def rematch(pars: FitParameters) -> FitParameters:
    """The matching parameters of the second matching (see :data:`DERIVED`)."""
    return replace(pars, searchrad=pars.tolerance, use2dhist=False)


def rematch_motion(tolerance: float) -> float:
    """The motion (arcsec) beyond which a fit's sources are matched again."""
    return REMATCH_MOTION * tolerance


def unique_pairs(ref_idx: np.ndarray, img_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep only matches whose reference and image sources appear once each.

    ``xyxymatch`` can pair one reference source with several image sources
    when ``separation`` is smaller than ``tolerance``; such ambiguous pairs
    are dropped rather than fitted.
    """
    ref_idx, img_idx = np.asarray(ref_idx, int), np.asarray(img_idx, int)
    if ref_idx.size == 0:
        return ref_idx, img_idx
    _, rinv, rcount = np.unique(ref_idx, return_inverse=True, return_counts=True)
    _, iinv, icount = np.unique(img_idx, return_inverse=True, return_counts=True)
    keep = (rcount[rinv] == 1) & (icount[iinv] == 1)
    return ref_idx[keep], img_idx[keep]


def _match(ref_xy: np.ndarray, img_xy: np.ndarray, match: Callable, pars: FitParameters):
    """Match two tangent-plane source lists with ``match``; return one-to-one index pairs.

    When tweakwcs's own matcher runs out of room ("Number of output coordinates
    exceeded allocation": many sources within the tolerance of one), matching is
    tried once more with ``separation`` raised to twice the tolerance, which
    leaves such close groups out (the rule: :func:`confusion_retry`).

    Raises
    ------
    MatchSourceConfusionError
        From tweakwcs, when the second try fails too (or a custom matcher fails).
    """
    ref_tab = Table({"TPx": ref_xy[:, 0], "TPy": ref_xy[:, 1]})
    img_tab = Table({"TPx": img_xy[:, 0], "TPy": img_xy[:, 1]})
    try:
        ridx, iidx = match(ref_tab, img_tab, tp_pscale=_PIXEL_SCALE, tp_units="arcsec")
    except MatchSourceConfusionError as err:
        wider = confusion_retry(pars)
        if not isinstance(match, XYXYMatch) or wider is None:
            raise
        log.warning(
            "Matching ran out of room (%s); trying again with separation=%g arcsec",
            err,
            wider.separation,
        )
        ridx, iidx = wider.matcher()(ref_tab, img_tab, tp_pscale=_PIXEL_SCALE, tp_units="arcsec")
    return unique_pairs(ridx, iidx)


def _confusion(err: Exception, refcat_name: str = "") -> str:
    target = f" to {refcat_name}" if refcat_name else ""
    return (
        f"source confusion in matching{target} (many sources within the tolerance of one "
        f"reference source): {err}; try a smaller tolerance or a larger separation"
    )


class Pairs(NamedTuple):
    """Matched positions of one or more separate matches (offset searches), fitted together.

    Each field is a list with one entry per separate match: the matched reference and
    image positions (N x 2 each, in the fit's order), the image weights of the pairs
    (None: unweighted), ``(label, reference positions, image positions, footprint)``
    of the search, the matched image sources' indices into its image positions, and the
    plane index of the image of each of them.  ``sigmas`` (absolute fits of a reference
    catalog with position errors) holds the pairs' ``(reference errors, image errors or
    None)`` (arcsec) of each search: the fit then weighs them by
    :func:`~roman_tweakreg.uncertainty.pair_weights` instead of ``weights``.
    """

    ref: list[np.ndarray]
    img: list[np.ndarray]
    weights: list[np.ndarray | None]
    searches: list[tuple]
    img_idx: list[np.ndarray]
    image: list[np.ndarray]
    sigmas: list[tuple] | None = None


def match_and_fit(
    find_pairs: Callable[[Callable, dict | None], Pairs],
    all_xy: np.ndarray,
    pars: FitParameters,
    match: Callable,
    nothing_to_match: str = "no pairs",
) -> tuple[FitResult, Pairs]:
    """Match, fit, and match and fit once more after a fit that rolls far sources away.

    The one match -> fit -> re-match -> re-fit routine of both alignment phases:
    ``find_pairs(matcher, fit)`` matches with ``matcher`` the sources moved by ``fit``
    (None: as they are) and returns the :class:`Pairs` of their positions before
    ``fit``.  After a fit that succeeded and moves sources far from the matched ones'
    centre (:func:`_match_again`), the sources are matched again where it moved them
    (:func:`_rematcher`); when that finds more pairs and their fit succeeds, it
    replaces the first.  A second matching that fails in source confusion keeps the
    first fit.  The correction is checked on ``all_xy`` but not applied.

    Parameters
    ----------
    find_pairs : callable
        ``find_pairs(matcher, fit) -> Pairs``.
    all_xy : ndarray
        Every source the correction would move (N x 2).
    pars : FitParameters
    match : callable
        The matcher of the first matching.
    nothing_to_match : str
        The reason of the failure when the first matching has no search to make.

    Returns
    -------
    (FitResult, Pairs)
        The fit (not judged by the quality gates) and the pairs it rests on.

    Raises
    ------
    MatchSourceConfusionError
        From tweakwcs, when the first matching fails in source confusion.
    """
    pairs = find_pairs(match, None)
    if not pairs.img:
        return FitResult("FAILED", nothing_to_match), pairs
    ref_m, img_m, weight, sigmas = _stack(pairs)
    result = _fit(ref_m, img_m, weight, all_xy, pars, sigmas)
    if result.applied and _match_again(result.fit, np.vstack(pairs.img), all_xy, pars):
        try:
            again = find_pairs(_rematcher(match, pars), result.fit)
        except MatchSourceConfusionError:
            again = None
        if again is not None and sum(map(len, again.img)) > result.nmatches:
            ref_m, img_m, weight, sigmas = _stack(again)
            second = _fit(ref_m, img_m, weight, all_xy, pars, sigmas)
            result, pairs = (second, again) if second.applied else (result, pairs)
    parts = (pairs.ref, pairs.img, pairs.img_idx, pairs.image)
    result.matches = Matches(*(np.concatenate(part) for part in parts))
    return result, pairs


def _stack(pairs: Pairs):
    weight = None if any(w is None for w in pairs.weights) else np.concatenate(pairs.weights)
    sigmas = None
    if pairs.sigmas and all(ref is not None for ref, _ in pairs.sigmas):
        img = [i for _, i in pairs.sigmas]
        sigmas = (
            np.concatenate([ref for ref, _ in pairs.sigmas]),
            None if any(i is None for i in img) else np.concatenate(img),
        )
    return np.vstack(pairs.ref), np.vstack(pairs.img), weight, sigmas


def _match_and_fit(
    ref_xy: np.ndarray,
    img_xy: np.ndarray,
    pars: FitParameters,
    match: Callable,
    img_weight: np.ndarray | None = None,
    owner: np.ndarray | None = None,
) -> FitResult:
    """Match ``img_xy`` to ``ref_xy`` and fit (:func:`match_and_fit`), and check the
    correction (nothing applied).  ``owner``: the plane index of the image of each row
    of ``img_xy`` (0 for every row by default)."""
    if len(img_xy) == 0:
        return FitResult("FAILED", "no sources in the image catalog(s)")
    if len(ref_xy) == 0:
        return FitResult("FAILED", "no sources in the reference catalog")

    owner = np.zeros(len(img_xy), int) if owner is None else np.asarray(owner, int)

    def find_pairs(matcher, fit):
        moved = img_xy if fit is None else affine(img_xy, fit)
        ridx, iidx = _match(ref_xy, moved, matcher, pars)
        weight = None if img_weight is None else img_weight[iidx]
        search = (None, ref_xy, img_xy, None)
        return Pairs([ref_xy[ridx]], [img_xy[iidx]], [weight], [search], [iidx], [owner[iidx]])

    try:
        result, _ = match_and_fit(find_pairs, img_xy, pars, match)
    except MatchSourceConfusionError as err:
        return FitResult("FAILED", _confusion(err))
    return result


def _rematcher(match: Callable, pars: FitParameters) -> Callable:
    """The matcher of the second matching: sources already moved by the first fit need
    no offset search (no 2D histogram, search radius the tolerance: the rule is
    :func:`rematch`); a custom matcher is used as it is."""
    if not isinstance(match, XYXYMatch):
        return match
    return rematch(pars).matcher()


def _match_again(fit: dict, matched_xy: np.ndarray, all_xy: np.ndarray, pars) -> bool:
    """Whether to match once more, with the sources moved by ``fit``.

    The matcher finds one offset for all sources; when the correction moves some
    sources differently from the matched ones' centre by more than a quarter of
    the tolerance (:func:`rematch_motion`; a roll of a few
    arcseconds over the WFI field), those were
    matched poorly or not at all, and the fit rests on the centre only.  The
    second fit is of the original positions, with the pairs found after the first
    correction.
    """
    centre = matched_xy.mean(axis=0, keepdims=True)
    motion = affine(all_xy, fit) - all_xy - (affine(centre, fit) - centre)
    return bool(np.hypot(*motion.T).max() > rematch_motion(pars.tolerance))


def _fit(
    ref_m: np.ndarray,
    img_m: np.ndarray,
    weight: np.ndarray | None,
    all_xy: np.ndarray,
    pars: FitParameters,
    sigmas: tuple | None = None,
) -> FitResult:
    """Fit matched pairs with tweakwcs and check the correction on ``all_xy`` (nothing applied).

    With ``sigmas`` (the pairs' reference and image position errors, arcsec; image
    errors None when unknown) the pairs are weighed by
    :func:`~roman_tweakreg.uncertainty.pair_weights` (``weight`` is not used); unknown
    image errors are one common error found from the residuals of an unweighted fit
    (:func:`~roman_tweakreg.uncertainty.common_image_sigma`).  The fit records its
    uncertainties (:func:`~roman_tweakreg.uncertainty.fit_uncertainty`).
    """
    nmatches = len(img_m)
    minobj = max(pars.minobj, MIN_MATCHES[pars.fitgeometry])
    if nmatches < minobj:
        return FitResult(
            "FAILED",
            f"not enough matches: {nmatches} found, minobj is {minobj}",
            nmatches=nmatches,
        )

    def tweakwcs_fit(w):
        if sigmas is not None and w is not None:
            return _normalised_clipping_fit(ref_m, img_m, w, pars)
        return iter_linear_fit(
            ref_m,
            img_m,
            wuv=w,
            fitgeom=pars.fitgeometry,
            nclip=pars.nclip,
            sigma=(pars.sigma, "rmse"),
            clip_accum=True,
        )

    try:
        if sigmas is not None:
            ref_sigma, img_sigma = sigmas
            if img_sigma is None:
                first = tweakwcs_fit(None)
                kept = np.asarray(first["fitmask"], bool)
                img_sigma = common_image_sigma(
                    np.asarray(first["resids"], float),
                    filled_sigma(ref_sigma)[kept],
                    n_par=_N_PARAMETERS[pars.fitgeometry],
                )
            weight = pair_weights(ref_sigma, img_sigma)
        fit = tweakwcs_fit(weight)
    except (NotEnoughPointsError, SingularMatrixError) as err:
        return FitResult("FAILED", f"fit failed: {err}", nmatches=nmatches)
    # express the correction about the tangent plane's origin
    matrix = np.asarray(fit["matrix"], dtype=float)
    center = np.asarray(fit["center"], dtype=float)
    fit["shift"] = np.asarray(fit["shift"], dtype=float) + center - matrix @ center
    fit["nmatches"] = int(np.count_nonzero(fit["fitmask"]))
    fit["weighting"] = "errors" if sigmas is not None else ("weight" if weight is not None else "")
    fit.update(fit_uncertainty(ref_m, img_m, fit, weight))
    reason = _implausible(fit, img_m, all_xy, pars.searchrad)
    if reason:
        return FitResult("FAILED", reason, fit=fit, nmatches=nmatches, implausible=True)
    return FitResult("SUCCESS", fit=fit, nmatches=nmatches)


def _normalised_clipping_fit(ref_m, img_m, weight, pars: FitParameters) -> dict:
    """tweakwcs's ``iter_linear_fit`` of pairs weighed by their errors, clipped on the
    residuals in units of each pair's error.

    tweakwcs clips a weighted fit on the plain residuals against the *weighted* rmse,
    which the precise pairs set: pairs of large but honest errors (faint stars carried
    over years) are clipped as outliers (a fifth of them with errors of 1 to 10 mas).
    Here each round fits the kept pairs (tweakwcs, no clipping) and drops the pairs
    whose normalised residual ``|r| sqrt(w)`` exceeds ``sigma`` times its rms, at most
    ``nclip`` times, never below the geometry's minimum number of pairs; the fit's
    ``fitmask`` is over all pairs.
    """
    center = img_m.mean(axis=0)
    mask = np.ones(len(img_m), bool)
    rounds = 0
    while True:
        fit = iter_linear_fit(ref_m[mask], img_m[mask], wuv=weight[mask],
                              fitgeom=pars.fitgeometry, nclip=0, center=center)  # fmt: skip
        if rounds == pars.nclip:
            break
        matrix = np.asarray(fit["matrix"], float)
        shift = np.asarray(fit["shift"], float) + center - matrix @ center
        norm = np.hypot(*(ref_m - img_m @ matrix.T - shift).T) * np.sqrt(weight)
        keep = mask & (norm < pars.sigma * np.sqrt(np.mean(norm[mask] ** 2)))
        if keep.sum() < MIN_MATCHES[pars.fitgeometry] or keep.sum() == mask.sum():
            break
        mask, rounds = keep, rounds + 1
    fit["fitmask"], fit["eff_nclip"] = mask, rounds
    return fit


def _judge(result: FitResult, q: Quality, pars: FitParameters, searchrad_name: str) -> None:
    """Record ``q`` in ``result`` and fail it when a quality gate fails.

    A gate's reason replaces any earlier one (an implausible correction made of
    chance matches is reported as the chance matches it is); an implausible
    correction of real matches says that a wider search would accept it.

    .. warning:: Modifies ``result`` in place.
    """
    result.quality = q
    reason = gates(q, pars, searchrad_name)
    if reason:
        result.status, result.reason = Status.FAILED, reason
    elif result.implausible:
        result.reason += (
            f"; the matches are no chance ({q.significance:.3g} sigma): if the pointing may "
            f"be off this much, widen {searchrad_name} (see the troubleshooting page)"
        )


def _implausible(fit: dict, matched_xy: np.ndarray, all_xy: np.ndarray, searchrad: float) -> str:
    """Why a correction is implausible, or '' when it is plausible.

    Plausible: it moves the centre of the matched sources by no more than
    ``searchrad`` (the offset the matcher may find) and no source by more than
    twice that (roll about a distant centre moves far detectors further).
    """
    centre = matched_xy.mean(axis=0, keepdims=True)
    shift = float(np.hypot(*(affine(centre, fit) - centre).T)[0])
    worst = float(np.hypot(*(affine(all_xy, fit) - all_xy).T).max())
    if not (np.isfinite(shift) and np.isfinite(worst)):
        return "implausible correction rejected: it is not finite"
    if shift > searchrad:
        return (
            f"implausible correction rejected: it would shift the matched sources by "
            f"{shift:.3g} arcsec, more than the search radius {searchrad:g} arcsec"
        )
    if worst > 2 * searchrad:
        return (
            f"implausible correction rejected: it would move sources by up to {worst:.3g} "
            f"arcsec, more than twice the search radius {searchrad:g} arcsec"
        )
    return ""
