"""Write the outcome into a model: corrected WCS, WCS name, s_region, wcs_fit_results, cal_step.

Status rule (``meta.cal_step.tweakreg``):

* ``COMPLETE`` - at least one fit (relative or absolute) succeeded and changed the WCS,
  or the image belongs to the reference group that other groups were aligned to;
* ``FAILED`` - no fit changed the WCS and at least one was attempted and failed;
* ``SKIPPED`` - nothing was attempted (no catalog, no other group and no
  reference catalog, non-imaging exposure).
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .matching import FitResult

__all__ = [
    "Status",
    "fit_results_dict",
    "image_status",
    "outcomes",
    "s_region",
    "update_model",
]

log = logging.getLogger(__name__)

_FIT_KEYS = (
    "fitgeom",
    "matrix",
    "shift",
    "center",
    "proper_rot",
    "proper",
    "rot",
    "<rot>",
    "scale",
    "<scale>",
    "skew",
    "rmse",
    "mae",
)


class Status(str, enum.Enum):
    """Values of ``meta.cal_step.tweakreg``."""

    COMPLETE = "COMPLETE"
    SKIPPED = "SKIPPED"
    FAILED = "FAILED"


def image_status(relative: FitResult | None, absolute: FitResult | None) -> Status:
    """Combine the two phases' outcomes into the image's status (rule above)."""
    phases = [r for r in (relative, absolute) if r is not None]
    if any(r.applied or r.status == "REFERENCE" for r in phases):
        return Status.COMPLETE
    if any(r.status == "FAILED" for r in phases):
        return Status.FAILED
    return Status.SKIPPED


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.astype(float).tolist() if value.dtype.kind == "f" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _phase_dict(result: FitResult | None) -> dict:
    if result is None:
        return {"status": "SKIPPED", "reason": "not run"}
    out = {"status": result.status, "reason": result.reason, "nmatches": int(result.nmatches)}
    if result.refcat:
        out["refcat"] = result.refcat
    if result.fit:
        out.update({k: _plain(result.fit[k]) for k in _FIT_KEYS if k in result.fit})
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
) -> dict:
    """Build ``meta.wcs_fit_results``: plain ASDF-serialisable values.

    Top-level keys describe the fit that set the final WCS (absolute when it
    was applied, else relative); ``relative`` and ``absolute`` hold each
    phase's own outcome; ``n_images`` (and romancal's name for it, ``n_detector``)
    counts the images in the solve.  Lengths (shift, rmse, mae) are arcsec in the
    tangent plane, angles degrees.  ``quality`` (where a fit was made) holds the
    :class:`~roman_tweakreg.quality.Quality` figures of the group's own fit.
    """
    final = absolute if absolute is not None and absolute.applied else relative
    top = _phase_dict(final if final is not None else absolute)
    top["status"] = {Status.COMPLETE: "SUCCESS"}.get(status, status.value)
    if status is not Status.COMPLETE:
        reasons = [r.reason for r in (relative, absolute) if r is not None and r.reason]
        top["reason"] = "; ".join(reasons)
    top["group_id"] = str(group_id)
    top["n_images"] = int(n_images)
    top["n_detector"] = int(n_images)  # romancal's name: detector images in the solve
    top["relative"] = _phase_dict(relative)
    top["absolute"] = _phase_dict(absolute)
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
        rel, abs_ = relative.get(img.group_id), absolute.get(img.group_id)
        status = image_status(rel, abs_)
        fit = fit_results_dict(rel, abs_, group_id=img.group_id, status=status, n_images=n)
        fit["n_sources"] = 0 if img.catalog is None else len(img.catalog)  # the image's own
        name = abs_.refcat if abs_ is not None and abs_.applied else ""
        out[img.index] = (wcss.get(k), fit, status, name, img.catalog_name)
        log.info(
            "%s: %s%s", img.name, status.value, f" ({fit['reason']})" if fit.get("reason") else ""
        )
    for index, reason in skipped.items():
        out[index] = (None, {"status": "SKIPPED", "reason": reason}, Status.SKIPPED, "", "")
    return out
