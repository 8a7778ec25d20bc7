"""stpipe entry point: the steps this package provides, as class paths (imports nothing heavy)."""

import importlib.util

__all__ = ["get_steps"]


def get_steps():
    """Return ``(class path, alias, is_pipeline)`` for each step, for stpipe's registry.

    The step's alias is ``roman_tweakreg``, not romancal's ``tweakreg``: with both
    packages installed, ``strun tweakreg`` keeps running romancal's step.  With
    romancal installed, ``roman_tweakreg_elp`` is romancal's ExposurePipeline with
    this package's step in its place.
    """
    steps = [("roman_tweakreg.step.TweakRegStep", "roman_tweakreg", False)]
    if importlib.util.find_spec("romancal") is not None:
        steps.append(("roman_tweakreg.pipeline.ExposurePipeline", "roman_tweakreg_elp", True))
    return steps
