"""The offset search that starts each matching: the offset pairing the most sources.

:class:`OffsetMatch` is tweakwcs's ``XYXYMatch`` started at the offset
:func:`offset_search` finds, instead of at the peak of tweakwcs's 2D histogram of
pixel-sized bins (see docs/algorithm.rst).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from tweakwcs.matchutils import XYXYMatch

__all__ = ["SEARCH_SOURCES", "Offset", "OffsetMatch", "count_at", "offset_search"]


class Offset(NamedTuple):
    """What :func:`offset_search` found (lengths in the plane's units).

    Attributes
    ----------
    offset : numpy.ndarray
        Reference minus image positions (2,).
    count : int
        Pairs within the tolerance of ``offset`` (one per image and reference source).
    scatter : float
        RMS distance of those pairs' differences from ``offset`` (nan without pairs).
    """

    offset: np.ndarray
    count: int
    scatter: float

#: Image sources the offset search uses at most (an even subsample of crowded fields).
SEARCH_SOURCES = 20000
#: Candidate peaks of the offset search counted exactly.
_CANDIDATES = 8


def offset_search(
    ref_xy: np.ndarray, img_xy: np.ndarray, searchrad: float, tolerance: float
) -> Offset:
    """The offset (reference minus image, within ``searchrad``) that pairs the most sources
    within ``tolerance``, and that number of pairs.

    Every difference between an image and a reference position up to
    ``searchrad + tolerance`` apart is binned in bins of half the tolerance; the bins
    are summed over a disk of radius ``tolerance`` (the pairs an offset at the bin's
    centre would make), and the few highest local maxima within ``searchrad`` are
    refined (the mean of the differences within the tolerance, twice) and counted
    exactly, one pair per image and per reference source.  Unlike a histogram of
    pixel-sized bins (tweakwcs's 2D histogram), this finds the offset of a sparse
    field whose positions scatter over several pixels (19 sources with 0.5 pixel
    errors), at the resolution of the matching itself.  The answer is an :class:`Offset`
    (``(0, 0)``, no pairs when no pair is possible).
    """
    zero = Offset(np.zeros(2), 0, float("nan"))
    if len(ref_xy) == 0 or len(img_xy) == 0:
        return zero
    if len(img_xy) > SEARCH_SOURCES:
        img_xy = img_xy[:: int(np.ceil(len(img_xy) / SEARCH_SOURCES))]
    reach = searchrad + tolerance
    # every (image, reference) pair within reach, as arrays (no list per source), in the
    # order of the image, then the reference index
    pairs = cKDTree(img_xy).sparse_distance_matrix(
        cKDTree(ref_xy), reach, output_type="ndarray"
    )
    if pairs.size == 0:
        return zero
    order = np.lexsort((pairs["j"], pairs["i"]))
    img_idx = pairs["i"][order].astype(np.intp)
    ref_idx = pairs["j"][order].astype(np.intp)
    diff = ref_xy[ref_idx] - img_xy[img_idx]
    step = tolerance / 2.0
    nbin = int(np.ceil(reach / step))
    edges = np.arange(-nbin, nbin + 1) * step
    hist, _, _ = np.histogram2d(diff[:, 0], diff[:, 1], bins=(edges, edges))
    r = int(np.ceil(tolerance / step))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (np.hypot(xx, yy) * step <= tolerance).astype(float)
    votes = ndimage.convolve(hist, disk, mode="constant")
    centres = (edges[:-1] + edges[1:]) / 2.0
    cx, cy = np.meshgrid(centres, centres, indexing="ij")
    peak = (votes == ndimage.maximum_filter(votes, size=3)) & (votes > 0)
    peak &= np.hypot(cx, cy) <= searchrad + step
    order = np.argsort(votes[peak])[::-1][:_CANDIDATES]
    best = zero
    for x, y in zip(cx[peak][order], cy[peak][order], strict=True):
        centre = np.array([x, y])
        for _ in range(2):
            close = np.hypot(*(diff - centre).T) <= tolerance
            if not close.any():
                break
            centre = diff[close].mean(axis=0)
        close = np.hypot(*(diff - centre).T) <= tolerance
        count = min(np.unique(img_idx[close]).size, np.unique(ref_idx[close]).size)
        better = count > best.count or (
            count == best.count and np.hypot(*centre) < np.hypot(*best.offset)
        )
        if np.hypot(*centre) <= searchrad and better:
            scatter = float(np.sqrt(np.mean(np.sum((diff[close] - centre) ** 2, axis=1))))
            best = Offset(centre, int(count), scatter)
    return best


def count_at(ref_xy: np.ndarray, img_xy: np.ndarray, tolerance: float) -> int:
    """Pairs within ``tolerance`` with no offset: image sources whose nearest reference
    source is within it, each reference source counted once."""
    if len(ref_xy) == 0 or len(img_xy) == 0:
        return 0
    dist, nearest = cKDTree(ref_xy).query(img_xy, distance_upper_bound=tolerance)
    return int(np.unique(nearest[np.isfinite(dist)]).size)


class OffsetMatch(XYXYMatch):
    """tweakwcs's ``XYXYMatch``, its initial offset found by :func:`offset_search`.

    With ``use2dhist`` the offset that pairs the most sources within ``tolerance`` is
    searched within ``searchrad`` (:func:`offset_search`), and tweakwcs's matcher
    (``xyxymatch``) pairs the sources from there; without, it is tweakwcs's matcher
    as configured.  The parameters are tweakwcs's.
    """

    def __init__(
        self, searchrad=3.0, separation=0.5, use2dhist=True, xoffset=0.0, yoffset=0.0,
        tolerance=1.0,
    ):  # fmt: skip
        super().__init__(
            searchrad=searchrad, separation=separation, use2dhist=use2dhist,
            xoffset=xoffset, yoffset=yoffset, tolerance=tolerance,
        )  # fmt: skip
        self.searchrad, self.separation, self.tolerance = searchrad, separation, tolerance
        self.use2dhist, self.offset = use2dhist, (float(xoffset), float(yoffset))

    def __call__(self, refcat, imcat, tp_pscale=1.0, tp_units=None, **kwargs):
        """Match ``imcat`` to ``refcat`` (``TPx``, ``TPy`` columns) as ``XYXYMatch`` does.

        Returns
        -------
        (ndarray, ndarray)
            Indices of the matched sources in ``refcat`` and ``imcat``.
        """
        offset = self.offset
        if self.use2dhist:
            ref_xy = np.column_stack([refcat["TPx"], refcat["TPy"]]).astype(float)
            img_xy = np.column_stack([imcat["TPx"], imcat["TPy"]]).astype(float)
            found = offset_search(ref_xy, img_xy, self.searchrad, self.tolerance).offset
            offset = (-float(found[0]), -float(found[1]))  # xyxymatch's: image - reference
        started = XYXYMatch(
            searchrad=self.searchrad, separation=self.separation, use2dhist=False,
            xoffset=offset[0], yoffset=offset[1], tolerance=self.tolerance,
        )  # fmt: skip
        return started(refcat, imcat, tp_pscale=tp_pscale, tp_units=tp_units, **kwargs)
