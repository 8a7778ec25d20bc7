"""Deprecated: the simulator moved to :mod:`roman_tweakreg.testing.simulate`.

``import roman_tweakreg.simulate`` still works and gives the same functions, with
a :class:`DeprecationWarning`; it will be removed in a later release.
"""

from __future__ import annotations

import warnings

from .testing import simulate as _simulate
from .testing.simulate import *  # noqa: F403 - the re-export is this module's job
from .testing.simulate import __all__, propagate  # noqa: F401 - propagate was public here

warnings.warn(
    "roman_tweakreg.simulate moved to roman_tweakreg.testing.simulate; "
    "import it from there (this alias will be removed)",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str):
    return getattr(_simulate, name)
