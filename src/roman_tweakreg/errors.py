"""The exceptions of roman_tweakreg: one family, each also its natural built-in.

A fit that fails raises none of them: the image keeps its input WCS and its
``wcs_fit_results`` (status ``FAILED`` and the reason) say why.
"""

from __future__ import annotations

__all__ = [
    "CatalogError",
    "InvalidInputError",
    "InvalidParameterError",
    "MissingCatalogError",
    "MissingInputError",
    "OutputError",
    "PSFModelError",
    "ReferenceCatalogError",
    "TweakRegError",
]


class TweakRegError(Exception):
    """Base class of every error raised by roman_tweakreg."""


class InvalidParameterError(TweakRegError, ValueError):
    """A step parameter has a value outside what it accepts."""


class InvalidInputError(TweakRegError, ValueError):
    """An input file (model, association) is broken, hostile or not what the step reads."""


class OutputError(TweakRegError, OSError):
    """An output (model, catalog, report) cannot be written where it must go."""


class CatalogError(TweakRegError, ValueError):
    """A source catalog cannot be read or lacks what alignment needs."""


class MissingCatalogError(CatalogError, FileNotFoundError):
    """An image has no catalog, or its catalog file does not exist."""


class MissingInputError(TweakRegError, FileNotFoundError):
    """An input file (model, association or association member) does not exist."""


class ReferenceCatalogError(TweakRegError, RuntimeError):
    """The absolute reference catalog cannot be had or is unusable."""


class PSFModelError(TweakRegError, ValueError):
    """A PSF model (``psf_model``, ``override_epsf``) cannot be read or is not the image's."""
