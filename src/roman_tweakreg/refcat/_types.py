"""The reference catalog value and the entry function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

from ..errors import ReferenceCatalogError

__all__ = ["DEFAULT_REFCAT", "ReferenceCatalog", "get_reference_catalog"]

DEFAULT_REFCAT = "GAIADR3"


@dataclass
class ReferenceCatalog:
    """A reference catalog and how to place its stars at an epoch.

    Attributes
    ----------
    table : Table
        ``RA``, ``DEC`` (deg) at ``epoch``; optionally ``pmra``, ``pmdec``
        (mas/yr) and ``parallax`` (mas).
    name : str
        Name recorded in the WCS name and ``wcs_fit_results``.
    epoch : float or None
        Epoch (decimal year) of the positions; None when unknown.
    """

    table: Table
    name: str
    epoch: float | None = None

    def __len__(self) -> int:
        return len(self.table)

    def positions(self, epoch: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(ra, dec)`` in degrees at ``epoch`` (as stored when it cannot be carried)."""
        return np.asarray(self.table["RA"], float), np.asarray(self.table["DEC"], float)


def get_reference_catalog(
    refcat: str | None,
    ra: float,
    dec: float,
    radius: float,
    epoch: float | None = None,
) -> ReferenceCatalog:
    """Get the reference catalog named ``refcat`` over a cone.

    Parameters
    ----------
    refcat : str or None
        A catalog name served by the catalog web service (``GAIADR3``; None
        or ``''`` mean ``GAIADR3``) or a local catalog file.
    ra, dec, radius : float
        Cone centre and radius, degrees.
    epoch : float or None
        Epoch (decimal year) of the observations.

    Returns
    -------
    ReferenceCatalog

    Raises
    ------
    ReferenceCatalogError
        The catalog cannot be had; the message says which and why.
    """
    from ._local import read_local_catalog

    name = (refcat or DEFAULT_REFCAT).strip()
    path = Path(name).expanduser()
    if path.exists():
        return read_local_catalog(path, ra, dec, radius)
    if any(ch in name for ch in "/\\") or path.suffix:
        raise ReferenceCatalogError(f"abs_refcat: local reference catalog {path} does not exist")
    raise ReferenceCatalogError(
        f"abs_refcat={name!r}: the catalog web service client is not available in this version; "
        "give a local catalog file"
    )
