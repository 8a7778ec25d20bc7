"""The types the alignment's modules share: images, fit parameters, fits and statuses.

They live here, apart from the modules that make and use them, so that no two modules
import each other (directly or through others): ``catalogs`` makes
:class:`ImageCatalog`, ``plane`` and ``align`` use it; ``matching`` makes
:class:`FitResult` of :class:`FitParameters`, ``quality`` judges it with
:class:`Quality`, ``results`` writes it with :class:`Status`.  Each is re-exported by
the module that makes it, where it was documented before.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from . import parameters
from .search import OffsetMatch

if TYPE_CHECKING:
    from astropy.table import Table
    from gwcs import WCS

__all__ = [
    "FitParameters",
    "FitResult",
    "ImageCatalog",
    "ImageCheck",
    "Matches",
    "Quality",
    "Status",
]


class Status(enum.StrEnum):
    """The one vocabulary of outcomes, of a fit and of an image.

    A fit (:attr:`roman_tweakreg.matching.FitResult.status`, ``status`` of each phase in
    ``meta.wcs_fit_results``) is ``SUCCESS`` (its correction was applied),
    ``REFERENCE`` (the group the others were aligned to), ``FAILED`` or ``SKIPPED``.
    An image (``meta.cal_step.tweakreg``, see :mod:`roman_tweakreg.results`) is
    ``COMPLETE``, ``INCOMPLETE`` (relative alignment only: the absolute fit asked for was
    refused or impossible), ``FAILED`` or ``SKIPPED``; the top-level ``status`` of its
    ``wcs_fit_results`` says the same as a fit status (:attr:`as_fit`: ``COMPLETE`` is
    ``SUCCESS``, as romancal writes it).
    """

    SUCCESS = "SUCCESS"
    REFERENCE = "REFERENCE"
    COMPLETE = "COMPLETE"
    INCOMPLETE = "INCOMPLETE"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"

    @property
    def as_fit(self) -> Status:
        """This image status as the fit status of the top level of ``wcs_fit_results``
        (``COMPLETE`` is ``SUCCESS``; the others are themselves)."""
        return Status.SUCCESS if self is Status.COMPLETE else self


@dataclass(frozen=True)
class Quality:
    """How sure a fit is: what chance would give and what the fit got.

    Lengths are arcsec, areas square arcsec, in the alignment plane.

    Attributes
    ----------
    nmatches : int
        One-to-one pairs within the tolerance (before the fit's clipping).
    nkept : int
        Pairs the fit kept (after clipping).
    n_image, n_reference : int
        Image and reference sources in the overlap.
    overlap_area : float
        Area of the footprint the pairs should cover: the overlap of the reference
        footprint with the group's grown by ``searchrad + tolerance`` (relative) or
        the images' footprint (absolute).
    expected_chance : float
        Pairs expected within the tolerance by chance for these densities:
        ``n_image * n_reference * pi * tolerance**2 / overlap area``, summed over
        separate matches (the exposure groups of an absolute fit).
    trials : float
        Independent offsets the offset search tried (look-elsewhere factor):
        ``((searchrad + tolerance) / tolerance)**2`` with the 2D histogram, else 1;
        to the power of the number of separate matches.
    false_alarm : float
        Probability that chance alone gives ``nmatches`` pairs at the best of
        ``trials`` offsets: ``min(1, trials * P(Poisson(expected_chance) >= nmatches))``.
    significance : float
        ``false_alarm`` as a one-sided Gaussian significance (sigma).
    rmse, mae, noise : float
        The fit's rmse, mean residual and robust core (as tweakwcs's ``mad``: the
        median residual scaled to an rmse for Gaussian errors), over the pairs the
        fit kept (unweighted).
    matched_fraction : float
        ``nmatches`` over the smaller of ``n_image`` and ``n_reference``.
    spread : float
        Area of the convex hull of the kept pairs over ``overlap_area``.
    """

    nmatches: int
    nkept: int
    n_image: int
    n_reference: int
    overlap_area: float
    expected_chance: float
    trials: float
    false_alarm: float
    significance: float
    rmse: float
    mae: float
    noise: float
    matched_fraction: float
    spread: float

    @property
    def rmse_over_noise(self) -> float:
        """``rmse / noise`` (1 for Gaussian residuals; far above with mismatches)."""
        return self.rmse / self.noise if self.noise > 0 else float("inf")

    def as_dict(self) -> dict:
        """Plain values for ``wcs_fit_results`` (``rmse_over_noise`` included)."""
        out = {k: (int(v) if isinstance(v, int) else float(v)) for k, v in vars(self).items()}
        out["rmse_over_noise"] = float(self.rmse_over_noise)
        return out


@dataclass
class ImageCatalog:
    """One image ready for alignment: its sources, WCS and identity.

    Attributes
    ----------
    index : int
        Position of the image in the library.
    name : str
        The image's file name (for messages and results).
    group_id : str
        Exposure group.
    catalog : Table or None
        ``x``, ``y`` (0-indexed pixels) of usable sources; None until read (see
        :func:`members`).
    wcs : gwcs.WCS
        The image's WCS as given.
    wcsinfo : dict
        ``v2_ref``, ``v3_ref``, ``roll_ref``.
    epoch : float or None
        Decimal year of the exposure start.
    catalog_name : str
        Resolved catalog file the step assigned (catfile, association or
        detection), to be recorded in ``meta.tweakreg_catalog``; '' otherwise.
    catalog_file : str
        The catalog file read, whatever named it; '' for an in-memory catalog.
    observer : numpy.ndarray or None
        Roman's barycentric position (AU, ICRS axes) from ``meta.ephemeris`` when
        usable (:func:`roman_tweakreg._meta.observer_position`), else None (the
        absolute phase then uses the Sun-Earth L2 point at ``epoch``).
    exposure : str
        The exposure the image belongs to, for messages: ``<visit_id>_<exposure>`` of
        ``meta.observation`` (or its ``exposure`` alone), else the pointing
        (``ra_ref``, ``dec_ref``, ``roll_ref``); '' when unknown.
    """

    index: int
    name: str
    group_id: str
    catalog: Table | None
    wcs: WCS
    wcsinfo: dict
    epoch: float | None
    catalog_name: str = ""
    catalog_file: str = ""
    observer: np.ndarray | None = None
    exposure: str = ""


@dataclass(frozen=True)
class FitParameters:
    """Matching and fitting parameters of one alignment phase (arcsec where lengths).

    The fields are :data:`roman_tweakreg.parameters.FIT_NAMES`; their defaults, accepted
    values and docs are those of the relative fit's parameters there.
    """

    minobj: int = parameters.default("minobj")
    searchrad: float = parameters.default("searchrad")
    use2dhist: bool = parameters.default("use2dhist")
    separation: float = parameters.default("separation")
    tolerance: float = parameters.default("tolerance")
    fitgeometry: str = parameters.default("fitgeometry")
    nclip: int = parameters.default("nclip")
    sigma: float = parameters.default("sigma")

    def matcher(self) -> OffsetMatch:
        """Return the matcher configured with these parameters: tweakwcs's ``XYXYMatch``
        started at the offset :func:`~roman_tweakreg.search.offset_search` finds."""
        return OffsetMatch(
            searchrad=self.searchrad,
            separation=self.separation,
            use2dhist=self.use2dhist,
            tolerance=self.tolerance,
        )


@dataclass(frozen=True)
class ImageCheck:
    """One image's own view of its group's fit (:func:`~roman_tweakreg.quality.image_check`).

    Lengths are arcsec in the alignment plane, offsets reference minus image where the
    group's fit puts the image.

    Attributes
    ----------
    n_sources : int
        The image's sources.
    n_reference : int
        Reference sources on the image's footprint (grown by the tolerance).
    possible : int
        Pairs the image could make: the smaller of the two.
    matched : int
        Pairs within the tolerance at the group's solution.
    own_offset : tuple of float
        The offset (within the search radius) pairing most of the image's own sources.
    own_matches : int
        Pairs within the tolerance at ``own_offset``.
    own_scatter : float
        RMS of those pairs' differences about ``own_offset``.
    expected_chance : float
        Pairs chance gives at one offset for the image's densities.
    significant : bool
        Whether ``own_matches`` is no chance (5 sigma after the search's trials and at
        least ten times ``expected_chance``): the image alone says where it belongs.
    """

    n_sources: int
    n_reference: int
    possible: int
    matched: int
    own_offset: tuple[float, float]
    own_matches: int
    own_scatter: float
    expected_chance: float
    significant: bool

    @property
    def own_shift(self) -> float:
        """Length of ``own_offset``."""
        return float(np.hypot(*self.own_offset))

    @property
    def own_error(self) -> float:
        """Uncertainty of ``own_offset``: ``own_scatter / sqrt(own_matches)``."""
        return self.own_scatter / np.sqrt(max(self.own_matches, 1))


@dataclass
class Matches:
    """The matched pairs a fit was made of, in the fit's order (alignment plane, arcsec).

    Attributes
    ----------
    ref_xy, img_xy : numpy.ndarray
        Reference and image positions of the pairs (N x 2), before the fit.
    source : numpy.ndarray
        Index of each pair's image source among the image positions of its search
        (those of its exposure group, :meth:`~roman_tweakreg.plane.TangentPlane.group_xy`).
    image : numpy.ndarray
        Plane index (:attr:`~roman_tweakreg.plane.TangentPlane.images`) of the image each
        pair's source is from.
    """

    ref_xy: np.ndarray
    img_xy: np.ndarray
    source: np.ndarray
    image: np.ndarray

    def __len__(self) -> int:
        return len(self.img_xy)

    def per_image(self) -> dict[int, int]:
        """Plane index -> pairs of that image's own sources (images without pairs left out)."""
        images, counts = np.unique(self.image, return_counts=True)
        return {int(i): int(c) for i, c in zip(images, counts, strict=True)}

    def part(self, start: int, stop: int) -> Matches:
        """The pairs ``start:stop`` (those of one exposure group in an absolute fit)."""
        cut = slice(start, stop)
        return Matches(self.ref_xy[cut], self.img_xy[cut], self.source[cut], self.image[cut])


@dataclass
class FitResult:
    """Outcome of one fit (one alignment phase) for one group of images.

    ``status`` (a :class:`~roman_tweakreg.results.Status`) is ``SUCCESS`` (correction
    applied), ``REFERENCE`` (the group the others were aligned to), ``FAILED`` (nothing
    applied; ``reason`` says why) or ``SKIPPED`` (not attempted; ``reason`` says why);
    a plain string is turned into it.  ``nmatches`` counts the pairs ``matches`` the fit
    was made of, ``quality`` says how sure the fit is (see
    :func:`~roman_tweakreg.quality.quality`).  An absolute fit of several exposure groups
    (one correction for all) has each group's own view of it in ``groups`` (see
    :func:`~roman_tweakreg.align.group_results`).  ``refused`` holds the images (plane
    index -> reason) that do not share the fit's solution (the per-image gates,
    :func:`~roman_tweakreg.quality.refusals`): the fit was made without them and is not
    applied to them.  ``implausible`` says that the fit was made and refused because
    it would move the sources further than the search could have found them
    (the plausibility check of :mod:`~roman_tweakreg.matching`); ``reason`` says
    by how much.
    """

    status: Status
    reason: str = ""
    fit: dict = field(default_factory=dict)
    nmatches: int = 0
    group_id: str | None = None
    refcat: str = ""
    quality: Quality | None = None
    matches: Matches | None = field(default=None, repr=False)
    groups: dict[str, FitResult] = field(default_factory=dict, repr=False)
    refused: dict[int, str] = field(default_factory=dict)
    implausible: bool = False

    def __post_init__(self):
        self.status = Status(self.status)

    @property
    def applied(self) -> bool:
        """Whether this fit changed the WCS."""
        return self.status is Status.SUCCESS

    def for_image(self, index: int) -> FitResult:
        """This fit as image ``index`` (plane index) sees it: ``FAILED`` with its own
        reason when the image was refused (:attr:`refused`), else the fit itself."""
        if index not in self.refused:
            return self
        return replace(self, status=Status.FAILED, reason=self.refused[index], groups={})

    @property
    def image_nmatches(self) -> dict[int, int]:
        """Plane index -> pairs of that image's own sources; they sum to ``nmatches``."""
        return {} if self.matches is None else self.matches.per_image()
