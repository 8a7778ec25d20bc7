"""The absolute reference catalog: one entry function, :func:`get_reference_catalog`.

``abs_refcat`` names a catalog served by the STScI catalog web service
(``GAIADR3``...), a local file (ECSV, FITS, Parquet, CSV) with RA/DEC columns
(any case) or a ``sky_centroid`` column, a HATS catalog folder, or the URL of
a catalog file; or a comma-separated list of these, tried in order.  Service
answers and downloads are cached on disk.  See ``docs/refcat.rst``.
"""

from __future__ import annotations

from ._cache import CACHE_ENV, ConeCache, default_cache_dir
from ._local import read_hats_catalog, read_local_catalog
from ._resolve import (
    ROMANCAL_CATALOGS,
    SERVICE_CATALOGS,
    check_refcat,
    get_reference_catalog,
    service_name,
    split_refcat,
)
from ._service import DEFAULT_SERVICE_URL, SERVICE_ENV, NoDataError, query_service
from ._types import DEFAULT_REFCAT, ReferenceCatalog

__all__ = [
    "CACHE_ENV",
    "DEFAULT_REFCAT",
    "DEFAULT_SERVICE_URL",
    "ROMANCAL_CATALOGS",
    "SERVICE_CATALOGS",
    "SERVICE_ENV",
    "ConeCache",
    "NoDataError",
    "ReferenceCatalog",
    "check_refcat",
    "default_cache_dir",
    "get_reference_catalog",
    "query_service",
    "read_hats_catalog",
    "read_local_catalog",
    "service_name",
    "split_refcat",
]
