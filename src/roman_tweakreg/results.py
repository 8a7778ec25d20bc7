"""Write the outcome into a model: corrected WCS, WCS name, s_region, wcs_fit_results, cal_step.

Status rule (``meta.cal_step.tweakreg``), per image (an image refused by its group's
per-image gates sees that fit as ``FAILED``, :meth:`FitResult.for_image`):

* ``COMPLETE`` - every fit asked for succeeded for the image: the absolute fit was
  applied to it (the step always asks for one); without an absolute fit asked for
  (``absolute`` None, as in the core functions' use), a relative fit applied to it or
  its group being the relative reference;
* ``INCOMPLETE`` - the image is aligned to the other exposures (its relative fit was
  applied, or its group is the relative reference) but the absolute fit asked for was
  refused or impossible (quality gates, per-image gates, unrelated or empty catalog,
  service down): the relative correction is kept;
* ``FAILED`` - no fit changed the WCS and at least one was attempted and failed
  (romancal's status when its absolute fit fails, its WCS untouched);
* ``SKIPPED`` - nothing was attempted (no catalog, no other group and no
  reference catalog, non-imaging exposure).

These and the fits' statuses are one vocabulary, :class:`Status`.

A new key of ``wcs_fit_results``: declare it in :data:`FIT_KEYS` (a fit's),
:data:`TOP_KEYS` or :data:`QUALITY_KEYS` (its one-line doc is what docs/outputs.rst
shows), write it in :func:`fit_results_dict`, and, for the JSON report, declare its view
in :data:`roman_tweakreg.report.REPORT_KEYS` (with ``get``); a test fails while a key
written is not declared or a declared one is not written.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._types import Status
from .uncertainty import SIGMA_KEYS

if TYPE_CHECKING:
    from ._types import FitResult

__all__ = [
    "FIT_KEYS",
    "QUALITY_KEYS",
    "SCHEMA",
    "TOP_KEYS",
    "Key",
    "Status",
    "fit_results_dict",
    "image_status",
    "keys_rst",
    "outcomes",
    "plain",
    "s_region",
    "update_model",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Key:
    """One key of ``meta.wcs_fit_results`` or of the JSON report, declared once.

    The docs' key tables (``.. schema-keys::``) are made from these declarations and a
    test checks that every key the step writes is declared.

    Attributes
    ----------
    name : str
        The key.
    doc : str
        One-line meaning (reST), units included.
    tweakwcs : bool
        Copied from tweakwcs's fit (``iter_linear_fit``) where a fit was made.
    get : callable or None
        For a key of a view made from another (the report's from ``wcs_fit_results``):
        ``get(source) -> value``.
    """

    name: str
    doc: str
    tweakwcs: bool = False
    get: Callable[[Any], Any] | None = field(default=None, compare=False, repr=False)


#: Keys of a fit: of each phase (``relative``, ``absolute``) and, for the fit that
#: set the final WCS, of the top level.
FIT_KEYS = (
    Key("status", "SUCCESS, REFERENCE, FAILED or SKIPPED (:class:`~roman_tweakreg.results."
        "Status`); at the top level the image's outcome: SUCCESS, INCOMPLETE (relative "
        "alignment only), FAILED or SKIPPED."),
    Key("reason", "Why the fit failed or was skipped (at the top level: of every phase, "
        "joined by ``;``, or why the absolute fit was not applied to an INCOMPLETE image; "
        "a refused image's names it, its numbers and the likely cause); empty after a "
        "success."),
    Key("nmatches", "Matched pairs the fit was made of (one-to-one, within the tolerance; "
        "those of this exposure group when one absolute fit moved several)."),
    Key("image_nmatches", "Of those, the pairs of this image's own sources; the images of "
        "a group sum to its ``nmatches``."),
    Key("refcat", "Reference catalog of an absolute fit."),
    Key("fitgeom", "Fit geometry (``fitgeometry`` / ``abs_fitgeometry``).", tweakwcs=True),
    Key("matrix", "The correction's 2 x 2 matrix (alignment tangent plane).", tweakwcs=True),
    Key("shift", "The correction's shift ``[x, y]`` (arcsec, about the plane's origin).",
        tweakwcs=True),
    Key("center", "Centre of the matched image sources (arcsec).", tweakwcs=True),
    Key("proper_rot", "Rotation (degrees).", tweakwcs=True),
    Key("proper", "Whether the matrix is a proper rotation (no reflection).", tweakwcs=True),
    Key("rot", "Rotations of the x and y axes (degrees).", tweakwcs=True),
    Key("<rot>", "Mean rotation (degrees).", tweakwcs=True),
    Key("scale", "Scales of the x and y axes.", tweakwcs=True),
    Key("<scale>", "Mean scale.", tweakwcs=True),
    Key("skew", "Skew (degrees).", tweakwcs=True),
    Key("rmse", "RMS residual of the pairs the fit kept (arcsec; this group's own).",
        tweakwcs=True),
    Key("mae", "Mean absolute residual (arcsec; this group's own).", tweakwcs=True),
    Key("shift_sigma_mas", "1-sigma uncertainty of ``shift`` ``[x, y]`` (mas), from the "
        "covariance of the (weighted) least-squares solution scaled by the residuals "
        "(docs/algorithm.rst); of the shared fit."),
    Key("rot_sigma_arcsec", "1-sigma uncertainty of the rotation ``<rot>`` (arcsec; "
        "``rshift``, ``rscale``, ``general``; null where not fitted)."),
    Key("scale_sigma", "1-sigma uncertainty of ``<scale>`` (``rscale``, ``general``; null "
        "where not fitted)."),
    Key("skew_sigma_arcsec", "1-sigma uncertainty of ``skew`` (arcsec; ``general``; null "
        "where not fitted)."),
    Key("weighting", "How the pairs were weighed: ``errors`` (the reference catalog's "
        "position errors at the epoch and the sources' own), ``weight`` (the image "
        "catalogs' ``weight`` column) or empty (equally)."),
    Key("quality", "How sure the fit is: the keys below (where a fit was made)."),
)  # fmt: skip

#: Keys of the top level only.
TOP_KEYS = (
    Key("group_id", "The image's exposure group."),
    Key("n_images", "Images in the solve."),
    Key("n_detector", "romancal's name for ``n_images``."),
    Key("n_sources", "The image's own usable catalog sources."),
    Key("relative", "The relative phase's fit (the fit keys above; ``SKIPPED`` with "
        "reason ``not run`` when there was one exposure group)."),
    Key("absolute", "The absolute phase's fit (the fit keys above)."),
)  # fmt: skip

#: Keys of ``quality`` (:class:`roman_tweakreg.quality.Quality`); see docs/algorithm.rst.
QUALITY_KEYS = (
    Key("nmatches", "Pairs within the tolerance."),
    Key("nkept", "Pairs the fit kept after clipping."),
    Key("n_image", "Image sources in the overlap."),
    Key("n_reference", "Reference sources in the overlap."),
    Key("overlap_area", "Area the pairs should cover (square arcsec)."),
    Key("expected_chance", "Pairs chance gives for these densities."),
    Key("trials", "Offsets the search tried."),
    Key("false_alarm", "Probability that chance gives as many pairs."),
    Key("significance", "The same in Gaussian sigma (5 or more needed)."),
    Key("rmse", "RMS residual (arcsec)."),
    Key("mae", "Mean residual (arcsec)."),
    Key("noise", "The residuals' robust core (arcsec)."),
    Key("rmse_over_noise", "``rmse / noise``."),
    Key("matched_fraction", "Pairs over the smaller of ``n_image`` and ``n_reference``."),
    Key("spread", "Fraction of the overlap the kept pairs' hull covers."),
)  # fmt: skip

#: Every key table of ``wcs_fit_results``, by the name docs/outputs.rst uses.
SCHEMA = {
    "wcs_fit_results.fit": FIT_KEYS,
    "wcs_fit_results.top": TOP_KEYS,
    "wcs_fit_results.quality": QUALITY_KEYS,
}

_TWEAKWCS_KEYS = tuple(k.name for k in FIT_KEYS if k.tweakwcs)
# copied from a fit's dict: tweakwcs's keys and those the fit adds (uncertainties, weighting)
_FIT_COPIED = (*_TWEAKWCS_KEYS, *SIGMA_KEYS, "weighting")


def keys_rst(table: tuple[Key, ...]) -> str:
    """A reST list-table of declared keys (used by the docs' ``schema-keys`` directive)."""
    lines = [".. list-table::", "   :header-rows: 1", "", "   * - Key", "     - Meaning"]
    for key in table:
        lines += [f"   * - ``{key.name}``", f"     - {key.doc}"]
    return "\n".join(lines)


def image_status(relative: FitResult | None, absolute: FitResult | None) -> Status:
    """Combine the two phases' outcomes (as the image sees them) into its status (rule
    above)."""
    phases = [r for r in (relative, absolute) if r is not None]
    aligned = relative is not None and (relative.applied or relative.status is Status.REFERENCE)
    if (absolute is not None and absolute.applied) or (absolute is None and aligned):
        return Status.COMPLETE
    if aligned:
        return Status.INCOMPLETE
    if any(r.status is Status.FAILED for r in phases):
        return Status.FAILED
    return Status.SKIPPED


def plain(value: Any, *, nan_as_none: bool = False) -> Any:
    """Turn numpy, ASDF and astropy values into plain Python (JSON and ASDF) values.

    Mappings become dicts, arrays and sequences lists, numpy scalars Python ones,
    times ISO strings.  Non-finite floats stay as they are, or become None with
    ``nan_as_none`` (JSON has no NaN).  Other objects are given as ``str``.
    """
    if isinstance(value, Mapping) or (
        hasattr(value, "items") and not isinstance(value, (str, bytes))
    ):  # ASDF lazy dict nodes, stnode objects
        return {str(k): plain(v, nan_as_none=nan_as_none) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [plain(v, nan_as_none=nan_as_none) for v in value.tolist()]
    if isinstance(value, np.generic):
        return plain(value.item(), nan_as_none=nan_as_none)
    if isinstance(value, float):
        return None if nan_as_none and not math.isfinite(value) else value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value, nan_as_none=nan_as_none)
    if hasattr(value, "isot"):  # astropy Time
        return str(value.isot)
    if isinstance(value, Iterable):
        return [plain(v, nan_as_none=nan_as_none) for v in value]
    return str(value)


def _phase_dict(result: FitResult | None, image: int) -> dict:
    if result is None:
        return {"status": Status.SKIPPED.value, "reason": "not run"}
    out = {
        "status": result.status.value,
        "reason": result.reason,
        "nmatches": int(result.nmatches),
        "image_nmatches": int(result.image_nmatches.get(image, 0)),
    }
    if result.refcat:
        out["refcat"] = result.refcat
    if result.fit:
        out.update({k: plain(result.fit[k]) for k in _FIT_COPIED if k in result.fit})
    if result.quality is not None:
        out["quality"] = result.quality.as_dict()
    return out


def fit_results_dict(
    relative: FitResult | None,
    absolute: FitResult | None,
    *,
    group_id: str,
    status: Status,
    n_images: int,
    image: int = 0,
) -> dict:
    """Build ``meta.wcs_fit_results``: plain ASDF-serialisable values.

    Top-level keys describe the fit that set the final WCS (absolute when it
    was applied, else relative); ``relative`` and ``absolute`` hold each
    phase's own outcome; ``n_images`` (and romancal's name for it, ``n_detector``)
    counts the images in the solve.  Lengths (shift, rmse, mae) are arcsec in the
    tangent plane, angles degrees.  ``quality`` (where a fit was made) holds the
    :class:`~roman_tweakreg.quality.Quality` figures of the group's own fit;
    ``image_nmatches`` the pairs of image ``image`` (its plane index) among the fit's.
    The keys are declared in :data:`SCHEMA`.
    """
    final = absolute if absolute is not None and absolute.applied else relative
    top = _phase_dict(final if final is not None else absolute, image)
    top["status"] = status.as_fit.value
    if status is Status.INCOMPLETE:
        top["reason"] = (
            "aligned to the other exposures only (relative alignment kept); absolute "
            f"alignment {absolute.status.value.lower()}: {absolute.reason}"
        )
    elif status is not Status.COMPLETE:
        reasons = [r.reason for r in (relative, absolute) if r is not None and r.reason]
        top["reason"] = "; ".join(reasons)
    top["group_id"] = str(group_id)
    top["n_images"] = int(n_images)
    top["n_detector"] = int(n_images)  # romancal's name: detector images in the solve
    top["relative"] = _phase_dict(relative, image)
    top["absolute"] = _phase_dict(absolute, image)
    return top


def s_region(wcs) -> str | None:
    """Return the ``POLYGON ICRS`` footprint string of ``wcs``, or None if not finite."""
    corners = wcs.footprint(center=False)
    if not np.all(np.isfinite(corners)):
        return None
    return "POLYGON ICRS " + " ".join(f"{v:.9f}" for v in np.ravel(corners))


def update_model(model, wcs, fit_results: dict, status: Status, refcat_name: str) -> None:
    """Record the outcome in ``model``.

    .. warning:: Modifies ``model`` in place: ``meta.wcs`` (only when ``wcs`` is
       not None), ``meta.wcsinfo.s_region``, ``meta.wcs_fit_results`` and
       ``meta.cal_step.tweakreg``.
    """
    if wcs is not None:
        wcs.name = f"FIT-LVL2-{refcat_name}" if refcat_name else "FIT-LVL2-RELATIVE"
        model.meta.wcs = wcs
        region = s_region(wcs)
        if region is not None:
            model.meta.wcsinfo.s_region = region
    model.meta["wcs_fit_results"] = fit_results
    if "cal_step" in model.meta:
        model.meta.cal_step.tweakreg = status.value


def outcomes(plane, relative: dict, absolute: dict, skipped: dict[int, str], workers=None) -> dict:
    """Decide what to write into each model.

    ``workers`` (see :meth:`~roman_tweakreg.plane.TangentPlane.corrected_wcss`) build
    the corrected WCSs in parallel.

    Returns
    -------
    dict
        Library index -> ``(wcs or None, wcs_fit_results, Status, refcat name, catalog name)``;
        ``wcs`` is None where no fit changed it.
    """
    out = {}
    n = len(plane.images)
    wcss = plane.corrected_wcss(range(n), workers)
    for k, img in enumerate(plane.images):
        rel, abs_ = relative.get(img.group_id), absolute.get(k, absolute.get(img.group_id))
        rel = None if rel is None else rel.for_image(k)
        abs_ = None if abs_ is None else abs_.for_image(k)
        status = image_status(rel, abs_)
        fit = fit_results_dict(rel, abs_, group_id=img.group_id, status=status, n_images=n, image=k)
        fit["n_sources"] = 0 if img.catalog is None else len(img.catalog)  # the image's own
        name = abs_.refcat if abs_ is not None and abs_.applied else ""
        out[img.index] = (wcss.get(k), fit, status, name, img.catalog_name)
        log.info(
            "%s: %s%s", img.name, status.value, f" ({fit['reason']})" if fit.get("reason") else ""
        )
    for index, reason in skipped.items():
        fit = {"status": Status.SKIPPED.value, "reason": reason}
        out[index] = (None, fit, Status.SKIPPED, "", "")
    return out
