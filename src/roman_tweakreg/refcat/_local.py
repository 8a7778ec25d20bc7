"""Local reference catalogs: ECSV, FITS, Parquet and CSV files, and HATS directories.

Sky columns are ``RA``/``DEC`` in any case, or a ``sky_centroid`` SkyCoord
column; ``pmra``, ``pmdec``, ``parallax``, ``ref_epoch`` (or ``epoch``),
``mag`` (or ``phot_g_mean_mag``), ``objID`` (or ``source_id``) and Gaia's errors
(``ra_error``, ``pmra_error``, ``ra_pmra_corr``...) are kept when
present.  A HATS catalog is a folder of HEALPix-partitioned Parquet files laid
out ``Norder=K/Dir=D/Npix=N.parquet`` (optionally under ``dataset/``); only the
partitions that overlap the cone are read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord, angular_separation
from astropy.table import Table

from .._io import TABLE_FORMATS, read_parquet, table_format
from ..errors import ReferenceCatalogError
from ._motion import ERROR_COLUMNS
from ._types import ReferenceCatalog, standard_table

__all__ = ["FILE_SUFFIXES", "read_hats_catalog", "read_local_catalog", "standard_columns"]

log = logging.getLogger(__name__)

#: File name endings read as local catalogs (anything else is given to astropy to guess).
FILE_SUFFIXES = tuple(TABLE_FORMATS)

# standard name -> accepted column names (lower case), first found wins
_ALIASES = {
    "RA": ("ra", "sky_centroid.ra"),
    "DEC": ("dec", "sky_centroid.dec"),
    "pmra": ("pmra",),
    "pmdec": ("pmdec",),
    "parallax": ("parallax", "plx"),
    "ref_epoch": ("ref_epoch", "epoch"),
    "mag": ("mag", "phot_g_mean_mag"),
    "objID": ("objid", "source_id"),
    **{name: (name,) for name in ERROR_COLUMNS},  # Gaia's names
}
_UNITS = {"RA": u.deg, "DEC": u.deg, "pmra": u.mas / u.yr, "pmdec": u.mas / u.yr, "parallax": u.mas,
          "ra_error": u.mas, "dec_error": u.mas, "pmra_error": u.mas / u.yr,
          "pmdec_error": u.mas / u.yr}  # fmt: skip
_HATS_FILE = re.compile(r"Norder=(\d+)/Dir=\d+/Npix=(\d+)(\.parquet)?$")


def read_local_catalog(
    path: str | Path, ra: float, dec: float, radius: float, *, name: str | None = None
) -> ReferenceCatalog:
    """Read a local catalog file or HATS folder, keeping the sources in a cone.

    Parameters
    ----------
    path : str or Path
        ECSV, FITS, Parquet or CSV file, or a HATS catalog folder.
    ra, dec, radius : float
        Cone centre and radius (deg).
    name : str, optional
        Catalog name; default the file or folder name.

    Raises
    ------
    ReferenceCatalogError
        Naming the file, when it cannot be read or has no usable sky columns.
    """
    path = Path(path)
    if path.is_dir():
        return read_hats_catalog(path, ra, dec, radius, name=name)
    fmt = table_format(path)
    try:
        if fmt == "parquet":
            table = read_parquet(path)
        else:
            table = Table.read(path, format=fmt)
    except Exception as err:
        raise ReferenceCatalogError(f"abs_refcat: cannot read {path}: {err}") from err
    columns = standard_columns(table, str(path))
    return _in_cone(columns, ra, dec, radius, name or path.name, str(path), table.meta)


def standard_columns(table: Table | Mapping, where: str) -> dict[str, np.ndarray]:
    """Pick the reference catalog columns of ``table`` (any case) as floats in standard units.

    Raises
    ------
    ReferenceCatalogError
        When there is no RA/DEC or sky_centroid column, or a column cannot be converted.
    """
    names = list(table.colnames if isinstance(table, Table) else table.keys())
    lower = {c.lower(): c for c in names}
    out: dict[str, np.ndarray] = {}
    if not {"ra", "dec"} <= set(lower) and "sky_centroid" in lower:
        sc = table[lower["sky_centroid"]]
        if not isinstance(sc, SkyCoord):
            raise ReferenceCatalogError(
                f"abs_refcat: {where}: column sky_centroid is a {type(sc).__name__}, "
                "expected a SkyCoord"
            )
        out["RA"], out["DEC"] = sc.icrs.ra.deg, sc.icrs.dec.deg
    for std, aliases in _ALIASES.items():
        col = next((lower[a] for a in aliases if a in lower), None)
        if col is None or std in out:
            continue
        if std == "objID":
            out[std] = np.ma.asarray(table[col]).filled(0)
            continue
        out[std] = _as_float(table[col], _UNITS.get(std), where, col)
    if "RA" not in out or "DEC" not in out:
        raise ReferenceCatalogError(
            f"abs_refcat: {where} has no RA/DEC (any case) or sky_centroid column; found {names}"
        )
    return out


def _as_float(col, unit, where: str, name: str) -> np.ndarray:
    try:
        values = np.ma.asarray(col, dtype=float).filled(np.nan)
        col_unit = getattr(col, "unit", None)
        if unit is not None and col_unit is not None:
            values = (values * u.Unit(col_unit)).to_value(unit)
    except (TypeError, ValueError, u.UnitsError) as err:
        raise ReferenceCatalogError(
            f"abs_refcat: {where}: column {name} is not numeric"
            f"{f' in {unit}' if unit is not None else ''}: {err}"
        ) from err
    return np.asarray(values, float)


def _in_cone(
    columns: dict,
    ra: float,
    dec: float,
    radius: float,
    name: str,
    source: str,
    meta: Mapping | None = None,
) -> ReferenceCatalog:
    """Keep the rows within ``radius`` deg; the catalog epoch comes from the rows or the meta."""
    sep = angular_separation(*(np.deg2rad(x) for x in (columns["RA"], columns["DEC"], ra, dec)))
    keep = np.isfinite(sep) & (sep <= np.deg2rad(radius))
    table = standard_table({k: np.asarray(v)[keep] for k, v in columns.items()})
    epoch = None
    lower = {str(k).lower(): v for k, v in (meta or {}).items()}
    for key in ("ref_epoch", "epoch"):
        try:
            epoch = float(lower[key])
            break
        except (KeyError, TypeError, ValueError):
            continue
    if epoch is None and "ref_epoch" in table.colnames:
        known = np.asarray(table["ref_epoch"], float)
        known = known[np.isfinite(known)]
        epoch = float(np.median(known)) if known.size else None
    return ReferenceCatalog(table, name=name, epoch=epoch, source=source)


# -- HATS -------------------------------------------------------------------------------------
def hats_partitions(root: Path) -> dict[tuple[int, int], Path]:
    """Map ``(order, pixel)`` to the partition file (or folder) of a HATS catalog at ``root``.

    The catalog's partition index is read when there is one: ``partition_info.csv``
    (columns ``Norder``, ``Npix``) or the row groups' file paths in
    ``dataset/_metadata``; otherwise the ``Norder=K/Dir=D/Npix=N`` tree is listed.
    """
    base = root / "dataset" if (root / "dataset").is_dir() else root
    index = _partition_index(root, base)
    if index is not None:
        return {(k, n): _partition_path(base, k, n) for k, n in index}
    parts = {}
    for path in base.glob("Norder=*/Dir=*/Npix=*"):
        m = _HATS_FILE.search(path.relative_to(base).as_posix())
        if m and (path.is_dir() or m.group(3)):
            parts[int(m.group(1)), int(m.group(2))] = path
    return parts


def _partition_path(base: Path, order: int, pixel: int) -> Path:
    folder = base / f"Norder={order}" / f"Dir={pixel // 10000 * 10000}"
    path = folder / f"Npix={pixel}.parquet"
    if path.exists() or not (folder / f"Npix={pixel}").is_dir():
        return path
    return path.with_suffix("")


def _partition_index(root: Path, base: Path) -> list[tuple[int, int]] | None:
    """``(order, pixel)`` of every partition from the catalog's index, or None without one."""
    for csv_path in (root / "partition_info.csv", base / "partition_info.csv"):
        if csv_path.is_file():
            try:
                table = Table.read(csv_path, format="ascii.csv")
                lower = {c.lower(): c for c in table.colnames}
                orders = np.asarray(table[lower["norder"]], dtype=np.int64)
                pixels = np.asarray(table[lower["npix"]], dtype=np.int64)
            except Exception as err:
                raise ReferenceCatalogError(
                    f"abs_refcat: {csv_path}: cannot read the HATS partition index (expected "
                    f"Norder and Npix columns): {err}"
                ) from err
            return list(zip(orders.tolist(), pixels.tolist(), strict=True))
    meta_path = base / "_metadata"
    if meta_path.is_file():
        import pyarrow.parquet as pq

        try:
            meta = pq.read_metadata(meta_path)
            found = set()
            for i in range(meta.num_row_groups):
                m = _HATS_FILE.search(meta.row_group(i).column(0).file_path)
                if m:
                    found.add((int(m.group(1)), int(m.group(2))))
        except Exception as err:
            raise ReferenceCatalogError(
                f"abs_refcat: {meta_path}: cannot read the HATS partition index: {err}"
            ) from err
        return sorted(found) if found else None
    return None


def covering_partitions(
    keys: list[tuple[int, int]], ra: float, dec: float, radius: float
) -> list[tuple[int, int]]:
    """The ``(order, pixel)`` partitions (nested HEALPix) that may hold sources in the cone.

    Each partition is tested at its own order: it is kept when the cone reaches
    within the distance from the pixel's centre to its farthest corner (plus 1%,
    as pixel edges are not great circles), so the work grows with the number of
    partitions, not with the deepest order.
    """
    from astropy_healpix import HEALPix

    out = []
    by_order: dict[int, list[int]] = {}
    for order, pixel in keys:
        by_order.setdefault(order, []).append(pixel)
    for order, pixels in sorted(by_order.items()):
        hp = HEALPix(nside=2**order, order="nested")
        pix = np.asarray(pixels, dtype=np.int64)
        lon, lat = hp.healpix_to_lonlat(pix)
        c_lon, c_lat = lon.to_value(u.rad), lat.to_value(u.rad)
        b_lon, b_lat = hp.boundaries_lonlat(pix, step=2)
        corner = angular_separation(
            b_lon.to_value(u.rad), b_lat.to_value(u.rad), c_lon[:, None], c_lat[:, None]
        ).max(axis=1)
        sep = angular_separation(c_lon, c_lat, np.deg2rad(ra), np.deg2rad(dec))
        keep = sep <= np.deg2rad(radius) + corner * 1.01 + 1e-9
        out += [(order, int(p)) for p in pix[keep]]
    return out


def read_hats_catalog(
    root: str | Path, ra: float, dec: float, radius: float, *, name: str | None = None
) -> ReferenceCatalog:
    """Read the sources within ``radius`` deg of ``(ra, dec)`` from a HATS catalog folder.

    Only the partitions whose HEALPix pixel (nested, ICRS) overlaps the cone
    are opened (each tested at its own order, see :func:`covering_partitions`),
    and only the reference catalog columns are read from them.

    Raises
    ------
    ReferenceCatalogError
        When the folder has no ``Norder=K/Dir=D/Npix=N.parquet`` partitions or
        they cannot be read.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        import astropy_healpix  # noqa: F401
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ReferenceCatalogError(
            f"abs_refcat: reading the HATS catalog {root} needs astropy-healpix"
        ) from err
    root = Path(root)
    parts = hats_partitions(root)
    if not parts:
        raise ReferenceCatalogError(
            f"abs_refcat: {root} is a folder but not a HATS catalog: "
            "no Norder=K/Dir=D/Npix=N.parquet partitions found"
        )
    wanted = [parts[k] for k in covering_partitions(list(parts), ra, dec, radius)]
    log.debug("HATS %s: reading %d of %d partitions", root, len(wanted), len(parts))
    cat_name = name or root.name
    if not wanted:
        return _in_cone(
            {"RA": np.array([]), "DEC": np.array([])}, ra, dec, radius, cat_name, str(root)
        )
    try:
        first = wanted[0] if wanted[0].is_file() else next(wanted[0].rglob("*.parquet"))
        schema = pq.read_schema(first)
        lower = {c.lower(): c for c in schema.names}
        cols = [lower[a] for aliases in _ALIASES.values() for a in aliases if a in lower]
        table = pa.concat_tables(
            [pq.read_table(p, columns=cols) for p in wanted], promote_options="default"
        )
    except Exception as err:
        raise ReferenceCatalogError(f"abs_refcat: cannot read HATS catalog {root}: {err}") from err
    data = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    return _in_cone(standard_columns(data, str(root)), ra, dec, radius, cat_name, str(root))
