"""Local reference catalog files: ECSV, FITS, Parquet, CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord, angular_separation
from astropy.table import Table

from ..errors import ReferenceCatalogError
from ._types import ReferenceCatalog

__all__ = ["read_local_catalog"]

_FORMATS = {".ecsv": "ascii.ecsv", ".csv": "ascii.csv", ".fits": "fits", ".fit": "fits"}


def read_local_catalog(path: str | Path, ra: float, dec: float, radius: float) -> ReferenceCatalog:
    """Read a local catalog file and keep the sources within ``radius`` deg of ``(ra, dec)``.

    Raises
    ------
    ReferenceCatalogError
        Naming the file, when it cannot be read or has no usable sky columns.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = Table(pq.read_table(path).to_pydict())
        else:
            table = Table.read(path, format=_FORMATS.get(path.suffix.lower()))
    except Exception as err:
        raise ReferenceCatalogError(f"abs_refcat: cannot read {path}: {err}") from err
    out = _sky_columns(table, path)
    keep = angular_separation(
        *np.deg2rad([np.asarray(out["RA"]), np.asarray(out["DEC"])]), np.deg2rad(ra), np.deg2rad(dec)
    ) <= np.deg2rad(radius)
    keep &= np.isfinite(out["RA"]) & np.isfinite(out["DEC"])
    return ReferenceCatalog(out[keep], name=path.name)


def _sky_columns(table: Table, path: Path) -> Table:
    lower = {c.lower(): c for c in table.colnames}
    if "ra" in lower and "dec" in lower:
        ra_col, dec_col = table[lower["ra"]], table[lower["dec"]]
        ra = ra_col.to_value(u.deg) if getattr(ra_col, "unit", None) else np.asarray(ra_col, float)
        dec = dec_col.to_value(u.deg) if getattr(dec_col, "unit", None) else np.asarray(dec_col, float)
    elif "sky_centroid" in lower:
        sc = table[lower["sky_centroid"]]
        if not isinstance(sc, SkyCoord):
            raise ReferenceCatalogError(f"abs_refcat: {path}: sky_centroid is not a SkyCoord column")
        ra, dec = sc.icrs.ra.deg, sc.icrs.dec.deg
    else:
        raise ReferenceCatalogError(
            f"abs_refcat: {path} has no RA/DEC (any case) or sky_centroid column; "
            f"found {table.colnames}"
        )
    out = Table({"RA": np.asarray(ra, float), "DEC": np.asarray(dec, float)})
    for col in ("pmra", "pmdec", "parallax", "ref_epoch", "epoch", "mag"):
        if col in lower:
            out[col] = np.asarray(table[lower[col]], float)
    return out
