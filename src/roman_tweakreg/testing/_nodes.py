"""The ``meta.cal_step`` of a simulated L2 model, from roman_datamodels' public API.

roman_datamodels 1.x has no public way to build a tagged ``meta.cal_step`` node
(``ImageModel.create_fake_data`` leaves it out, and its node classes are private), so
the simulator gives it as a mapping holding every step the L2 schema lists (read with
the public ``DataModel.get_schema``): roman_datamodels stores it in the model, it
validates against the schema, and it is written and read back like the tagged node.
"""

from __future__ import annotations

import functools

__all__ = ["l2_cal_step"]


@functools.cache
def _l2_steps() -> tuple[str, ...]:
    """The steps of an L2 model's ``meta.cal_step``, in schema order."""
    from roman_datamodels import datamodels as rdm

    found: list[str] = []

    def walk(schema):
        if isinstance(schema, dict):
            if "cal_step" in schema.get("properties", {}):
                node = schema["properties"]["cal_step"]
                found.extend(k for k in _properties(node) if k not in found)
            for value in schema.values():
                walk(value)
        elif isinstance(schema, list):
            for value in schema:
                walk(value)

    walk(rdm.ImageModel().get_schema()["properties"]["meta"])
    return tuple(found)


def _properties(schema) -> list[str]:
    """The property names of ``schema`` and of its ``allOf`` parts."""
    names = list(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        names += _properties(part)
    return names


def l2_cal_step(**statuses: str) -> dict:
    """An L2 ``meta.cal_step``: every step of the schema COMPLETE, then ``statuses`` applied.

    Parameters
    ----------
    **statuses : str
        Step name -> status (``"COMPLETE"``, ``"INCOMPLETE"``, ``"SKIPPED"``);
        steps not in the schema are added.

    Returns
    -------
    dict
        To assign to ``model.meta.cal_step``.
    """
    cal_step = dict.fromkeys(_l2_steps(), "COMPLETE")
    cal_step.update(statuses)
    return cal_step
