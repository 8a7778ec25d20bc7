"""The one place the package uses roman_datamodels' private node classes.

roman_datamodels 1.x has no public way to build a ``meta.cal_step`` node for an
L2 model (``ImageModel.create_fake_data`` leaves it out, and ``stnode`` is not
public), so the simulator builds it here.  When roman_datamodels makes
``L2CalStep`` public, only this module changes.
"""

from __future__ import annotations

__all__ = ["l2_cal_step"]


def l2_cal_step(**statuses: str):
    """An L2 ``meta.cal_step`` node: every step COMPLETE, then ``statuses`` applied.

    Parameters
    ----------
    **statuses : str
        Step name -> status (``"COMPLETE"``, ``"INCOMPLETE"``, ``"SKIPPED"``);
        steps not in the schema's fake data are added.

    Returns
    -------
    roman_datamodels L2CalStep
        The node, to assign to ``model.meta.cal_step``.
    """
    from roman_datamodels._stnode import L2CalStep

    cal_step = L2CalStep.create_fake_data()
    for step in cal_step:
        cal_step[step] = "COMPLETE"
    for step, status in statuses.items():
        cal_step[step] = status
    return cal_step
