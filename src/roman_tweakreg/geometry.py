"""Geometry of the alignment: affine maps of the alignment plane, an image's pixel
bounding box and cones on the sphere.

* :func:`affine` and :func:`affine_hull` apply a fit's correction (``matrix``,
  ``shift``, arcsec in the alignment plane) to positions and footprints;
* :func:`convex_hull` is shapely's convex hull of many points, made from the points on
  the hull only;
* :func:`enclosing_cone` gives the cone on the sky around positions (that of the
  reference catalog: :func:`roman_tweakreg.plane.footprint_cone`, the plots and the
  batch planner).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import ConvexHull, QhullError
from shapely.geometry import MultiPoint

__all__ = ["affine", "affine_hull", "bounding_box_of", "convex_hull", "enclosing_cone"]

#: Up to this many points, shapely is given them all (Qhull would not save time).
_FEW_POINTS = 64


def affine(xy: np.ndarray, fit: dict) -> np.ndarray:
    """Positions ``xy`` (N x 2) moved by the correction ``fit`` (``matrix``, ``shift``)."""
    return xy @ np.asarray(fit["matrix"]).T + np.asarray(fit["shift"])


def affine_hull(hull, fit):
    """The convex hull of the points of ``hull`` moved by ``fit`` (see :func:`affine`)."""
    pts = np.asarray(hull.exterior.coords) if hasattr(hull, "exterior") else np.asarray(hull.coords)
    return MultiPoint(affine(pts, fit)).convex_hull


def convex_hull(xy: np.ndarray):
    """``MultiPoint(xy).convex_hull`` of positions ``xy`` (N x 2), the same geometry.

    Shapely builds a point object per position before it takes the hull (16 ms for
    18,000 sources, and as many objects for the garbage collector); Qhull
    (``scipy.spatial.ConvexHull``) finds the positions on the hull from the array, and
    shapely is given those only, in their order: the same polygon, vertex for vertex (the
    same WKB over 700 random sets, duplicates and points on edges included), in a
    quarter of the time.  Positions that Qhull cannot take (fewer than three off one
    line, NaN) go to shapely whole.
    """
    xy = np.asarray(xy, float)
    if len(xy) > _FEW_POINTS:
        try:
            xy = xy[np.sort(ConvexHull(xy).vertices)]
        except (QhullError, ValueError):
            pass
    return MultiPoint(xy).convex_hull


def bounding_box_of(wcs) -> tuple | None:
    """Return ``((xmin, xmax), (ymin, ymax))`` of a GWCS, or None."""
    try:
        bbox = wcs.bounding_box
    except (NotImplementedError, AttributeError):
        bbox = None
    if bbox is None:
        if wcs.pixel_shape is None:
            return None
        nx, ny = wcs.pixel_shape
        return ((-0.5, nx - 0.5), (-0.5, ny - 0.5))
    try:
        (x0, x1), (y0, y1) = bbox.bounding_box(order="F")
    except AttributeError:
        (x0, x1), (y0, y1) = bbox
    return ((float(x0), float(x1)), (float(y0), float(y1)))


def enclosing_cone(ra: np.ndarray, dec: np.ndarray) -> tuple[float, float, float]:
    """Return ``(ra, dec, radius)`` in degrees of a cone around sky positions (degrees).

    The centre is the normalised mean of the unit vectors; the radius the largest
    angular distance from it to a position (computed on the sphere).
    """
    a, d = np.deg2rad(np.ravel(ra)), np.deg2rad(np.ravel(dec))
    v = np.column_stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])
    centre = v.mean(axis=0)
    centre /= np.linalg.norm(centre)
    radius = np.rad2deg(np.arccos(np.clip(v @ centre, -1, 1)).max())
    ra_c = np.rad2deg(np.arctan2(centre[1], centre[0])) % 360.0
    dec_c = np.rad2deg(np.arcsin(centre[2]))
    return float(ra_c), float(dec_c), float(radius)
