"""stpipe entry point: the steps this package provides, as class paths (imports nothing heavy)."""

__all__ = ["get_steps"]


def get_steps():
    """Return ``(class path, alias, is_pipeline)`` for each step, for stpipe's registry.

    The step's alias is ``roman_tweakreg``, not romancal's ``tweakreg``: with both
    packages installed, ``strun tweakreg`` keeps running romancal's step.
    ``roman_tweakreg_elp`` is romancal's ExposurePipeline with this package's step in
    its place; it is registered also without romancal, so that ``strun
    roman_tweakreg_elp`` says that it needs romancal (the ImportError of
    :mod:`roman_tweakreg.pipeline`) instead of stpipe's "not a path to a config file".
    """
    return [
        ("roman_tweakreg.step.TweakRegStep", "roman_tweakreg", False),
        ("roman_tweakreg.pipeline.ExposurePipeline", "roman_tweakreg_elp", True),
    ]
