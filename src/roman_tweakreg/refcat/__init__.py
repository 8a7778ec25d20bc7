"""The absolute reference catalog: one entry function, :func:`get_reference_catalog`.

``abs_refcat`` names a catalog served by the STScI catalog web service
(``GAIADR3``...), romancal's ``GAIADR3_S3`` (Gaia DR3 as a HATS catalog on AWS S3,
read anonymously from there), a local file (ECSV, FITS, Parquet, CSV) with RA/DEC
columns (any case) or a ``sky_centroid`` column, a HATS catalog folder, the URL of
a catalog file, or the ``s3://`` or ``http(s)://`` URL of a HATS catalog folder; or a
comma-separated list of these, tried in order.  Service answers, downloads and
remote HATS cones are cached on disk.  See ``docs/refcat.rst``.
"""

from __future__ import annotations

from ._cache import CACHE_ENV, ConeCache, default_cache_dir
from ._local import read_hats_catalog, read_local_catalog
from ._remote import ENDPOINT_ENVS, S3_CATALOGS, read_remote_hats
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
    "ENDPOINT_ENVS",
    "ROMANCAL_CATALOGS",
    "S3_CATALOGS",
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
    "read_remote_hats",
    "service_name",
    "split_refcat",
]
