"""Realistic synthetic WFI data for tests, examples and benchmarks.

:mod:`roman_tweakreg.testing.scenes` renders one detector's pixels (``data``,
``dq``, ``err``) with a known truth: an undersampled pixel-integrated PSF,
sky, Poisson and read noise, saturated stars, cosmic rays, hot and unusable
pixels and crowded pairs; and measures detections against that truth.

:mod:`roman_tweakreg.testing.simulate` simulates whole WFI exposures as L2
models (18 detectors placed by the Roman SIAF, a true and an assumed
attitude, source catalogs) and writes them as files with an association.
"""

from .scenes import (
    FILTER_WAVELENGTHS,
    FLAGGED,
    PSF,
    Scene,
    make_scene,
    match,
    position_crb,
    wfi_psf,
)

__all__ = [
    "FILTER_WAVELENGTHS",
    "FLAGGED",
    "PSF",
    "Scene",
    "make_scene",
    "match",
    "position_crb",
    "wfi_psf",
]
