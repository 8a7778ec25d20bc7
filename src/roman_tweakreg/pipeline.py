"""romancal's ExposurePipeline with this package's TweakRegStep in place of its own.

Needs romancal (1.1.0); importing this module without it raises ImportError.
Run it as romancal's pipeline, e.g. ``strun roman_tweakreg_elp <uncal file>`` or
``strun roman_tweakreg.pipeline.ExposurePipeline ...``, with the step's parameters as
``--steps.tweakreg.<name>=<value>``.  Everything else is romancal's pipeline unchanged: it
calls the step's ``run`` on its ModelLibrary and, for aligned images, the step's
``_update_catalog_coordinates`` (see :class:`roman_tweakreg.TweakRegStep`).
"""

from __future__ import annotations

from typing import ClassVar

try:
    from romancal.pipeline import ExposurePipeline as _RomancalExposurePipeline
except ImportError as err:  # pragma: no cover - exercised only without romancal
    raise ImportError(
        "roman_tweakreg.pipeline needs romancal: pip install 'romancal==1.1.0'"
    ) from err

from .step import TweakRegStep

__all__ = ["ExposurePipeline"]


class ExposurePipeline(_RomancalExposurePipeline):
    """romancal's ExposurePipeline whose ``tweakreg`` is :class:`~roman_tweakreg.TweakRegStep`."""

    class_alias = "roman_tweakreg_elp"

    step_defs: ClassVar = {**_RomancalExposurePipeline.step_defs, "tweakreg": TweakRegStep}
