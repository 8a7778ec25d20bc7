"""Relative and absolute alignment: the two phases, orchestrated.

The step calls, in order: :func:`relative_align` (exposure groups to each other),
:func:`rigid_sets` and :func:`absolute_align` (each rigid set to the reference
catalog), then :func:`group_results` (each group's own view of an absolute fit).
The pieces they use live by job:

* :mod:`roman_tweakreg.matching`: matching and fitting (one match -> fit ->
  re-match -> re-fit routine for both phases), :class:`~roman_tweakreg.matching.FitParameters`
  and :class:`~roman_tweakreg.matching.FitResult`;
* :mod:`roman_tweakreg.quality`: whether a fit is real (the quality gates);
* :mod:`roman_tweakreg.plane`: the common tangent plane the sources are evaluated
  into once, and the WCS correction (``v2v3corr``) built from it;
* :mod:`roman_tweakreg.geometry`: affine maps in the plane, cones on the sphere.

Here:

* group footprints are convex hulls in the plane (no spherical polygon unions);
* with ``expand_refcat`` only groups whose fit succeeded add their sources to
  the reference catalog;
* an absolute fit matches each exposure group on its own, at its own epoch, and
  fits all their pairs together.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import shapely
from tweakwcs.matchutils import MatchSourceConfusionError

from .geometry import affine, affine_hull
from .matching import (
    FitParameters,
    FitResult,
    Pairs,
    _confusion,
    _judge,
    _match,
    _match_and_fit,
    match_and_fit,
)
from .quality import image_check, quality, refusals

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ._types import ImageCatalog
    from .plane import TangentPlane

__all__ = [
    "absolute_align",
    "group_results",
    "mixed_groups",
    "relative_align",
    "rigid_sets",
]

#: Fits of a group made again without the images refused by the per-image gates, at most.
REFITS = 3

log = logging.getLogger(__name__)


def _groups(images: Sequence[ImageCatalog]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(img.group_id, []).append(i)
    return groups


def relative_align(
    plane: TangentPlane,
    pars: FitParameters,
    *,
    enforce_user_order: bool = False,
    expand_refcat: bool = False,
    match: Callable | None = None,
) -> dict[str, FitResult]:
    """Align exposure groups to each other.

    The reference group is the first one (``enforce_user_order``) or the one
    overlapping the others most; the next group is always the one that
    overlaps the current reference footprint most.  Among equal overlaps (to 9
    significant digits) the first in input order comes first.

    .. warning:: Successful corrections are composed into ``plane`` in place.

    Returns
    -------
    dict
        Group id -> :class:`FitResult`.
    """
    match = match or pars.matcher()
    groups = _groups(plane.images)
    hulls = {g: plane.group_hull(m) for g, m in groups.items()}
    order = list(groups)
    if not enforce_user_order:
        overlap = {
            g: sum(hulls[g].intersection(hulls[h]).area for h in order if h != g) for g in order
        }
        order.sort(key=lambda g: -_area(overlap[g]))
    ref_group = order.pop(0)
    results = {
        ref_group: FitResult("REFERENCE", "reference for relative alignment", group_id=ref_group)
    }
    ref_xy = plane.group_xy(groups[ref_group])
    ref_hull = hulls[ref_group]
    while order:
        if not enforce_user_order:
            order.sort(key=lambda g: -_area(ref_hull.intersection(hulls[g]).area))
        g = order.pop(0)
        members = groups[g]
        img_xy = plane.group_xy(members)
        log.info(
            "Relative alignment: group %s (%d images, %d sources) to %d reference sources",
            g,
            len(members),
            len(img_xy),
            len(ref_xy),
        )
        def fit(current, ref_xy=ref_xy, g=g, ref_hull=ref_hull):
            xy = plane.group_xy(current)
            result = _match_and_fit(
                ref_xy, xy, pars, match, plane.group_weights(current), plane.group_owner(current)
            )
            result.group_id = g
            if result.fit:
                # pairs come from sources up to searchrad + tolerance apart
                grown = plane.group_hull(current).buffer(pars.searchrad + pars.tolerance)
                overlap = ref_hull.intersection(grown)
                pairs = (result.matches.ref_xy, result.matches.img_xy)
                q = quality([(ref_xy, xy, overlap)], pairs, result.fit, overlap, pars)
                _judge(result, q, pars, "searchrad")
            return result

        result, kept = _image_gates(
            plane, members, fit, lambda _k, ref_xy=ref_xy: ref_xy, pars, "relative"
        )
        results[g] = result
        if not result.applied:
            log.warning("Relative alignment of group %s failed: %s", g, result.reason)
            continue
        plane.apply(kept, result.fit)
        if expand_refcat:
            img_xy = plane.group_xy(kept)
            unmatched = np.ones(len(img_xy), bool)
            unmatched[result.matches.source] = False
            ref_xy = np.vstack([ref_xy, img_xy[unmatched]])  # already moved by apply
            ref_hull = ref_hull.union(plane.group_hull(kept)).convex_hull
    if not any(r.applied for r in results.values()):
        results[ref_group] = FitResult(
            "FAILED", "no other group could be aligned to it", group_id=ref_group
        )
    return results


def _image_gates(plane, members, fit, reference_of, pars, phase: str):
    """Fit ``members`` with ``fit(members) -> FitResult``, then check each image's own view
    of the solution (:func:`~roman_tweakreg.quality.image_check` with the reference
    positions ``reference_of(index)``); fit again without the images refused by
    :func:`~roman_tweakreg.quality.refusals` (at most :data:`REFITS` times).

    Returns the last fit, its ``refused`` images (plane index -> reason naming the image,
    its numbers and the likely cause) filled in, and the images it was made of.
    """
    current = list(members)
    result = fit(current)
    refused: dict[int, str] = {}
    for _ in range(REFITS):
        if not result.applied or len(current) < 2:
            break
        checks = {
            k: image_check(reference_of(k), affine(plane.xy[k], result.fit), pars)
            for k in current
        }
        new = refusals(checks, {k: plane.images[k].exposure for k in current})
        if not new:
            break
        for k, numbers in new.items():
            refused[k] = _refusal_reason(plane, members, k, numbers, phase)
            log.warning("%s", refused[k])
        current = [k for k in current if k not in new]
        if not current:
            result = FitResult("FAILED", "every image was refused", group_id=result.group_id)
            break
        result = fit(current)
    result.refused = refused
    return result, current


def _exposures(plane, members) -> list[str]:
    return sorted({plane.images[i].exposure for i in members if plane.images[i].exposure})


def _refusal_reason(plane, members, k, numbers: str, phase: str) -> str:
    image = plane.images[k]
    exposures = _exposures(plane, members)
    if len(exposures) > 1:
        own = [
            i for i in members if plane.images[i].exposure == image.exposure
        ]
        cause = (
            f"group {image.group_id} holds exposures {', '.join(exposures)}; exposure "
            f"{image.exposure} ({len(own)} images) does not share the others' pointing: "
            "give each exposure its own group (group_id)"
        )
    else:
        cause = (
            f"its pointing differs from the rest of group {image.group_id} (an image of "
            "another pointing given this group_id, or a detector whose WCS is off)"
        )
    return (
        f"{image.name} does not share the {phase} fit of group {image.group_id}: "
        f"{numbers}; {cause}; its WCS is left as it was before this fit"
    )


def mixed_groups(images: Sequence[ImageCatalog]) -> dict[str, list[str]]:
    """Exposure groups holding images of several exposures (or pointings): group id ->
    the exposures (:attr:`~roman_tweakreg.catalogs.ImageCatalog.exposure`)."""
    out: dict[str, set[str]] = {}
    for image in images:
        if image.exposure:
            out.setdefault(image.group_id, set()).add(image.exposure)
    return {g: sorted(e) for g, e in out.items() if len(e) > 1}


def absolute_align(
    plane: TangentPlane,
    ref_positions: Callable[[float | None], tuple[np.ndarray, np.ndarray]],
    pars: FitParameters,
    *,
    members: Sequence[int] | None = None,
    match: Callable | None = None,
    refcat_name: str = "",
    searchrad_name: str = "abs_searchrad",
    observers: Mapping[str, np.ndarray | None] | None = None,
) -> FitResult:
    """Align images, as one rigid set, to a reference catalog.

    Parameters
    ----------
    plane : TangentPlane
        The images and the corrections found so far.
    ref_positions : callable
        ``ref_positions(epoch) -> (ra, dec)`` in degrees: the reference catalog
        at an image's epoch; with ``observers``, ``ref_positions(epoch, observer)``,
        seen from the group's observer.  It may return ``(ra, dec, sigma)``, sigma the
        stars' position errors (mas, NaN where unknown; None for none): the fit then
        weighs each pair by them and the image sources' own errors (see
        :func:`~roman_tweakreg.matching._fit`).  Each exposure group is matched
        separately, at its own epoch and from its own observer, then all matches are
        fitted together.
    pars : FitParameters
    members : sequence of int, optional
        Indices of the images of the rigid set (default: all).
    match : callable, optional
        Matcher (default: tweakwcs ``XYXYMatch`` from ``pars``).
    refcat_name : str
        For the result and messages.
    searchrad_name : str
        The parameter a failed quality gate's reason suggests widening.
    observers : mapping, optional
        Group id -> barycentric position of the observer (AU) when the group was
        exposed (None: the barycentre).

    Returns
    -------
    FitResult
        The fit of the whole set, judged by :func:`~roman_tweakreg.quality.gates` on its
        :class:`~roman_tweakreg.quality.Quality`; ``groups`` holds each exposure group's
        own view of it (:func:`group_results`).

    .. warning:: On success the correction is composed into ``plane`` in place.
    """
    match = match or pars.matcher()
    members = list(range(len(plane.images))) if members is None else list(members)
    cache: dict = {}

    def fit(current):
        def find_pairs(matcher, fit):
            return _reference_pairs(
                plane, current, ref_positions, matcher, pars, cache, fit, observers
            )

        try:
            result, pairs = match_and_fit(
                find_pairs,
                plane.group_xy(current),
                pars,
                match,
                nothing_to_match=f"no {refcat_name} sources fall on the images",
            )
        except MatchSourceConfusionError as err:
            return FitResult("FAILED", _confusion(err, refcat_name), refcat=refcat_name)
        result.refcat = refcat_name
        if result.fit:
            _judge_set(plane, current, result, pairs, pars, searchrad_name)
        return result

    def reference_of(k):
        group_id = plane.images[k].group_id
        return _reference_xy(plane, group_id, k, ref_positions, cache, observers)[0]

    result, kept = _image_gates(plane, members, fit, reference_of, pars, "absolute")
    if result.applied:
        plane.apply(kept, result.fit)
    return result


def _place(ref_positions, image, observers):
    """The reference catalog for ``image``'s group: ``(ra, dec, sigma or None)``."""
    if observers is None:
        placed = ref_positions(image.epoch)
    else:
        placed = ref_positions(image.epoch, observers.get(image.group_id))
    return (*placed[:2], placed[2] if len(placed) > 2 else None)


def _reference_xy(plane, group_id, first, ref_positions, cache, observers=None):
    """The reference in the plane for exposure group ``group_id`` at the epoch of its
    image ``first`` and seen from its observer: ``(positions, position errors in arcsec
    or None)``, kept in ``cache`` per group."""
    if group_id not in cache:
        ra, dec, sigma = _place(ref_positions, plane.images[first], observers)
        cache[group_id] = (
            np.column_stack(plane.ref.world_to_tanp(ra, dec)) if len(ra) else np.empty((0, 2)),
            None if sigma is None else np.asarray(sigma, float) / 1000.0,  # arcsec
        )
    return cache[group_id]


def _reference_pairs(plane, members, ref_positions, match, pars, cache, fit=None, observers=None):
    """Matched reference and image positions of ``members``: lists, one entry per group.

    Each exposure group is matched on its own (a star seen by two exposures must
    match the same reference star twice), at its own epoch and from its own
    observer (``observers``: group id -> position).  With ``fit``, the
    sources are matched where ``fit`` moves them; the pairs are of their positions
    before it.  ``cache`` keeps each group's reference positions in the plane
    between calls.  Returns their :class:`~roman_tweakreg.matching.Pairs`, whose
    searches are (group id, reference positions near the group, image positions,
    footprint).
    """
    images = plane.images
    ref_all, img_all, weights, searches, img_idx, image = [], [], [], [], [], []
    sigmas = []
    for group in _groups([images[i] for i in members]).values():
        group = [members[i] for i in group]
        img_xy = plane.group_xy(group)
        group_id = images[group[0]].group_id
        ref_xy, ref_sigma = _reference_xy(
            plane, group_id, group[0], ref_positions, cache, observers
        )
        moved = img_xy if fit is None else affine(img_xy, fit)
        hulls = [plane.hulls[i] if fit is None else affine_hull(plane.hulls[i], fit) for i in group]
        near = _on_footprints(ref_xy, hulls, pars.searchrad + pars.tolerance)
        ref_xy = ref_xy[near]
        if len(img_xy) == 0 or len(ref_xy) == 0:
            continue
        ridx, iidx = _match(ref_xy, moved, match, pars)
        ref_all.append(ref_xy[ridx])
        img_all.append(img_xy[iidx])
        group_weight = plane.group_weights(group)
        weights.append(None if group_weight is None else group_weight[iidx])
        img_sigma = plane.group_sigma(group)
        sigmas.append((
            None if ref_sigma is None else ref_sigma[near][ridx],
            None if img_sigma is None else img_sigma[iidx],
        ))  # fmt: skip
        searches.append((images[group[0]].group_id, ref_xy, img_xy, plane.group_hull(group)))
        img_idx.append(iidx)
        image.append(plane.group_owner(group)[iidx])
    return Pairs(ref_all, img_all, weights, searches, img_idx, image, sigmas)


def _judge_set(plane, members, result: FitResult, pairs, pars, searchrad_name: str) -> None:
    """:func:`~roman_tweakreg.matching._judge` an absolute fit of ``members`` on all its
    pairs, then record each exposure group's own view of it in ``result.groups``: the
    shared correction and status, the group's own pairs (``matches``, ``nmatches``),
    residuals (``rmse``, ``mae``) and :class:`~roman_tweakreg.quality.Quality`.

    .. warning:: Modifies ``result`` in place.
    """
    ref_all, img_all, searches = pairs.ref, pairs.img, pairs.searches
    mask = np.asarray(result.fit["fitmask"], bool)
    own = {}
    start = 0
    for (group_id, ref_xy, img_xy, hull), ref_m, img_m in zip(
        searches, ref_all, img_all, strict=True
    ):
        stop = start + len(img_m)
        part = dict(result.fit, fitmask=mask[start:stop])
        own[group_id] = (quality([(ref_xy, img_xy, hull)], (ref_m, img_m), part, hull, pars),
                         start, stop)  # fmt: skip
        start = stop
    stacked = (np.vstack(ref_all), np.vstack(img_all))
    footprint = plane.group_hull(list(members))
    q = quality([s[1:] for s in searches], stacked, result.fit, footprint, pars)
    _judge(result, q, pars, searchrad_name)
    for group_id, (q, start, stop) in own.items():
        fit = dict(result.fit)
        if "rmse" in fit:
            fit["rmse"], fit["mae"] = q.rmse, q.mae
        result.groups[group_id] = replace(
            result, fit=fit, nmatches=q.nmatches, quality=q, group_id=group_id,
            matches=result.matches.part(start, stop), groups={},
        )  # fmt: skip


def group_results(result: FitResult) -> dict[str, FitResult]:
    """Each exposure group's own view of an absolute fit of several (:func:`absolute_align`).

    The correction (``matrix``, ``shift``) and the status are the shared fit's;
    ``nmatches``, ``matches``, ``quality`` and the fit's ``rmse`` and ``mae`` are the
    group's own, so that a group's ``wcs_fit_results`` never show another group's
    figures.  Groups without pairs are not in the answer.
    """
    return dict(result.groups)


def _on_footprints(ref_xy: np.ndarray, hulls, margin: float) -> np.ndarray:
    """Which reference sources (a mask) can fall on the images: inside one of their
    footprints ``hulls`` grown by ``margin`` (the search radius and the tolerance)."""
    if len(ref_xy) == 0 or not hulls:
        return np.ones(len(ref_xy), bool)
    area = shapely.union_all([h.buffer(margin) for h in hulls])
    lo, hi = np.asarray(area.bounds[:2]), np.asarray(area.bounds[2:])
    box = np.all((ref_xy >= lo) & (ref_xy <= hi), axis=1)
    keep = np.zeros(len(ref_xy), bool)
    keep[box] = shapely.contains_xy(area, ref_xy[box, 0], ref_xy[box, 1])
    return keep


def rigid_sets(images: Sequence[ImageCatalog], relative: dict[str, FitResult]) -> list[list[int]]:
    """Split images into sets aligned to the reference catalog as one rigid body each.

    Groups aligned to each other (the relative reference and every group whose
    relative fit succeeded) form one set; a group whose relative fit failed is
    a set of its own, so that it can still be aligned to the reference catalog, and so
    are the images of a group that its relative fit refused (they do not share its
    solution; see :func:`~roman_tweakreg.quality.refusals`).
    """
    groups = _groups(images)
    refused = {i for r in relative.values() for i in r.refused}
    together = [
        g for g in groups if g not in relative or relative[g].status in ("REFERENCE", "SUCCESS")
    ]
    sets = [[i for g in together for i in groups[g] if i not in refused]] if together else []
    sets += [groups[g] for g in groups if g not in together]
    sets += [[i for i in groups[g] if i in refused] for g in together]
    return [s for s in sets if s]


def _area(area: float) -> float:
    """An overlap area to 9 significant digits: equal overlaps (two groups overlap each other
    by the same area) compare equal whatever the rounding of the polygon intersection, so
    that ties keep the input order (a stable sort) instead of following floating-point noise.
    """
    return float(f"{area:.9g}")
