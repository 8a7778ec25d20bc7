"""romancal's ExposurePipeline with this package's TweakRegStep in place of its own.

Needs romancal (1.1.0).  Run it as romancal's pipeline, e.g. ``strun roman_tweakreg_elp
<uncal file>`` or ``strun roman_tweakreg.pipeline.ExposurePipeline ...``, with the
step's parameters as ``--steps.tweakreg.<name>=<value>``.  Everything else is romancal's
pipeline unchanged: it calls the step's ``run`` on its ModelLibrary and, for aligned
images, the step's ``_update_catalog_coordinates`` (see
:class:`roman_tweakreg.TweakRegStep`).

Without romancal, :class:`ExposurePipeline` stands in so that ``strun
roman_tweakreg_elp`` can say what is missing: making it logs one line and raises
:class:`~roman_tweakreg.errors.RomancalMissingError` (``strun`` exits with status 1,
without a traceback).
"""

from __future__ import annotations

import logging
from typing import ClassVar

from .errors import RomancalMissingError
from .step import TweakRegStep

__all__ = ["MISSING_ROMANCAL", "ExposurePipeline"]

log = logging.getLogger(__name__)

#: What ``roman_tweakreg_elp`` says without romancal.
MISSING_ROMANCAL = (
    "roman_tweakreg_elp is romancal's ExposurePipeline with this package's step in it, and "
    "romancal is not installed: pip install 'romancal==1.1.0' (or run the step alone: "
    "strun roman_tweakreg <association or files>)"
)

try:
    from romancal.pipeline import ExposurePipeline as _RomancalExposurePipeline
except ImportError:  # the stand-in below says so when it is made
    _RomancalExposurePipeline = None

if _RomancalExposurePipeline is not None:

    class ExposurePipeline(_RomancalExposurePipeline):
        """romancal's ExposurePipeline, whose ``tweakreg`` is this package's TweakRegStep."""

        class_alias = "roman_tweakreg_elp"

        step_defs: ClassVar = {**_RomancalExposurePipeline.step_defs, "tweakreg": TweakRegStep}

else:
    from stpipe import Pipeline, config_parser

    class ExposurePipeline(Pipeline):  # type: ignore[no-redef]
        """Stands in for the pipeline without romancal: making it raises RomancalMissingError."""

        class_alias = "roman_tweakreg_elp"
        step_defs: ClassVar = {}
        spec = """
        output_ext = string(default='.asdf')  # Output file type
        """

        @classmethod
        def get_config_from_reference(cls, dataset, disable=None, crds_observatory=None):
            """No parameters (nothing is read): the pipeline cannot run without romancal."""
            return config_parser.ConfigObj()

        def __init__(self, *args, **kwargs):
            log.error("%s", MISSING_ROMANCAL)
            raise RomancalMissingError(MISSING_ROMANCAL)
