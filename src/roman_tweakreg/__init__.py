"""roman_tweakreg: astrometric alignment of Roman WFI images (an stpipe TweakRegStep)."""

from __future__ import annotations

try:
    from ._version import version as __version__
except ImportError:  # pragma: no cover - running from a source tree without build
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("roman-tweakreg")
    except PackageNotFoundError:
        __version__ = "0.0.0"

from ._parallel import ExecutorUse, per_image_executor
from .errors import (
    CatalogError,
    InvalidInputError,
    InvalidParameterError,
    MissingCatalogError,
    MissingInputError,
    OutputError,
    PSFModelError,
    ReferenceCatalogError,
    StepParameterError,
    TweakRegError,
)
from .library import ModelLibrary
from .report import fit_results_table
from .step import TweakRegStep

__all__ = [
    "CatalogError",
    "ExecutorUse",
    "InvalidInputError",
    "InvalidParameterError",
    "MissingCatalogError",
    "MissingInputError",
    "ModelLibrary",
    "OutputError",
    "PSFModelError",
    "ReferenceCatalogError",
    "StepParameterError",
    "TweakRegError",
    "TweakRegStep",
    "__version__",
    "fit_results_table",
    "per_image_executor",
]
