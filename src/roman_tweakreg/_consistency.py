"""Checks of each image's metadata against itself, made before it is aligned.

An image whose metadata disagree would be aligned, marked COMPLETE and be wrong:

* :func:`detector_mismatch`: the detector named in ``meta.instrument.detector``, the
  aperture in ``meta.wcsinfo.aperture_name`` and the WCS must be of one detector.  The
  WCS's ``detector -> v2v3`` transform must take the detector's reference pixel to its
  reference point in the Roman SIAF (``data/wfi_siaf.csv``) within
  :data:`SIAF_TOLERANCE` (a WFI10 distortion in a WFI01 file is 489 arcsec off);
* :func:`implausible_epoch`: ``meta.exposure.start_time`` must lie within
  :data:`EPOCH_RANGE`, or the reference catalog would be carried centuries.

Each returns the reason in words, or '' when the image passes.
"""

from __future__ import annotations

import csv
import logging
import re
import warnings
from functools import lru_cache
from importlib import resources
from typing import Any

import erfa
import numpy as np

from ._meta import exposure_epoch, meta_get

__all__ = [
    "EPOCH_RANGE",
    "SIAF_TOLERANCE",
    "detector_mismatch",
    "implausible_epoch",
    "load_siaf",
]

log = logging.getLogger(__name__)

#: Largest distance (arcsec) between where an image's WCS puts its detector's reference
#: pixel in v2v3 and the SIAF's reference point of that detector.  Neighbouring
#: detectors' reference points are 400 to 1000 arcsec apart; a WCS made from any
#: distortion reference file of the right detector is well within a few arcsec.
SIAF_TOLERANCE = 5.0
#: v2v3 scales (arcsec per pixel) of a WCS taken as a WFI distortion (WFI: 0.105-0.111).
#: Other WCSs (toy WCSs of unit tests, whose v2v3 is not the telescope's) are not
#: compared with the SIAF.
_WFI_SCALE = (0.09, 0.13)
#: Exposure epochs (decimal years) accepted: Roman launches in 2026-2027 for a 5-year
#: mission that may be extended; simulations and romancal's own tests use epochs from
#: Gaia DR3's (2016.0) on.  Outside, the reference catalog would be carried decades to
#: centuries (its proper motions' errors growing with it) to a date that cannot be an
#: observation's.
EPOCH_RANGE = (2000.0, 2050.0)
_APERTURE = re.compile(r"^(WFI\d\d)(_|$)", re.IGNORECASE)


@lru_cache(maxsize=1)
def load_siaf() -> dict[str, dict[str, float]]:
    """Read the packaged WFI SIAF table (``data/wfi_siaf.csv``).

    Returns
    -------
    dict
        Detector name (``WFI01`` ...) -> dict of the SIAF columns (floats).
    """
    text = resources.files("roman_tweakreg").joinpath("data/wfi_siaf.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    return {
        row["detector"]: {k: float(v) for k, v in row.items() if k != "detector"} for row in rows
    }


def detector_mismatch(meta: Any, wcs: Any) -> str:
    """Why the detector, the aperture and the WCS of an image disagree ('' when they agree).

    Parameters
    ----------
    meta : mapping-like
        The model's ``meta``.
    wcs : gwcs.WCS
        Its WCS, with a ``v2v3`` frame.
    """
    detector = str(meta_get(meta_get(meta, "instrument"), "detector") or "").upper()
    aperture = str(meta_get(meta_get(meta, "wcsinfo"), "aperture_name") or "")
    named = _APERTURE.match(aperture)
    if detector and named and named.group(1).upper() != detector:
        return (
            f"meta.instrument.detector is {detector} but meta.wcsinfo.aperture_name is "
            f"{aperture} (detector {named.group(1).upper()}): the file mixes two detectors"
        )
    siaf = load_siaf()
    if detector not in siaf:
        return ""
    ref = siaf[detector]
    x0, y0 = ref["XSciRef"] - 1.0, ref["YSciRef"] - 1.0  # 0-indexed pixels
    try:
        to_v2v3 = wcs.get_transform(wcs.available_frames[0], "v2v3")
        v2, v3 = (np.asarray(c, float) for c in to_v2v3([x0, x0 + 100.0, x0], [y0, y0, y0 + 100.0]))
    except Exception as err:  # a WCS that cannot say is refused elsewhere or aligned as is
        log.debug("%s: WCS not compared with the SIAF: %s", detector, err)
        return ""
    scale = np.hypot(v2[1:] - v2[0], v3[1:] - v3[0]) / 100.0
    if not (np.isfinite(scale).all() and np.all((scale > _WFI_SCALE[0]) & (scale < _WFI_SCALE[1]))):
        log.debug("%s: WCS not compared with the SIAF: not a WFI distortion's v2v3", detector)
        return ""

    def distance(name: str) -> float:
        return float(
            np.hypot(v2[0] - siaf[name]["V2Ref_arcsec"], v3[0] - siaf[name]["V3Ref_arcsec"])
        )

    off = distance(detector)
    if off <= SIAF_TOLERANCE:
        return ""
    nearest = min(siaf, key=distance)
    near = distance(nearest)
    whose = (
        f"; that is {nearest}'s reference point ({near:.1f} arcsec away): the WCS is {nearest}'s"
        if near <= SIAF_TOLERANCE
        else ""
    )
    return (
        f"its WCS is not of detector {detector} (named by meta.instrument.detector"
        f"{f' and meta.wcsinfo.aperture_name {aperture}' if aperture else ''}): it puts the "
        f"reference pixel ({x0:g}, {y0:g}) at v2v3 ({v2[0]:.1f}, {v3[0]:.1f}) arcsec, "
        f"{off:.0f} arcsec from {detector}'s reference point in the SIAF "
        f"({ref['V2Ref_arcsec']:.1f}, {ref['V3Ref_arcsec']:.1f}), more than "
        f"{SIAF_TOLERANCE:g} arcsec{whose}"
    )


def implausible_epoch(meta: Any) -> str:
    """Why ``meta.exposure.start_time`` cannot be an observation's ('' when it can, or is unset)."""
    epoch = exposure_epoch(meta)
    if epoch is None or EPOCH_RANGE[0] <= epoch <= EPOCH_RANGE[1]:
        return ""
    start = meta_get(meta_get(meta, "exposure"), "start_time")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", erfa.ErfaWarning)  # far-future UTC is "dubious"
        when = getattr(start, "isot", start)
    return (
        f"meta.exposure.start_time {when} (epoch {epoch:.2f}) is outside the epochs of Roman "
        f"observations accepted, {EPOCH_RANGE[0]:g} to {EPOCH_RANGE[1]:g}: the reference "
        f"catalog would be carried {abs(epoch - 2016.0):.0f} years from Gaia's 2016.0"
    )
