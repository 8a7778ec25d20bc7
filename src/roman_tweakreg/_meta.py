"""Reading Roman metadata the same way from models, stnode objects and raw ASDF trees."""

from __future__ import annotations

import warnings
from typing import Any

import erfa

__all__ = ["exposure_epoch", "meta_get"]


def meta_get(node: Any, key: str, default: Any = None) -> Any:
    """``node[key]`` for dicts, stnode objects and ASDF lazy nodes; ``default`` when absent."""
    if node is None:
        return default
    try:
        return node[key] if key in node else default
    except TypeError:
        return getattr(node, key, default)


def exposure_epoch(meta: Any) -> float | None:
    """Decimal year of ``meta.exposure.start_time``, or None when it is missing."""
    start = meta_get(meta_get(meta, "exposure"), "start_time")
    try:
        with warnings.catch_warnings():
            # ERFA calls far-future UTC dates "dubious" (unknown leap seconds): harmless here
            warnings.simplefilter("ignore", erfa.ErfaWarning)
            return float(start.decimalyear)
    except (AttributeError, TypeError, ValueError):
        return None
