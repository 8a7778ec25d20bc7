"""The absolute reference catalog: one entry function, :func:`get_reference_catalog`.

``abs_refcat`` names either a catalog served by the STScI catalog web service
(``GAIADR3``...) or a local file (ECSV, FITS, Parquet, CSV) with RA/DEC columns
(any case) or a ``sky_centroid`` column.
"""

from __future__ import annotations

from ._local import read_local_catalog
from ._types import DEFAULT_REFCAT, ReferenceCatalog, get_reference_catalog

__all__ = ["DEFAULT_REFCAT", "ReferenceCatalog", "get_reference_catalog", "read_local_catalog"]
