"""The exceptions of roman_tweakreg: one family, each also its natural built-in.

A fit that fails raises none of them: the image keeps its input WCS and its
``wcs_fit_results`` (status ``FAILED`` and the reason) say why.
"""

from __future__ import annotations

from stpipe.exceptions import StpipeExitException

__all__ = [
    "CatalogError",
    "InvalidInputError",
    "InvalidParameterError",
    "MissingCatalogError",
    "MissingInputError",
    "OutputError",
    "PSFModelError",
    "ReferenceCatalogError",
    "RomancalMissingError",
    "StepParameterError",
    "TweakRegError",
]


class TweakRegError(Exception):
    """Base class of every error raised by roman_tweakreg."""


class InvalidParameterError(TweakRegError, ValueError):
    """A step parameter has a value outside what it accepts."""


class StepParameterError(InvalidParameterError, StpipeExitException):
    """An :class:`InvalidParameterError` of the step's parameters, raised by the step.

    It is also stpipe's public ``StpipeExitException`` (exit status 1), which
    ``strun`` turns into its exit status without a traceback: the step has logged
    the message as one ERROR line before raising it.
    """

    def __init__(self, message: str):
        Exception.__init__(self, message)

    @property
    def exit_status(self) -> int:
        """The exit status of ``strun``: 1."""
        return 1


class RomancalMissingError(TweakRegError, ImportError, StpipeExitException):
    """romancal is needed (``strun roman_tweakreg_elp``) and is not installed.

    Also stpipe's ``StpipeExitException`` (exit status 1): ``strun`` shows the one
    logged line and no traceback.
    """

    def __init__(self, message: str):
        Exception.__init__(self, message)

    @property
    def exit_status(self) -> int:
        """The exit status of ``strun``: 1."""
        return 1


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
