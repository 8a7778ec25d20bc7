"""Local reference catalogs: ECSV, FITS, Parquet and CSV files, and HATS directories.

Sky columns are ``RA``/``DEC`` in any case, or a ``sky_centroid`` SkyCoord
column; ``pmra``, ``pmdec``, ``parallax``, ``ref_epoch`` (or ``epoch``),
``mag`` (or ``phot_g_mean_mag``), ``objID`` (or ``source_id``) and Gaia's errors
(``ra_error``, ``pmra_error``, ``ra_pmra_corr``...) are kept when
present.  A HATS catalog is a folder of HEALPix-partitioned Parquet files laid
out ``Norder=K/Dir=D/Npix=N.parquet`` (optionally under ``dataset/``); only the
partitions that overlap the cone are read.  The HATS reader works over any pyarrow
file system: local folders here, S3 and HTTP(S) in :mod:`._remote`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord, angular_separation
from astropy.table import Table

from .._io import TABLE_FORMATS, check_regular_file, read_parquet, sniff_table, table_format
from ..errors import ReferenceCatalogError
from ._motion import ERROR_COLUMNS
from ._types import ReferenceCatalog, standard_table

__all__ = [
    "FILE_SUFFIXES",
    "covering_partitions",
    "hats_location",
    "hats_partitions",
    "read_hats_catalog",
    "read_local_catalog",
    "standard_columns",
]

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
        try:
            return read_hats_catalog(path, ra, dec, radius, name=name)
        except OSError as err:  # e.g. a folder of the catalog that cannot be listed
            raise ReferenceCatalogError(
                f"abs_refcat: cannot read HATS catalog {path}: {err}"
            ) from err
    fmt = table_format(path)
    try:
        check_regular_file(path, "abs_refcat: the local reference catalog", ReferenceCatalogError)
    except FileNotFoundError as err:
        raise ReferenceCatalogError(
            f"abs_refcat: local reference catalog {path} does not exist"
        ) from err
    try:
        reason = sniff_table(path, fmt)
        if reason is not None:
            raise ReferenceCatalogError(f"abs_refcat: cannot read {path}: {reason}")
        if fmt == "parquet":
            table = read_parquet(path)
        else:
            table = Table.read(path, format=fmt)
    except ReferenceCatalogError:
        raise
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
def hats_location(root: str | Path, filesystem=None) -> tuple[object, str]:
    """Return ``(filesystem, base path)`` of a HATS catalog for pyarrow.

    ``filesystem`` is a :class:`pyarrow.fs.FileSystem` and ``root`` a path in it;
    without one, ``root`` is a local folder (read through pyarrow's ``LocalFileSystem``).
    """
    if filesystem is not None:
        return filesystem, str(root).rstrip("/")
    from pyarrow import fs

    return fs.LocalFileSystem(), Path(root).absolute().as_posix()


def _file_type(filesystem, path: str):
    return filesystem.get_file_info(path).type


def hats_partitions(
    root: str | Path, filesystem=None, where: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Return the partitions' folder and every partition's ``(order, pixel)`` of a HATS catalog.

    The catalog's partition index is read when there is one: ``partition_info.csv``
    (columns ``Norder``, ``Npix``) or the row groups' file paths in
    ``dataset/_metadata``; otherwise the ``Norder=K/Dir=D/Npix=N`` tree is listed.

    Parameters
    ----------
    root : str or Path
        The catalog folder (a path in ``filesystem``).
    filesystem : pyarrow.fs.FileSystem, optional
        Where the catalog is; default the local file system.
    where : str, optional
        How to name the catalog in messages; default ``root``.
    """
    from pyarrow import fs

    filesystem, root_path = hats_location(root, filesystem)
    where = str(root) if where is None else where
    dataset = _file_type(filesystem, f"{root_path}/dataset") == fs.FileType.Directory
    base = f"{root_path}/dataset" if dataset else root_path
    index = _partition_index(filesystem, root_path, base, where, dataset)
    if index is not None:
        return base, index
    parts = set()
    try:
        infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True))
    except FileNotFoundError:
        infos = []
    for info in infos:
        m = _HATS_FILE.search(info.path[len(base) :].lstrip("/"))
        if m and (info.type == fs.FileType.Directory or m.group(3)):
            parts.add((int(m.group(1)), int(m.group(2))))
    return base, sorted(parts)


def _partition_path(filesystem, base: str, order: int, pixel: int) -> str:
    """The partition's file ``Npix=N.parquet``, else its folder ``Npix=N/`` if that exists."""
    from pyarrow import fs

    folder = f"{base}/Norder={order}/Dir={pixel // 10000 * 10000}"
    path = f"{folder}/Npix={pixel}.parquet"
    if _file_type(filesystem, path) == fs.FileType.NotFound and (
        _file_type(filesystem, f"{folder}/Npix={pixel}") == fs.FileType.Directory
    ):
        return f"{folder}/Npix={pixel}"
    return path


def _partition_index(
    filesystem, root: str, base: str, where: str, dataset: bool
) -> list[tuple[int, int]] | None:
    """``(order, pixel)`` of every partition from the catalog's index, or None without one."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from pyarrow import fs

    names = ["partition_info.csv"] + (["dataset/partition_info.csv"] if dataset else [])
    for name in names:
        if _file_type(filesystem, f"{root}/{name}") != fs.FileType.File:
            continue
        try:
            with filesystem.open_input_file(f"{root}/{name}") as f:
                table = pacsv.read_csv(pa.BufferReader(f.read()))
            lower = {c.lower(): c for c in table.column_names}
            orders = np.asarray(table.column(lower["norder"]).to_numpy(), dtype=np.int64)
            pixels = np.asarray(table.column(lower["npix"]).to_numpy(), dtype=np.int64)
        except Exception as err:
            raise ReferenceCatalogError(
                f"abs_refcat: {where}/{name}: cannot read the HATS partition index (expected "
                f"Norder and Npix columns): {err}"
            ) from err
        return list(zip(orders.tolist(), pixels.tolist(), strict=True))
    meta_path = f"{base}/_metadata"
    if _file_type(filesystem, meta_path) == fs.FileType.File:
        shown = f"{where}/dataset/_metadata" if dataset else f"{where}/_metadata"
        try:
            with filesystem.open_input_file(meta_path) as f:
                meta = pq.read_metadata(f)
            found = set()
            for i in range(meta.num_row_groups):
                m = _HATS_FILE.search(meta.row_group(i).column(0).file_path)
                if m:
                    found.add((int(m.group(1)), int(m.group(2))))
        except Exception as err:
            raise ReferenceCatalogError(
                f"abs_refcat: {shown}: cannot read the HATS partition index: {err}"
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
    root: str | Path,
    ra: float,
    dec: float,
    radius: float,
    *,
    name: str | None = None,
    filesystem=None,
    where: str | None = None,
) -> ReferenceCatalog:
    """Read the sources within ``radius`` deg of ``(ra, dec)`` from a HATS catalog.

    Only the partitions whose HEALPix pixel (nested, ICRS) overlaps the cone
    are opened (each tested at its own order, see :func:`covering_partitions`),
    and only the reference catalog columns (any case) are read from them.

    Parameters
    ----------
    root : str or Path
        The catalog folder: a local path, or a path in ``filesystem``.
    ra, dec, radius : float
        Cone centre and radius (deg).
    name : str, optional
        Catalog name; default the folder name.
    filesystem : pyarrow.fs.FileSystem, optional
        Where the catalog is (e.g. a ``pyarrow.fs.S3FileSystem``); default local.
    where : str, optional
        How to name the catalog in messages and in the catalog's ``source``
        (e.g. its ``s3://`` URL); default ``root``.

    Raises
    ------
    ReferenceCatalogError
        When the folder has no ``Norder=K/Dir=D/Npix=N.parquet`` partitions or
        a partition cannot be read (naming the partition; the fault, e.g. pyarrow's
        ``OSError`` for a network fault, is its ``__cause__``).

    Notes
    -----
    Faults while finding the partitions (``OSError`` of ``filesystem``, e.g. no
    network or no such bucket) are raised as they are, for the caller to describe.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        import astropy_healpix  # noqa: F401
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ReferenceCatalogError(
            f"abs_refcat: reading the HATS catalog {root} needs astropy-healpix"
        ) from err
    filesystem, root_path = hats_location(root, filesystem)
    where = str(root) if where is None else where
    base, keys = hats_partitions(root_path, filesystem, where)
    if not keys:
        raise ReferenceCatalogError(
            f"abs_refcat: {where} is a folder but not a HATS catalog: "
            "no Norder=K/Dir=D/Npix=N.parquet partitions found"
        )
    wanted = covering_partitions(keys, ra, dec, radius)
    log.debug("HATS %s: reading %d of %d partitions", where, len(wanted), len(keys))
    cat_name = name or PurePosixPath(root_path).name
    if not wanted:
        return _in_cone({"RA": np.array([]), "DEC": np.array([])}, ra, dec, radius, cat_name, where)
    tables = []
    for order, pixel in wanted:
        path = _partition_path(filesystem, base, order, pixel)
        shown = where + path[len(root_path) :]
        try:
            schema = _partition_schema(filesystem, path)
            lower = {c.lower(): c for c in schema.names}
            cols = [lower[a] for aliases in _ALIASES.values() for a in aliases if a in lower]
            tables.append(pq.read_table(path, columns=cols, filesystem=filesystem))
        except Exception as err:
            raise ReferenceCatalogError(
                f"abs_refcat: cannot read HATS catalog {where}: partition {shown}: {err}"
            ) from err
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except Exception as err:
        raise ReferenceCatalogError(
            f"abs_refcat: cannot read HATS catalog {where}: partitions disagree: {err}"
        ) from err
    data = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    return _in_cone(standard_columns(data, where), ra, dec, radius, cat_name, where)


def _partition_schema(filesystem, path: str):
    """The Arrow schema of a partition file, or of the first file of a partition folder."""
    import pyarrow.parquet as pq
    from pyarrow import fs

    if _file_type(filesystem, path) == fs.FileType.Directory:
        files = sorted(
            i.path
            for i in filesystem.get_file_info(fs.FileSelector(path, recursive=True))
            if i.type == fs.FileType.File and i.path.endswith(".parquet")
        )
        if not files:
            raise FileNotFoundError(f"no .parquet file in the partition folder {path}")
        path = files[0]
    with filesystem.open_input_file(path) as f:
        return pq.read_schema(f)

