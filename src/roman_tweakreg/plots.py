"""Diagnostic figures of an alignment: residual vectors, residual histograms, matched sources.

Residuals are measured from the files alone: each image's source catalog
(pixel ``x``/``y``) is evaluated through its WCS and matched, by nearest
neighbour within ``match_radius``, to

* a reference catalog (``refcat``, read and carried to each image's epoch by
  :func:`roman_tweakreg.refcat.read_local_catalog`, as the step does); or, without one,
* the sources of the exposure groups that come before it (in order of first
  appearance), so that overlapping groups are compared with each other.

Pairs are found with the aligned WCS (the output file's) and the *same pairs*
are evaluated with the input WCS ("before") when the input file is found, so a
pointing error larger than ``match_radius`` still shows before alignment.

A residual is source minus reference: ``dRA cos(Dec)`` (east) and ``dDec``
(north), in milliarcseconds.  Figures are :class:`matplotlib.figure.Figure` objects
written through the Agg canvas (no display, no pyplot, the caller's backend left
alone); see ``docs/report.rst``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._io import write_atomically
from ._meta import exposure_epoch
from .errors import TweakRegError
from .geometry import enclosing_cone
from .products import expand_paths, find_input, inputs_map, open_meta
from .refcat import read_local_catalog

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .refcat import ReferenceCatalog

__all__ = [
    "DEFAULT_MATCH_RADIUS",
    "ImageSources",
    "Residuals",
    "compute_residuals",
    "load_images",
    "make_plots",
    "match_nearest",
]

log = logging.getLogger(__name__)

#: Default matching radius (arcsec) of sources to the reference.
DEFAULT_MATCH_RADIUS = 0.5
_MAS_PER_DEG = 3.6e6
_FIGURES = ("focal_plane", "residual_histograms", "matched_sky")


# -- inputs -----------------------------------------------------------------------------------
@dataclass
class ImageSources:
    """One output image's sources on the sky, with the aligned and (if found) input WCS.

    Attributes
    ----------
    file : str
        Output file name.
    group_id : str
        Exposure group (``wcs_fit_results.group_id`` or the exposure identity).
    epoch : float or None
        Decimal year of the exposure start.
    ra, dec : numpy.ndarray
        Source positions (deg) through the output WCS.
    ra_before, dec_before : numpy.ndarray or None
        The same sources through the input WCS; None when no input file was found.
    footprint : numpy.ndarray
        ``(4, 2)`` RA/Dec (deg) corners of the detector through the output WCS.
    input_path : Path or None
        The input file the "before" WCS comes from.
    fit_nmatches : int or None
        The step's own matches of this image in the fit that set its WCS
        (``wcs_fit_results.image_nmatches``), where recorded.
    relative_nmatches : int or None
        Its own matches in its group's relative fit
        (``wcs_fit_results.relative.image_nmatches``); None where not recorded.
    relative_status : str or None
        That fit's status (``REFERENCE`` for the group the others were aligned to).
    """

    file: str
    group_id: str
    epoch: float | None
    ra: np.ndarray
    dec: np.ndarray
    ra_before: np.ndarray | None
    dec_before: np.ndarray | None
    footprint: np.ndarray
    input_path: Path | None = None
    fit_nmatches: int | None = None
    relative_nmatches: int | None = None
    relative_status: str | None = None


def _read_sources(meta, path: Path, search_dirs: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel x, y of the catalog an image names, inside its WCS bounding box."""
    from .catalogs import CatalogSource, load_catalog, model_catalog_source

    source = model_catalog_source(meta, path.parent)
    if source is None or source.value is None:
        raise TweakRegError(
            f"{path}: names no source catalog (meta.tweakreg_catalog or "
            "meta.source_catalog.tweakreg_catalog_name)"
        )
    if isinstance(source.value, (str, os.PathLike)):
        dirs = tuple(dict.fromkeys([path.parent, *search_dirs, Path.cwd()]))
        source = CatalogSource(str(source.value), source.origin, dirs)
    try:
        table = load_catalog(source, path.name, meta["wcs"])
    except TweakRegError as err:
        raise TweakRegError(f"{path}: {err}") from err
    return np.asarray(table["x"], float), np.asarray(table["y"], float)


def load_images(
    outputs: str | os.PathLike | Iterable[str | os.PathLike],
    inputs: Iterable[str | os.PathLike] | None = None,
) -> list[ImageSources]:
    """Read each output image's catalog and evaluate it through the output and input WCS.

    Parameters
    ----------
    outputs : path or iterable of paths
        Output ASDF files, association JSON files listing them, or folders of them.
    inputs : iterable of paths, optional
        Input ASDF files, associations or folders; see :func:`find_input` for the
        default search.

    Returns
    -------
    list of ImageSources

    Raises
    ------
    TweakRegError
        Naming the file, when a file, its WCS or its catalog cannot be read.
    """
    from stpipe.library import NoGroupID

    from .library import exposure_group_id

    inputs_by_name = inputs_map(inputs)
    search_dirs = sorted({p.parent for p in (inputs_by_name or {}).values()})
    images = []
    for path in expand_paths(outputs):
        input_path = find_input(path, inputs_by_name)
        if input_path is not None:
            search_dirs_here = [input_path.parent, *search_dirs]
        else:
            search_dirs_here = [path.parent.parent / "inputs", *search_dirs]
        with open_meta(path) as meta:
            wcs = meta["wcs"] if "wcs" in meta else None
            if wcs is None:
                raise TweakRegError(f"{path}: has no meta.wcs")
            x, y = _read_sources(meta, path, search_dirs_here)
            fit = meta["wcs_fit_results"] if "wcs_fit_results" in meta else {}
            try:
                group = str(fit.get("group_id") or exposure_group_id(meta, path.name))
            except (NoGroupID, TypeError, ValueError) as err:
                log.warning("%s: %s; the file is a group of its own in the figures", path, err)
                group = path.name
            epoch = exposure_epoch(meta)
            fit_nmatches = fit.get("image_nmatches")
            relative = fit.get("relative") or {}
            rel_nmatches, rel_status = relative.get("image_nmatches"), relative.get("status")
            ra, dec = (np.asarray(v, float) for v in wcs(x, y, with_bounding_box=False))
            footprint = np.asarray(wcs.footprint(center=False), float)
        ra_b = dec_b = None
        if input_path is not None:
            with open_meta(input_path) as in_meta:
                in_wcs = in_meta["wcs"] if "wcs" in in_meta else None
                if in_wcs is None:
                    log.warning(
                        "%s: has no meta.wcs; no 'before' residuals for %s", input_path, path.name
                    )
                    input_path = None
                else:
                    ra_b, dec_b = (
                        np.asarray(v, float) for v in in_wcs(x, y, with_bounding_box=False)
                    )
        images.append(
            ImageSources(
                path.name, group, epoch, ra, dec, ra_b, dec_b, footprint, input_path,
                None if fit_nmatches is None else int(fit_nmatches),
                None if rel_nmatches is None else int(rel_nmatches),
                None if rel_status is None else str(rel_status),
            )
        )  # fmt: skip
        log.info(
            "%s: %d sources, group %s, input %s",
            path.name,
            x.size,
            group,
            input_path or "not found",
        )
    return images


# -- geometry and matching --------------------------------------------------------------------
def _tangent(ra, dec, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic projection about (ra0, dec0): xi (east), eta (north) in arcsec.

    astropy's TAN WCS with 1-arcsec pixels and (ra0, dec0) at pixel (0, 0).
    """
    from astropy.wcs import WCS

    tan = WCS(naxis=2)
    tan.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    tan.wcs.crval = [ra0, dec0]
    tan.wcs.crpix = [1.0, 1.0]
    tan.wcs.cdelt = [1 / 3600.0, 1 / 3600.0]
    xi, eta = tan.wcs_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
    return xi, eta


def _offsets_mas(ra, dec, ra_ref, dec_ref) -> tuple[np.ndarray, np.ndarray]:
    """Source minus reference: dRA cos(Dec), dDec (mas)."""
    dra = (np.asarray(ra) - np.asarray(ra_ref) + 180.0) % 360.0 - 180.0
    return (
        dra * np.cos(np.deg2rad(dec_ref)) * _MAS_PER_DEG,
        (np.asarray(dec) - np.asarray(dec_ref)) * _MAS_PER_DEG,
    )


def match_nearest(ra, dec, ref_ra, ref_dec, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Pair sources with their nearest reference source within ``radius`` arcsec.

    A reference source claimed by several sources keeps only the closest one.

    Returns
    -------
    src_idx, ref_idx : numpy.ndarray
        Indices of the paired sources and reference sources.
    """
    from scipy.spatial import cKDTree

    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    empty = np.empty(0, int)
    if ra.size == 0 or np.size(ref_ra) == 0:
        return empty, empty
    ra0, dec0 = enclosing_cone(ra, dec)[:2]
    tree = cKDTree(np.column_stack(_tangent(ref_ra, ref_dec, ra0, dec0)))
    dist, idx = tree.query(
        np.column_stack(_tangent(ra, dec, ra0, dec0)), distance_upper_bound=radius
    )
    src = np.flatnonzero(np.isfinite(dist))
    ref, dist = idx[src], dist[src]
    order = np.lexsort((dist, ref))  # by reference source, closest first
    first = np.ones(order.size, bool)
    first[1:] = ref[order][1:] != ref[order][:-1]
    keep = np.sort(order[first])
    return src[keep], ref[keep]


@dataclass
class Residuals:
    """Matched sources of one image and their residuals (source minus reference).

    Attributes
    ----------
    file, group_id : str
    ra, dec : numpy.ndarray
        Aligned positions (deg) of the matched sources.
    after : numpy.ndarray
        ``(n, 2)`` dRA cos(Dec), dDec (mas) with the output WCS.
    before : numpy.ndarray or None
        The same pairs with the input WCS; None without the input file.
    reference : str
        What the sources were matched to.
    """

    file: str
    group_id: str
    ra: np.ndarray
    dec: np.ndarray
    after: np.ndarray
    before: np.ndarray | None
    reference: str


def compute_residuals(
    images: Sequence[ImageSources],
    reference: ReferenceCatalog | None = None,
    *,
    match_radius: float = DEFAULT_MATCH_RADIUS,
) -> list[Residuals]:
    """Match every image's sources and measure residuals (see the module description).

    Parameters
    ----------
    images : sequence of ImageSources
    reference : roman_tweakreg.refcat.ReferenceCatalog or None
        Without it, each group is compared with the groups before it.
    match_radius : float
        Matching radius (arcsec), applied to the aligned positions.

    Returns
    -------
    list of Residuals
        One per image that has matches.
    """
    out = []
    if reference is not None:
        cache: dict = {}
        for img in images:
            key = None if img.epoch is None else round(img.epoch, 6)
            if key not in cache:
                cache[key] = reference.positions(img.epoch)
            ref_ra, ref_dec = cache[key]
            src, ref = match_nearest(img.ra, img.dec, ref_ra, ref_dec, match_radius)
            after = np.column_stack(
                _offsets_mas(img.ra[src], img.dec[src], ref_ra[ref], ref_dec[ref])
            )
            before = None
            if img.ra_before is not None:
                before = np.column_stack(
                    _offsets_mas(img.ra_before[src], img.dec_before[src], ref_ra[ref], ref_dec[ref])
                )
            out.append(
                Residuals(
                    img.file, img.group_id, img.ra[src], img.dec[src], after, before, reference.name
                )
            )
        return out
    groups = list(dict.fromkeys(img.group_id for img in images))
    for k, group in enumerate(groups[1:], start=1):
        earlier = [i for i in images if i.group_id in groups[:k]]
        ref_ra = np.concatenate([i.ra for i in earlier])
        ref_dec = np.concatenate([i.dec for i in earlier])
        all_before = all(i.ra_before is not None for i in earlier)
        if all_before:
            ref_ra_b = np.concatenate([i.ra_before for i in earlier])
            ref_dec_b = np.concatenate([i.dec_before for i in earlier])
        for img in (i for i in images if i.group_id == group):
            src, ref = match_nearest(img.ra, img.dec, ref_ra, ref_dec, match_radius)
            after = np.column_stack(
                _offsets_mas(img.ra[src], img.dec[src], ref_ra[ref], ref_dec[ref])
            )
            before = None
            if all_before and img.ra_before is not None:
                before = np.column_stack(
                    _offsets_mas(
                        img.ra_before[src], img.dec_before[src], ref_ra_b[ref], ref_dec_b[ref]
                    )
                )
            out.append(
                Residuals(
                    img.file,
                    img.group_id,
                    img.ra[src],
                    img.dec[src],
                    after,
                    before,
                    "groups " + ", ".join(groups[:k]),
                )
            )
    return out


# -- figures ----------------------------------------------------------------------------------
def _nice(value: float) -> float:
    """The 1, 2 or 5 times a power of ten nearest below ``value``."""
    if not np.isfinite(value) or value <= 0:
        return 1.0
    power = 10 ** np.floor(np.log10(value))
    return float(max(m for m in (1, 2, 5, 10) if m * power <= value * 1.0000001) * power)


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(a**2))) if a.size else float("nan")


def _savefig(fig, path: Path) -> Path:
    """Write ``fig`` (a :class:`matplotlib.figure.Figure`) through the Agg canvas: no
    display, no pyplot, and the caller's matplotlib backend is left as it is."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return write_atomically(path, lambda p: fig.savefig(p, dpi=120))


def _colours(groups: Sequence[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {g: cmap(k % 10) for k, g in enumerate(groups)}


def _focal_plane(images, residuals, out_dir, max_vectors, rng, title_ref):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    all_ra = np.concatenate([i.footprint[:, 0] for i in images])
    all_dec = np.concatenate([i.footprint[:, 1] for i in images])
    ra0, dec0 = enclosing_cone(all_ra, all_dec)[:2]
    groups = list(dict.fromkeys(i.group_id for i in images))
    colours = _colours(groups)
    phases = [("after", "after alignment (output WCS)")]
    if any(r.before is not None for r in residuals):
        phases.insert(0, ("before", "before alignment (input WCS)"))
    fx, fy = _tangent(all_ra, all_dec, ra0, dec0)
    # panels shaped like the field (with room for the vectors): no blank bands
    shape = min(max((np.ptp(fy) + 0.2 * np.ptp(fx)) / (1.2 * max(np.ptp(fx), 1e-9)), 0.5), 1.5)
    fig = Figure(figsize=(7.5 * len(phases), 7.5 * shape + 2.6), layout="constrained")
    axes = fig.subplots(1, len(phases), squeeze=False)[0]
    span = max(np.ptp(fx), np.ptp(fy)) / 60.0  # arcmin
    total = sum(r.after.shape[0] for r in residuals)
    keep_fraction = min(1.0, max_vectors / total) if total else 1.0
    for ax, (phase, label) in zip(axes, phases, strict=False):
        for img in images:
            xi, eta = _tangent(img.footprint[:, 0], img.footprint[:, 1], ra0, dec0)
            ax.fill(xi / 60, eta / 60, facecolor="none", edgecolor="0.5", lw=0.8)
        vecs = [getattr(r, phase) for r in residuals if getattr(r, phase) is not None]
        lengths = np.concatenate([np.hypot(*v.T) for v in vecs]) if vecs else np.empty(0)
        p95 = float(np.percentile(lengths, 95)) if lengths.size else 1.0
        bar = _nice(p95)
        magnify = _nice(0.05 * span * 60e3 / max(p95, 1e-9))  # a p95 vector = 5 % of the field
        handles = [Line2D([], [], color="0.5", lw=0.8, label="detector footprint (output WCS)")]
        n_shown = 0
        for group in groups:
            rs = [r for r in residuals if r.group_id == group and getattr(r, phase) is not None]
            if not rs:
                continue
            ra = np.concatenate([r.ra for r in rs])
            dec = np.concatenate([r.dec for r in rs])
            vec = np.concatenate([getattr(r, phase) for r in rs])
            pick = rng.random(ra.size) < keep_fraction
            xi, eta = _tangent(ra[pick], dec[pick], ra0, dec0)
            ax.quiver(
                xi / 60,
                eta / 60,
                vec[pick, 0] * magnify / 6e4,
                vec[pick, 1] * magnify / 6e4,
                angles="xy",
                scale_units="xy",
                scale=1,
                color=colours[group],
                width=0.0025,
                headwidth=3,
            )
            n_shown += int(pick.sum())
            handles.append(
                Line2D(
                    [],
                    [],
                    color=colours[group],
                    marker=r"$\rightarrow$",
                    markersize=14,
                    linestyle="none",
                    label=f"group {group}: {vec.shape[0]} pairs, "
                    f"rms {_rms(np.hypot(*vec.T)):.3g} mas",
                )
            )
        if n_shown:
            ax.add_artist(
                AnchoredSizeBar(
                    ax.transData,
                    bar * magnify / 6e4,
                    f"scale: {bar:g} mas",
                    loc="lower left",
                    pad=0.4,
                    sep=4,
                    frameon=True,
                    size_vertical=0.004 * span,
                )
            )
            handles.append(
                Line2D(
                    [],
                    [],
                    color="k",
                    lw=2,
                    label=f"scale bar: {bar:g} mas "
                    f"(= {bar * magnify / 6e4:.2g} arcmin at x{magnify:g})",
                )
            )
        ax.set_xlabel("ξ (towards east) [arcmin]")
        ax.set_ylabel("η (towards north) [arcmin]")
        ax.invert_xaxis()  # east to the left, as on the sky
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(
            f"Residuals {label}\nvectors magnified x{magnify:g}"
            + ("" if keep_fraction >= 1 else f", {n_shown} of {total} shown")
        )
        ax.legend(
            handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize="small"
        )
    fig.suptitle(
        f"Focal plane: source - {title_ref} residual vectors "
        f"(tangent plane at RA {ra0:.4f}°, Dec {dec0:+.4f}°)"
    )
    return _savefig(fig, out_dir / "focal_plane.png")


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    """A range holding the bulk of ``values`` (0.5 to 99.5 percentiles, widened by a tenth,
    at least 1 mas wide), so that a narrow distribution is not squeezed into a bin or two."""
    if not values.size:
        return -1.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    pad = max(0.1 * (hi - lo), 0.5)
    return lo - pad, hi + pad


def _pair_counts(images, residuals) -> tuple[int, int]:
    """(sources paired, sources that could be): images with residuals, or whose group
    was compared (the first group is the others' reference without a catalog)."""
    compared = {r.group_id for r in residuals}
    total = sum(i.ra.size for i in images if i.group_id in compared)
    return sum(r.after.shape[0] for r in residuals), total


def _unmatched_note(images, residuals, match_radius: float) -> str:
    paired, total = _pair_counts(images, residuals)
    unmatched = total - paired
    return (
        f"{paired} of {total} sources paired within {match_radius:g}\u2033, {unmatched} "
        f"unmatched ({100.0 * unmatched / total if total else 0.0:.1f} %)\n(a misalignment "
        "beyond the radius shows as unmatched sources, not as residuals: see --match-radius)"
    )


def _histograms(images, residuals, out_dir, title_ref, match_radius):
    from matplotlib.figure import Figure

    phases = [("after", "after alignment")]
    if any(r.before is not None for r in residuals):
        phases.insert(0, ("before", "before alignment"))
    components = (("ΔRA cos Dec", "tab:blue"), ("ΔDec", "tab:orange"))
    fig = Figure(figsize=(13, 4.2 * len(phases) + 0.8), layout="constrained")
    axes = fig.subplots(len(phases), 2, squeeze=False)
    for row, (phase, label) in zip(axes, phases, strict=True):
        vecs = [getattr(r, phase) for r in residuals if getattr(r, phase) is not None]
        vec = np.concatenate(vecs) if vecs else np.empty((0, 2))
        finite = vec[np.all(np.isfinite(vec), axis=1)]
        for k, (ax, (name, colour)) in enumerate(zip(row, components, strict=True)):
            v = finite[:, k]
            lo, hi = _robust_range(v)  # each panel its own range: no collapse into a bar
            inside = v[(v >= lo) & (v <= hi)]
            outside = v.size - inside.size
            ax.hist(inside, bins=np.linspace(lo, hi, 61), histtype="stepfilled", alpha=0.35,
                    color=colour, edgecolor=colour, lw=1.2)  # fmt: skip
            text = (
                f"{v.size} pairs\nmean {np.mean(v) if v.size else np.nan:+.3g} mas\n"
                f"rms {_rms(v):.3g} mas"
            )
            if outside:  # outliers are left out, not piled into the end bins
                text += f"\n{outside} beyond [{lo:.3g}, {hi:.3g}] not drawn"
            ax.text(0.02, 0.97, text, transform=ax.transAxes, va="top", ha="left",
                    fontsize="small", bbox={"fc": "white", "ec": "0.8", "alpha": 0.85})  # fmt: skip
            ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the box above the peak
            ax.set_xlabel(f"{name} residual (source - reference) [mas]")
            ax.set_ylabel("matched sources per bin")
            ax.set_title(f"{label}: {name}")
    fig.suptitle(
        f"Residuals against {title_ref}\n{_unmatched_note(images, residuals, match_radius)}",
        fontsize="medium",
    )
    return _savefig(fig, out_dir / "residual_histograms.png")


def _short_groups(groups: Sequence[str]) -> dict[str, str]:
    """Each group id without the ids' common beginning (up to a ``_``), for titles."""
    from .report import group_prefix

    prefix = group_prefix(groups)
    return {g: (f"...{g.removeprefix(prefix)}" if prefix else g) for g in groups}


def _sky(images, residuals, reference_xy, out_dir, rng, title_ref, match_radius):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    groups = list(dict.fromkeys(i.group_id for i in images))
    short = _short_groups(groups)
    colours = _colours(groups)
    ncol = min(len(groups), 3)
    nrow = -(-len(groups) // ncol)
    corners = np.vstack([i.footprint for i in images])
    cos_dec = np.cos(np.deg2rad(np.mean(corners[:, 1])))
    has_ref = reference_xy is not None and reference_xy[0].size
    if has_ref:  # the reference stars near the footprints only: no empty bands around them
        pad = 0.08 * max(np.ptp(corners[:, 0]) * cos_dec, np.ptp(corners[:, 1]))
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        near = (
            (reference_xy[0] > lo[0] - pad / cos_dec) & (reference_xy[0] < hi[0] + pad / cos_dec)
            & (reference_xy[1] > lo[1] - pad) & (reference_xy[1] < hi[1] + pad)
        )  # fmt: skip
        ref_x, ref_y = reference_xy[0][near], reference_xy[1][near]
        ref_pick = rng.random(ref_x.size) < min(1.0, 20000 / max(ref_x.size, 1))
    # panels shaped like the field (RA scaled by cos Dec): no blank bands above and below
    aspect = np.ptp(corners[:, 1]) / max(np.ptp(corners[:, 0]) * cos_dec, 1e-9)
    width = 5.5
    fig = Figure(
        figsize=(width * ncol, nrow * (width * min(max(aspect, 0.4), 2.0) + 0.8) + 0.9),
        layout="constrained",
    )
    axes = fig.subplots(nrow, ncol, squeeze=False, sharex=True, sharey=True).ravel()
    for ax, group in zip(axes, groups, strict=False):
        if has_ref:
            ax.scatter(ref_x[ref_pick], ref_y[ref_pick], s=1, color="0.8", rasterized=True)
        for img in images:
            outline = np.vstack([img.footprint, img.footprint[:1]])
            mine = img.group_id == group
            ax.plot(outline[:, 0], outline[:, 1], color=colours[group] if mine else "0.6",
                    lw=1.2 if mine else 0.6, ls="-" if mine else ":")  # fmt: skip
        rs = [r for r in residuals if r.group_id == group]
        n = sum(r.ra.size for r in rs)
        n_sources = sum(i.ra.size for i in images if i.group_id == group)
        if rs:
            ax.scatter(np.concatenate([r.ra for r in rs]), np.concatenate([r.dec for r in rs]),
                       s=2, color=colours[group], rasterized=True)  # fmt: skip
        counts = _sky_counts(images, group, n, n_sources, rs, match_radius, has_ref)
        ax.set_title(f"group {short[group]}\n{counts}", fontsize="small")
        ax.set_xlabel("RA [deg]")
        ax.set_ylabel("Dec [deg]")
        ax.set_aspect(1 / cos_dec, adjustable="box")
    axes[0].invert_xaxis()  # shared: RA increases to the left on every panel
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    handles = [
        Line2D([], [], color="0.3", lw=1.2, label="detector footprints of the panel's group"),
        Line2D([], [], color="0.6", lw=0.6, ls=":", label="other groups' footprints"),
        Line2D([], [], color="0.3", marker="o", ls="", ms=4,
               label=f"its sources paired within {match_radius:g}\u2033"),
    ]  # fmt: skip
    if has_ref:
        handles.insert(0, Line2D([], [], color="0.8", marker="o", ls="", ms=4,
                                 label=f"reference ({title_ref})"))  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize="small",
               frameon=False)  # fmt: skip
    names = ", ".join(f"{v} = {k}" for k, v in short.items() if v != k)
    fig.suptitle(
        f"Matched sources on the sky per exposure group (paired with {title_ref})"
        + (f"\n{names}" if names else ""),
        fontsize="medium",
    )
    return _savefig(fig, out_dir / "matched_sky.png")


def _sky_counts(images, group, n, n_sources, rs, match_radius, has_ref) -> str:
    """A panel's counts: its sources paired, unmatched, and the step's fit's matches."""
    if not rs and not has_ref:
        own = [i for i in images if i.group_id == group]
        if own and own[0].relative_status == "REFERENCE":
            return "the others' reference: paired with it here, aligned to it by the relative fit"
        return "the first group: the others are paired with it"
    text = f"{n} of {n_sources} sources paired within {match_radius:g}\u2033, {n_sources - n} not"
    own = [i for i in images if i.group_id == group]
    if has_ref:  # the final (absolute) fit's own matches of these images
        fitted, what = [i.fit_nmatches for i in own], "absolute fit"
    else:  # compared with the other groups: the relative fit's
        fitted, what = [i.relative_nmatches for i in own], "relative fit"
        if own and own[0].relative_status == "REFERENCE":
            return text + f"\n(the {what}'s reference)"
    if None in fitted:
        return text
    return text + f"\nthe step's {what}: {sum(fitted)} matches"


def make_plots(
    outputs: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    inputs: Iterable[str | os.PathLike] | None = None,
    refcat: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "tweakreg_plots",
    match_radius: float = DEFAULT_MATCH_RADIUS,
    max_vectors: int = 5000,
    seed: int = 0,
) -> list[Path]:
    """Write the three diagnostic figures of an alignment as PNG files.

    Parameters
    ----------
    outputs : path or iterable of paths
        Output ASDF files, association JSON files listing them, or folders of them.
    inputs : iterable of paths, optional
        The input files (or their association or folder), for the "before" residuals;
        by default searched as :func:`find_input` says.
    refcat : path, optional
        Reference catalog file; without it, exposure groups are compared with each other.
    out_dir : path
        Folder for ``focal_plane.png``, ``residual_histograms.png`` and ``matched_sky.png``.
    match_radius : float
        Matching radius (arcsec).
    max_vectors : int
        Largest number of residual vectors drawn per panel (a random subset beyond).
    seed : int
        Seed of that subset.

    Returns
    -------
    list of Path
        The figures written.

    Raises
    ------
    TweakRegError
        Naming the file, when an input cannot be read, or when nothing can be matched.
    """
    if not match_radius > 0:
        raise TweakRegError(f"match_radius={match_radius!r}: expected a number > 0")
    images = load_images(outputs, inputs)
    if not images:
        raise TweakRegError("no output files given")
    reference = None
    if refcat is not None:
        corners = np.vstack([i.footprint for i in images])
        ra0, dec0, radius = enclosing_cone(corners[:, 0], corners[:, 1])
        reference = read_local_catalog(refcat, ra0, dec0, radius + 2 * match_radius / 3600 + 0.01)
        for message in reference.warnings:
            log.warning("%s", message)
    elif len({i.group_id for i in images}) < 2:
        raise TweakRegError(
            "a single exposure group and no --refcat: there is nothing to compare the "
            "sources with; pass the reference catalog with --refcat"
        )
    residuals = compute_residuals(images, reference, match_radius=match_radius)
    if not any(r.after.shape[0] for r in residuals):
        raise TweakRegError(
            f"no source is within match_radius={match_radius} arcsec of "
            f"{reference.name if reference else 'another group'}; try a larger --match-radius"
        )
    fitted = {i.file: i.fit_nmatches for i in images}
    for r in residuals:
        log.info(
            "%s: %d nearest-neighbour pairs within %g arcsec of %s (the fit: %s matches), "
            "rms after %.3f mas%s",
            r.file,
            r.after.shape[0],
            match_radius,
            r.reference,
            "-" if fitted.get(r.file) is None else fitted[r.file],
            _rms(np.hypot(*r.after.T)),
            "" if r.before is None else f", before {_rms(np.hypot(*r.before.T)):.3f} mas",
        )
    title_ref = reference.name if reference is not None else "earlier exposure groups"
    ref_xy = None
    if reference is not None:
        epochs = [i.epoch for i in images if i.epoch is not None]
        ref_xy = reference.positions(float(np.mean(epochs)) if epochs else None)
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    return [
        _focal_plane(images, residuals, out_dir, max_vectors, rng, title_ref),
        _histograms(images, residuals, out_dir, title_ref, match_radius),
        _sky(images, residuals, ref_xy, out_dir, rng, title_ref, match_radius),
    ]
