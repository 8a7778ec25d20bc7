"""Reference catalogs for many associations: plan the sky first, fetch each region once.

A batch of associations (:mod:`roman_tweakreg.batch`) must not ask the catalog
service once per association for overlapping cones.  :func:`sky_cone` reads an
association's footprint cheaply (the YAML header of each member's ASDF file:
``meta.wcsinfo.s_region``, else the detector's reference point), :func:`plan_regions`
groups nearby associations into regions, and :func:`fetch_region` asks for each
region once and writes it as a local Parquet catalog that keeps positions at the
catalog's own epoch with their proper motions, so that every task still carries
them to each exposure's epoch.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.coordinates import angular_separation

from .._io import write_atomically, write_parquet
from ..errors import ReferenceCatalogError, TweakRegError
from ._resolve import classify, get_reference_catalog, split_refcat
from ._service import NoDataError

__all__ = [
    "DETECTOR_RADIUS",
    "Region",
    "SkyCone",
    "fetch_region",
    "is_service_name",
    "plan_regions",
    "sky_cone",
]

log = logging.getLogger(__name__)

#: Half diagonal of a WFI detector (deg): 4088 pixels of 0.11 arcsec, times sqrt(2)/2,
#: rounded up; the footprint of a member without ``s_region`` is this cone around its
#: reference point.
DETECTOR_RADIUS = 0.09
_POLYGON = re.compile(r"^\s*POLYGON\s+(?:ICRS\s+)?(.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class SkyCone:
    """A cone on the sky (deg) covering an association's images."""

    ra: float
    dec: float
    radius: float


@dataclass
class Region:
    """A sky region fetched once for the associations that fall in it.

    Attributes
    ----------
    name : str
        ``r0000``, ``r0001``... in planning order.
    ra, dec, radius : float
        The region's cone (deg), covering every member cone.
    members : list of int
        Indices (in the planner's input order) of the associations it serves.
    """

    name: str
    ra: float
    dec: float
    radius: float
    members: list[int] = field(default_factory=list)


def is_service_name(refcat: str | None) -> bool:
    """Whether ``abs_refcat`` names one catalog (of the web service or romancal's on S3),
    not a file, folder, URL or list (:func:`~roman_tweakreg.refcat._resolve.classify`)."""
    entries = split_refcat(refcat)
    return len(entries) == 1 and classify(entries[0]).named


def _member_points(path: Path) -> np.ndarray:
    """Footprint points (deg) of one member file from its YAML header; shape (n, 2)."""
    import asdf

    try:
        wcsinfo = asdf.util.load_yaml(path)["roman"]["meta"]["wcsinfo"]
    except FileNotFoundError as err:
        raise TweakRegError(f"{path}: association member file does not exist") from err
    except (KeyError, TypeError, ValueError) as err:
        raise TweakRegError(f"{path}: no roman.meta.wcsinfo in its ASDF header: {err}") from err
    match = _POLYGON.match(str(wcsinfo.get("s_region") or ""))
    if match:
        try:
            values = np.array(match.group(1).split(), float)
        except ValueError:
            values = np.array([])
        if values.size >= 6 and values.size % 2 == 0 and np.isfinite(values).all():
            return values.reshape(-1, 2)
    try:
        ra, dec = float(wcsinfo["ra_ref"]), float(wcsinfo["dec_ref"])
    except (KeyError, TypeError, ValueError) as err:
        raise TweakRegError(
            f"{path}: meta.wcsinfo has neither a POLYGON s_region nor ra_ref/dec_ref"
        ) from err
    # a square around the reference point whose corners lie DETECTOR_RADIUS away
    step = DETECTOR_RADIUS / math.sqrt(2)
    cosd = max(math.cos(math.radians(dec)), 1e-6)
    return np.array([[ra + sx * step / cosd, dec + sy * step] for sx in (-1, 1) for sy in (-1, 1)])


def sky_cone(association: str | Path, members: list[str]) -> SkyCone:
    """Return the cone covering the members of an association, read from their headers.

    Parameters
    ----------
    association : str or Path
        The association file (member paths are relative to its folder).
    members : list of str
        The members' ``expname`` values.

    Raises
    ------
    TweakRegError
        Naming the member file that is missing or has no usable ``meta.wcsinfo``.
    """
    from ..geometry import enclosing_cone

    folder = Path(association).parent
    points = np.vstack([_member_points(folder / name) for name in members])
    ra, dec, radius = enclosing_cone(points[:, 0], points[:, 1])
    return SkyCone(ra, dec, radius)


def plan_regions(cones: list[SkyCone | None], max_radius: float = 1.0) -> list[Region]:
    """Group cones into regions of at most ``max_radius`` deg (greedily, in input order).

    A cone joins the first region whose centre lies within ``max_radius - cone.radius``
    of its own centre; otherwise it starts a region centred on itself (a cone larger
    than ``max_radius`` is a region of its own).  None entries are left out.

    Returns
    -------
    list of Region
        Each with the indices of its cones and a radius covering them all.
    """
    regions: list[Region] = []
    centres = np.empty((0, 2))
    for index, cone in enumerate(cones):
        if cone is None:
            continue
        if len(regions):
            sep = np.rad2deg(
                angular_separation(
                    *(np.deg2rad(v) for v in (centres[:, 0], centres[:, 1], cone.ra, cone.dec))
                )
            )
            fits = np.flatnonzero(sep + cone.radius <= max_radius)
        else:
            fits = np.array([], int)
        if fits.size:
            region = regions[int(fits[0])]
            region.members.append(index)
            region.radius = max(region.radius, float(sep[fits[0]]) + cone.radius)
            continue
        regions.append(Region(f"r{len(regions):04d}", cone.ra, cone.dec, cone.radius, [index]))
        centres = np.vstack([centres, [cone.ra, cone.dec]])
    return regions


def fetch_region(
    region: Region, refcat: str, path: str | Path, margin: float = 0.0, **options
) -> str:
    """Fetch the catalog over ``region`` (plus ``margin`` deg) once and write it to ``path``.

    The catalog is asked at its own epoch (no ``EPOCH``) and written as Parquet
    with ``RA``, ``DEC``, ``pmra``, ``pmdec``, ``parallax``, ``ref_epoch``... so
    that reading it back as a local catalog carries positions to each exposure's
    epoch.  An empty region (``No data records``) is written as an empty catalog.

    Parameters
    ----------
    options
        Passed to :func:`~roman_tweakreg.refcat.get_reference_catalog`
        (``base_url``, ``timeout``, ``retries``, ``cache_dir``).

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    ReferenceCatalogError
        The service cannot be had (a timeout, an error answer): retried by the caller.
    """
    try:
        cat = get_reference_catalog(  # an empty region is written as an empty catalog
            refcat, region.ra, region.dec, region.radius + margin, None, min_sources=0, **options
        )
        table = cat.table
    except NoDataError:
        from ._types import standard_table

        table = standard_table({"RA": np.array([]), "DEC": np.array([])})
    except ReferenceCatalogError:
        raise
    if "ref_epoch" not in table.colnames and len(table) and cat.epoch is not None:
        table = table.copy()
        table["ref_epoch"] = np.full(len(table), float(cat.epoch))
    write_atomically(path, lambda p: write_parquet(table, p))
    log.info(
        "Reference catalog %s over region %s (%.4f, %.4f, r=%.3f deg): %d sources in %s",
        refcat,
        region.name,
        region.ra,
        region.dec,
        region.radius + margin,
        len(table),
        path,
    )
    return str(path)
