"""stpipe entry point: the steps this package provides, as class paths (imports nothing heavy)."""

__all__ = ["get_steps"]


def get_steps():
    """Return ``(class path, alias, is_pipeline)`` for each step, for stpipe's registry.

    The alias is ``roman_tweakreg``, not romancal's ``tweakreg``: with both packages
    installed, ``strun tweakreg`` keeps running romancal's step.
    """
    return [("roman_tweakreg.step.TweakRegStep", "roman_tweakreg", False)]
