"""Which catalog each image uses, reading it, and normalising it for alignment.

Where a catalog comes from (first that applies):

* ``use_custom_catalogs=True``: the ``catfile`` line naming the image; else
  (no catfile) the association member's ``tweakreg_catalog``; else the
  model's own catalog (below).  A catfile or member entry of ``""`` means
  "no catalog".
* the model's own catalog: ``meta.tweakreg_catalog`` (a file name or an
  in-memory table / structured array), else
  ``meta.source_catalog.tweakreg_catalog`` (in memory), else
  ``meta.source_catalog.tweakreg_catalog_name`` (romancal 1.x files).

Relative file names are looked up next to the catfile (catfile entries), the
association (member entries) or the model file, then in the current directory.

Pixel columns, first pair present wins: ``x``/``y``, ``x_psf``/``y_psf`` (PSF fits,
the more accurate positions, preferred like romancal does), ``xcentroid``/``ycentroid``,
``x_centroid``/``y_centroid``; all 0-indexed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.table import Table
from roman_datamodels.dqflags import pixel as _dqflags

from ._asdf_check import check_asdf_file
from ._consistency import detector_mismatch, implausible_epoch
from ._io import check_regular_file, open_regular, read_parquet, sniff_table
from ._meta import exposure_epoch, meta_get, observer_position
from ._parallel import Workers
from ._types import ImageCatalog
from .detection import DetectionJob
from .errors import CatalogError, InvalidInputError, MissingCatalogError
from .geometry import bounding_box_of
from .library import member_dir
from .plane import TangentPlane, common_plane, project

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "ERROR_COLUMNS",
    "PIXEL_COLUMNS",
    "SKY_COLUMNS",
    "CatalogPlan",
    "CatalogSource",
    "ImageCatalog",
    "PlannedImage",
    "PlannedLibrary",
    "collect",
    "detect_and_project",
    "filter_catalog",
    "load_catalog",
    "normalize_catalog",
    "plan_catalogs",
    "read_and_project",
    "read_catalog",
    "read_catalogs",
    "read_catfile",
    "update_catalog_file",
    "update_sky_columns",
]

log = logging.getLogger(__name__)

#: Accepted pairs of pixel columns, in order of precedence.
PIXEL_COLUMNS = (
    ("x", "y"),
    ("x_psf", "y_psf"),
    ("xcentroid", "ycentroid"),
    ("x_centroid", "y_centroid"),
)
#: Accepted pairs of position error columns (pixels, 1 sigma), first found wins: kept as
#: ``pos_err`` (their quadratic mean), they weigh the source in the absolute fit.
ERROR_COLUMNS = (
    ("x_err", "y_err"),
    ("xerr", "yerr"),
    ("x_psf_err", "y_psf_err"),
    ("xcentroid_err", "ycentroid_err"),
    ("x_centroid_err", "y_centroid_err"),
)
#: ``warning_flags`` bit of sources not to use (the DQ flag of the same name).
_DO_NOT_USE = int(_dqflags.DO_NOT_USE)

#: Sky columns recomputed from pixel columns by :func:`update_sky_columns`, as
#: ``(x, y, ra, dec)``: the layout of romancal's source catalogs.
SKY_COLUMNS = (
    ("x_centroid", "y_centroid", "ra_centroid", "dec_centroid"),
    ("x_centroid", "y_centroid", "ra", "dec"),
    ("x_centroid_win", "y_centroid_win", "ra_centroid_win", "dec_centroid_win"),
    ("x_psf", "y_psf", "ra_psf", "dec_psf"),
)


@dataclass
class CatalogSource:
    """Where an image's catalog comes from.

    Attributes
    ----------
    value : str, Table, numpy structured array or None
        A file name, an in-memory catalog, or None (no catalog: generate one).
    origin : str
        Human description for messages (``catfile line 3``, ``meta.tweakreg_catalog``...).
    base_dirs : tuple of Path
        Folders in which a relative file name is looked up, in order.
    hint : str
        Added to the message when the file is not found.
    """

    value: Any
    origin: str
    base_dirs: tuple = ()
    hint: str = ""

    def candidates(self) -> list[Path]:
        """The paths where a file name is looked for, in order."""
        path = Path(self.value)
        if path.is_absolute() or not self.base_dirs:
            return [path]
        return [d / path for d in self.base_dirs]

    def resolve(self) -> Path | None:
        """The first existing candidate path, or None (a detection's catalog file).

        Whatever exists counts (a folder, a FIFO, a device too): :func:`read_catalog`
        then says what it is, rather than that it does not exist.
        """
        return next((p for p in self.candidates() if p.exists()), None)

    @property
    def assigned(self) -> bool:
        """Whether the catalog was assigned by the step (catfile, association, detection)."""
        return self.origin.startswith(("catfile", "association", "detection"))


def read_catfile(path: str | Path) -> dict[str, CatalogSource]:
    """Read a catfile: lines of ``<model file> [<catalog file>]``.

    Blank lines and ``#`` comments are ignored; a line with only a model name
    (or a catalog of ``""``) means that model has no catalog.

    Returns
    -------
    dict
        Model base name -> :class:`CatalogSource`.

    Raises
    ------
    MissingCatalogError
        If the catfile does not exist.
    CatalogError
        Naming the line that does not have one or two columns.
    """
    path = Path(path)
    try:
        with open_regular(path, "catfile", CatalogError) as f:
            text = f.read().decode()
    except FileNotFoundError as err:
        raise MissingCatalogError(f"catfile {path} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise CatalogError(f"catfile {path} cannot be read: {err}") from err
    entries = {}
    base = (path.resolve().parent, Path.cwd())
    for lineno, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        fields = content.split()
        if len(fields) > 2:
            raise CatalogError(
                f"catfile {path} line {lineno}: expected '<model file> [<catalog file>]', "
                f"found {len(fields)} columns: {content!r}"
            )
        catalog = fields[1] if len(fields) == 2 and fields[1] not in ('""', "''") else None
        entries[Path(fields[0]).name] = CatalogSource(
            catalog, f"catfile {path} line {lineno}", base
        )
    return entries


def model_catalog_source(meta: Any, model_dir: Path | None) -> CatalogSource | None:
    """Return the catalog a model names in its own metadata, or None."""
    base = tuple(d for d in (model_dir, Path.cwd()) if d is not None)
    value = meta_get(meta, "tweakreg_catalog")
    if value is not None:
        return CatalogSource(value, "meta.tweakreg_catalog", base)
    source_catalog = meta_get(meta, "source_catalog")
    if source_catalog is not None:
        value = meta_get(source_catalog, "tweakreg_catalog")
        if value is not None:
            return CatalogSource(value, "meta.source_catalog.tweakreg_catalog", base)
        value = meta_get(source_catalog, "tweakreg_catalog_name")
        if value:
            return CatalogSource(value, "meta.source_catalog.tweakreg_catalog_name", base)
    return None


def read_catalog(source: CatalogSource, image: str, catalog_format: str = "ascii.ecsv") -> Table:
    """Read the catalog named by ``source``.

    Parameters
    ----------
    source : CatalogSource
        File name or in-memory table.
    image : str
        Name of the image the catalog belongs to (for messages).
    catalog_format : str
        astropy Table format for files other than ``.parquet`` and ``.asdf``.

    Returns
    -------
    Table
        The catalog as read, all columns.

    Raises
    ------
    MissingCatalogError
        The file does not exist (the message names the image and every path tried).
    CatalogError
        The file cannot be read.
    """
    value = source.value
    if isinstance(value, Table):
        return value
    if isinstance(value, np.ndarray) and value.dtype.names:
        return Table(value)
    if not isinstance(value, (str, Path)):
        try:
            return Table(np.asarray(value))
        except Exception as err:
            raise CatalogError(
                f"{image}: {source.origin} is a {type(value).__name__}, expected a file name "
                "or a table"
            ) from err
    found = source.resolve()
    if found is None:
        raise MissingCatalogError(
            f"{image}: catalog named by {source.origin} does not exist; tried "
            + ", ".join(str(p) for p in source.candidates())
            + source.hint
        )
    try:
        check_regular_file(found, f"catalog named by {source.origin} for {image}", CatalogError)
        return _read_table(found, catalog_format, image)
    except CatalogError:
        raise
    except MemoryError as err:
        raise CatalogError(f"{image}: not enough memory to read catalog {found}") from err
    except Exception as err:
        raise CatalogError(
            f"{image}: cannot read catalog {found} as {catalog_format} (expected a table with "
            f"x/y pixel columns): {type(err).__name__}: {err}"
        ) from err


def _read_table(path: Path, catalog_format: str, image: str = "") -> Table:
    """Read a catalog file after the same hostile-content checks as every input.

    An ASDF catalog goes through :func:`~roman_tweakreg._asdf_check.check_asdf_file`
    (bounded YAML, no alias bomb, sane blocks) as model files do; other formats are
    sniffed first (:func:`~roman_tweakreg._io.sniff_table`: Parquet magic, FITS
    header, no NUL bytes in a text table's first KiB), so that a file of the wrong
    content is refused before a parser reads all of it.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return read_parquet(path)
    if suffix == ".asdf":
        import asdf

        try:
            check_asdf_file(path, f"catalog of {image}" if image else "catalog")
        except InvalidInputError as err:
            raise CatalogError(str(err)) from err
        with asdf.open(path, lazy_load=False, memmap=False) as af:
            for node in _walk(af.tree):
                if isinstance(node, Table):
                    return Table(node, copy=True)
        raise CatalogError(f"{path}: no table found in the ASDF file")
    reason = sniff_table(path, catalog_format)
    if reason is not None:
        where = f"{image}: " if image else ""
        raise CatalogError(f"{where}cannot read catalog {path} as {catalog_format}: {reason}")
    return Table.read(path, format=catalog_format)


def _walk(node):
    if isinstance(node, Table):
        yield node
        return
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _walk(v)
    elif hasattr(node, "source_catalog"):
        yield from _walk(node.source_catalog)


def normalize_catalog(catalog: Table, image: str, where: str = "catalog") -> Table:
    """Return a new table with float ``x``, ``y`` columns taken from the accepted pixel columns.

    Sources flagged DO_NOT_USE in a ``warning_flags`` column are dropped.  A ``weight``
    column is kept, and a pair of position error columns (:data:`ERROR_COLUMNS`) as
    ``pos_err`` (pixels).
    ``where`` names the catalog in messages (e.g. ``catalog /data/a_cat.ecsv``).

    Raises
    ------
    CatalogError
        Listing the columns found and the pairs accepted, when no pair is present;
        naming the column when a pixel, weight or flag column is not numeric.
    """
    for xcol, ycol in PIXEL_COLUMNS:
        if xcol in catalog.colnames and ycol in catalog.colnames:
            break
    else:
        accepted = ", ".join(f"{x}/{y}" for x, y in PIXEL_COLUMNS)
        raise CatalogError(
            f"{image}: 'tweakreg' source catalogs must contain a pair of pixel columns "
            f"({accepted}): {where} has no pixel columns; found {catalog.colnames}"
        )
    out = Table(
        {
            "x": _numeric(catalog, xcol, float, image, where),
            "y": _numeric(catalog, ycol, float, image, where),
        }
    )
    if "weight" in catalog.colnames:
        out["weight"] = _numeric(catalog, "weight", float, image, where)
    for xerr, yerr in ERROR_COLUMNS:
        if xerr in catalog.colnames and yerr in catalog.colnames:
            ex = _numeric(catalog, xerr, float, image, where)
            ey = _numeric(catalog, yerr, float, image, where)
            out["pos_err"] = np.sqrt(0.5 * (ex**2 + ey**2))
            break
    if "warning_flags" in catalog.colnames:
        flags = _numeric(catalog, "warning_flags", np.int64, image, where)
        bad = (flags & _DO_NOT_USE) != 0
        if bad.any():
            log.info("%s: dropped %d sources flagged DO_NOT_USE", image, int(bad.sum()))
        out = out[~bad]
    return out


def _numeric(catalog: Table, name: str, dtype, image: str, where: str) -> np.ndarray:
    """Column ``name`` as ``dtype``, or a CatalogError naming the catalog and the column."""
    col = catalog[name]
    try:
        if np.dtype(dtype).kind == "i" and np.asarray(col).dtype.kind in "iub":
            return np.ma.asarray(col).filled(0).astype(dtype)
        if np.ma.isMaskedArray(col) or hasattr(col, "mask"):
            col = np.ma.asarray(col).astype(float).filled(np.nan)
        values = np.asarray(col, dtype=float)
        if np.dtype(dtype).kind == "i":
            values = np.nan_to_num(values, nan=0).astype(dtype)
    except (TypeError, ValueError, OverflowError) as err:
        kind = "integers" if np.dtype(dtype).kind == "i" else "numbers (pixels)"
        raise CatalogError(
            f"{image}: {where}: column {name!r} is not numeric: expected {kind}, found "
            f"{getattr(col, 'dtype', type(col).__name__)} values ({err})"
        ) from err
    if values.ndim != 1:
        raise CatalogError(
            f"{image}: {where}: column {name!r} has shape {values.shape}, expected one value "
            "per source"
        )
    return values


def filter_catalog(catalog: Table, bounding_box, image: str) -> Table:
    """Drop rows with non-finite positions and rows outside ``bounding_box``.

    Parameters
    ----------
    catalog : Table
        Normalised catalog (``x``, ``y``).
    bounding_box : ((xmin, xmax), (ymin, ymax)) or None
        The WCS bounding box in pixels.
    image : str
        For messages.

    Returns
    -------
    Table
        The rows kept; the counts dropped are logged.
    """
    x, y = np.asarray(catalog["x"]), np.asarray(catalog["y"])
    finite = np.isfinite(x) & np.isfinite(y)
    inside = finite.copy()
    if bounding_box is not None:
        (x0, x1), (y0, y1) = bounding_box
        with np.errstate(invalid="ignore"):
            inside &= (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    n_nonfinite = int((~finite).sum())
    n_outside = int((finite & ~inside).sum())
    if n_nonfinite:
        log.warning("%s: dropped %d catalog rows with non-finite x/y", image, n_nonfinite)
    if n_outside:
        log.info("%s: dropped %d sources outside the WCS bounding box", image, n_outside)
    return catalog[inside]


def load_catalog(source: CatalogSource, image: str, wcs, catalog_format: str = "ascii.ecsv"):
    """Read, normalise and filter one image's catalog: ``x``, ``y`` of its usable sources.

    See :func:`read_catalog`, :func:`normalize_catalog` and :func:`filter_catalog`
    (the bounding box is ``wcs``'s) for what is read, accepted and dropped.
    """
    raw = read_catalog(source, image, catalog_format)
    found = source.resolve() if isinstance(source.value, (str, Path)) else None
    where = f"catalog {found}" if found is not None else f"catalog ({source.origin})"
    table = normalize_catalog(raw, image, where)
    return filter_catalog(table, bounding_box_of(wcs), image)


def _catalog_source(
    library, index: int, attributes: dict, model, use_custom: bool, catfile_entries: dict | None
) -> CatalogSource | None:
    """Pick the catalog source of one image by the precedence in the module docstring.

    ``attributes``: the image's association entry.
    """
    model_dir = member_dir(library, index, attributes)
    name = Path(str(model.meta.filename or "")).name
    if use_custom:
        if catfile_entries is not None:
            if name in catfile_entries:
                return catfile_entries[name]
        elif "tweakreg_catalog" in attributes:
            value = attributes["tweakreg_catalog"] or None
            asn_dir = getattr(library, "asn_dir", None)
            base = tuple(d for d in (asn_dir, Path.cwd()) if d is not None)
            return CatalogSource(value, "association member attribute tweakreg_catalog", base)
    source = model_catalog_source(model.meta, model_dir)
    wanted = attributes.get("tweakreg_catalog")
    # a romancal library has already copied it into meta.source_catalog: then it is used
    used = source.value if source is not None else None
    if not use_custom and wanted and not (isinstance(used, str) and used == wanted):
        log.warning(
            "%s: association member attribute tweakreg_catalog=%r ignored because "
            "use_custom_catalogs is False; run with use_custom_catalogs=True to use it",
            name or f"image {index}",
            wanted,
        )
    value = getattr(source, "value", None)
    if model_dir is None and isinstance(value, str) and not Path(value).is_absolute():
        source.hint = (
            f". {name or 'The model'} was given as an in-memory model, whose folder is not "
            "known (or in a library that does not give it): a relative catalog name is "
            "looked up in the current folder. Give the step the model's file name instead, "
            "or make the catalog name absolute "
            f"(e.g. {source.origin.replace('meta.', 'model.meta.')} = "
            "str(folder / name))"
        )
    return source


def _detection_job(
    model, name: str, params, catalog_path: str, catalog_format: str, image_file=None
) -> DetectionJob:
    """The detection of ``model``'s sources, for the detection phase to run.

    The arrays are read from ``image_file`` by whoever runs the job (a worker, a Dask
    task) when the model comes from that file, else taken from the model.
    """
    from .detection import catalog_filename

    log.info("%s: no catalog given, detecting sources", name)
    path = catalog_filename(name, catalog_path or Path.cwd(), catalog_format)
    arrays = None
    if image_file is None:
        arrays = (model.data, model.dq, getattr(model, "err", None))
    instrument = model.meta.get("instrument", {})
    return DetectionJob(
        name,
        path,
        catalog_format,
        params,
        image_file,
        arrays,
        str(instrument.get("detector", "") or ""),
        str(instrument.get("optical_element", "") or ""),
    )


def _image_file(library, index: int, entry: dict) -> str | None:
    """The file model ``index`` (association entry ``entry``) is read from (None for a
    model given in memory)."""
    expname = entry.get("expname")
    folder = member_dir(library, index, entry)
    if not expname or folder is None:
        return None
    path = folder / Path(str(expname)).name
    return str(path) if path.is_file() else None


# -- the catalog phase: plan -> detect -> read -----------------------------------------------
@dataclass(frozen=True)
class PlannedImage:
    """One image of a :class:`CatalogPlan`: where its catalog comes from.

    Attributes
    ----------
    image : ImageCatalog
        The image (its ``catalog`` is None until read).
    source : CatalogSource
        Where its catalog is read from; for an image to detect, the file the
        detection writes (origin ``detection``).
    detection : DetectionJob or None
        The detection to run before reading (None: the catalog exists, or was
        detected by the caller: :meth:`CatalogPlan.detected`).
    """

    image: ImageCatalog
    source: CatalogSource
    detection: DetectionJob | None = None


@dataclass(frozen=True)
class CatalogPlan:
    """Which catalog each image of a library uses: the catalog phase's plan.

    Made by :func:`plan_catalogs` (the library opened once, metadata only); its
    :attr:`detections` are run (:func:`read_catalogs` runs those still to do) and its
    catalogs read by :func:`read_catalogs`.  Small and picklable, except for images
    given in memory, whose detection carries their arrays.

    Attributes
    ----------
    images : tuple of PlannedImage
        The images that can be aligned, in library order.
    skipped : dict
        Library index -> reason, for the images left out (non-imaging exposure,
        no usable WCS...).
    n_images : int
        Images in the library.
    catalog_format : str
        The astropy format of catalog files other than ``.parquet`` and ``.asdf``.
    """

    images: tuple[PlannedImage, ...]
    skipped: dict[int, str]
    n_images: int
    catalog_format: str = "ascii.ecsv"

    @property
    def detections(self) -> tuple[DetectionJob, ...]:
        """The detections still to run, in library order."""
        return tuple(p.detection for p in self.images if p.detection is not None)

    def detected(self) -> CatalogPlan:
        """This plan once its :attr:`detections` were run by the caller (each wrote its
        catalog file): every catalog is then read from its file."""
        return replace(self, images=tuple(replace(p, detection=None) for p in self.images))


@dataclass(frozen=True)
class PlannedLibrary:
    """A library with its catalog plan, made by the caller: an input of the step.

    The batch opens an association once, asks the step for its plan
    (:meth:`~roman_tweakreg.step.TweakRegStep.plan_catalogs`), runs the detections
    as Dask tasks and gives the step this: the step then reads the catalogs as planned,
    without opening the association or choosing again.

    Attributes
    ----------
    library : AbstractModelLibrary
        The models, as opened by the caller.
    plan : CatalogPlan
        Its plan (detections run by the caller: :meth:`CatalogPlan.detected`; any left
        are run by the step).
    source : str
        What the library was opened from (the association file), for the step's checks
        that no output overwrites an input.
    """

    library: Any
    plan: CatalogPlan
    source: str = ""

    def __repr__(self) -> str:  # stpipe logs its inputs: short
        return (
            f"PlannedLibrary({self.source or 'models'!r}, {len(self.plan.images)} images planned,"
            f" {len(self.plan.detections)} to detect)"
        )


def plan_catalogs(
    library,
    *,
    use_custom_catalogs: bool = False,
    catfile: str = "",
    catalog_format: str = "ascii.ecsv",
    detection=None,
    catalog_path: str = "",
    psf_lookup=None,
    on_planned: Callable[[PlannedImage], object] | None = None,
) -> CatalogPlan:
    """Choose each image's catalog: the first phase of the catalog phase.

    Every model of ``library`` is borrowed once (in one ``with library:`` block, its
    metadata read, no pixel array unless an in-memory model needs detection) and
    shelved unmodified; each image's catalog is chosen by the precedence in the module
    docstring.  Nothing is read or written here besides the catfile: an image without
    any catalog gets a :class:`~roman_tweakreg.detection.DetectionJob` when
    ``detection`` (a :class:`~roman_tweakreg.detection.DetectionParameters`) is given,
    whose catalog goes to ``catalog_path`` as ``<image root>_cat.<ext>`` in
    ``catalog_format``.  ``psf_lookup``, when given and ``detection.psf_model`` is None,
    is called with the model of each image to detect and returns its ePSF file or None
    (the step's CRDS lookup).  When an image is to be detected without an ePSF, one
    line says so (once a call).  ``on_planned``, when given, is called with each
    :class:`PlannedImage` as soon as it is planned, its model shelved (:func:`collect`
    starts reading its catalog then).

    Returns
    -------
    CatalogPlan

    Raises
    ------
    MissingCatalogError
        An image has no catalog at all and ``detection`` is None.
    CatalogError
        The catfile cannot be read.
    """
    entries = read_catfile(catfile) if (use_custom_catalogs and catfile) else None
    asn_members = library.asn["products"][0]["members"]  # read once: stpipe copies it per read
    if (
        use_custom_catalogs
        and entries is None
        and not any("tweakreg_catalog" in m for m in asn_members)
    ):
        log.warning(
            "use_custom_catalogs=True but there is no catfile and no association member "
            "has a tweakreg_catalog attribute: using the models' own catalogs"
        )
    choice = _Choice(library, use_custom_catalogs, entries, detection, catalog_path,
                     catalog_format, psf_lookup)  # fmt: skip
    planned: list[PlannedImage] = []
    skipped: dict[int, str] = {}
    with library:
        for index in range(len(library)):
            model = library.borrow(index)
            try:
                item = choice.plan(index, model, asn_members[index])
            finally:
                library.shelve(model, index, modify=False)
            if isinstance(item, str):
                skipped[index] = item
                continue
            planned.append(item)
            if on_planned is not None:
                on_planned(item)
    if entries is not None:
        for missing in sorted(set(entries) - choice.known):
            log.warning("catfile %s names %s, which is not among the inputs", catfile, missing)
    return CatalogPlan(tuple(planned), skipped, len(library), catalog_format)


class _Choice:
    """The catalog choice of :func:`plan_catalogs`, one model at a time."""

    def __init__(self, library, use_custom, entries, detection, catalog_path, catalog_format,
                 psf_lookup):  # fmt: skip
        self.library, self.use_custom, self.entries = library, use_custom, entries
        self.detection, self.catalog_path, self.catalog_format = (
            detection, catalog_path, catalog_format
        )  # fmt: skip
        self.psf_lookup, self.said_no_psf, self.known = psf_lookup, False, set()

    def plan(self, index: int, model, entry: dict) -> PlannedImage | str:
        """The plan of one (borrowed) model, or why it is left out."""
        name = str(model.meta.filename or f"image {index}")
        self.known.add(Path(name).name)
        exp_type = _exposure_type(model)
        if exp_type != "WFI_IMAGE":  # expected in a mixed association: not a warning
            reason = f"not an imaging exposure (meta.exposure.type={exp_type})"
            log.info("%s: skipped, %s", name, reason)
            return reason
        reason = _unusable(model)
        if reason:
            log.warning("%s: skipped, %s", name, reason)
            return reason
        source = _catalog_source(self.library, index, entry, model, self.use_custom, self.entries)
        job = None
        if source is None or source.value is None:
            job = self._detection(index, model, name, entry, source)
            source = CatalogSource(str(job.catalog_file), "detection")
        return PlannedImage(_image_of(model, index, name, entry, source), source, job)

    def _detection(self, index, model, name, entry, source) -> DetectionJob:
        """The detection of an image without a catalog (MissingCatalogError without
        detection parameters)."""
        if self.detection is None:
            where = source.origin if source is not None else (
                "meta.tweakreg_catalog or meta.source_catalog"
            )  # fmt: skip
            raise MissingCatalogError(f"{name}: no source catalog ({where} gives none)")
        params = self.detection
        if params.psf_model is None and self.psf_lookup is not None:
            found = self.psf_lookup(model)
            params = replace(params, psf_model=found) if found else params
        if params.psf_model is None and not self.said_no_psf:
            self.said_no_psf = True
            log.info(
                "No PSF model (psf_model, override_epsf): detected positions are fitted "
                "with an empirical symmetric PRF and may carry a PSF-convention offset of a "
                "few milli-pixels"
            )
        image_file = _image_file(self.library, index, entry)
        return _detection_job(model, name, params, self.catalog_path, self.catalog_format,
                              image_file)  # fmt: skip


def _image_of(model, index: int, name: str, entry: dict, source: CatalogSource) -> ImageCatalog:
    """The :class:`ImageCatalog` of a model (its catalog not yet read)."""
    detected = source.origin == "detection"
    found = Path(source.value) if detected else None
    if not detected and source.assigned:
        found = source.resolve()
    return ImageCatalog(
        index=index,
        name=name,
        group_id=str(entry["group_id"]),
        catalog=None,
        wcs=model.meta.wcs,
        wcsinfo={k: float(model.meta.wcsinfo[k]) for k in ("v2_ref", "v3_ref", "roll_ref")},
        epoch=(epoch := exposure_epoch(model.meta)),
        observer=observer_position(model.meta, epoch),
        exposure=_exposure_of(model.meta),
        catalog_name=str(found) if found is not None else "",
        # a detected catalog is the step's own output, not a file the user gave
        catalog_file=(
            str(source.resolve() or "")
            if not detected and isinstance(source.value, (str, Path))
            else ""
        ),
    )


def read_catalogs(plan: CatalogPlan, *, processes: int = 1) -> tuple[TangentPlane, dict, Workers]:
    """Read, normalise and filter each planned catalog and project it into the
    alignment plane: the catalog phase's detection (when the plan still has some) and
    reading.

    Reading each catalog and projecting it (:func:`read_and_project`) is shared with
    ``processes`` worker processes, which can also build the corrected WCSs later; an
    image whose detection is still to do is detected in the same job, just before
    (:func:`detect_and_project`).  Nothing else is opened: the models were read when
    the plan was made.

    Returns
    -------
    plane : TangentPlane
        The images that take part in alignment (``plane.images``), their sources in
        the alignment plane of the first one.
    skipped : dict
        Library index -> reason, for images left out (the plan's, and empty catalogs).
    workers : Workers
        The workers, their context the plane's ``ref``; the caller closes them
        (``with workers:``).

    Raises
    ------
    MissingCatalogError
        A catalog file does not exist.
    CatalogError
        A catalog cannot be read or has no pixel columns.
    """
    reader = _Reader(processes)
    try:
        for planned in plan.images:
            reader.add(planned, plan.catalog_format)
        return reader.finish(plan)
    except BaseException:
        reader.close()
        raise


def collect(library, *, processes: int = 1, **options) -> tuple[TangentPlane, dict, Workers]:
    """The catalog phase in one call: :func:`plan_catalogs`, then :func:`read_catalogs`.

    ``options`` are those of :func:`plan_catalogs`; returns what :func:`read_catalogs`
    returns.  Each image's reading is handed to the workers as soon as it is planned
    (``on_planned``), so that they read catalogs while the next models are opened.
    """
    reader = _Reader(processes)
    fmt = options.get("catalog_format", "ascii.ecsv")
    try:
        plan = plan_catalogs(library, on_planned=lambda p: reader.add(p, fmt), **options)
        return reader.finish(plan)
    except BaseException:
        reader.close()
        raise


class _Reader:
    """The catalogs of a plan, read by workers as they are handed out."""

    def __init__(self, processes: int):
        self.processes, self.workers, self.jobs = processes, Workers(1), []

    def add(self, planned: PlannedImage, catalog_format: str) -> None:
        """Hand one image's detection (if planned) and reading to the workers."""
        image = replace(planned.image)  # the plan's own stays unread
        if self.workers.context is None:  # the first image's plane; workers inherit it
            self.workers = Workers(self.processes, common_plane(image.wcs, image.wcsinfo))
        if planned.detection is not None:
            job = self.workers.submit(detect_and_project, planned.detection, image.name,
                                      image.wcs)  # fmt: skip
        else:
            job = self.workers.submit(read_and_project, planned.source, image.name, image.wcs,
                                      catalog_format)  # fmt: skip
        self.jobs.append((image, job))

    def finish(self, plan: CatalogPlan) -> tuple[TangentPlane, dict, Workers]:
        """Wait for every catalog; the plane, the skipped images and the workers."""
        skipped, images, projections = dict(plan.skipped), [], []
        for image, job in self.jobs:
            image.catalog, xy, outline = job.result()
            if accept(image, plan.n_images, skipped):
                images.append(image)
                projections.append((xy, outline))
        self.jobs = []
        return TangentPlane(images, self.workers.context, projections), skipped, self.workers

    def close(self) -> None:
        self.workers.close()
        self.jobs = []  # a failed job's error holds its frame: no reference cycle


def accept(image: ImageCatalog, n_images: int, skipped: dict[int, str]) -> bool:
    """Whether ``image`` (its catalog read) takes part; if not, say why in ``skipped``."""
    if len(image.catalog) == 0:
        skipped[image.index] = "empty source catalog"
        log.warning("%s: skipped, its catalog has no usable sources", image.name)
        return False
    log.info(
        "Catalog %d of %d: %s, %d sources",
        image.index + 1,
        n_images,
        image.name,
        len(image.catalog),
    )
    return True


def _exposure_type(model) -> str:
    """The image's ``meta.exposure.type`` (``WFI_IMAGE`` when it has none)."""
    return str(getattr(model.meta.exposure, "type", "WFI_IMAGE"))


def _unusable(model) -> str:
    """Why an imaging exposure cannot be aligned ('' when it can)."""
    frames = getattr(meta_get(model.meta, "wcs"), "available_frames", None)
    if frames is None:
        return "it has no WCS (meta.wcs)"
    if "v2v3" not in frames:
        return f"its WCS has no 'v2v3' frame to put the correction after (frames: {frames})"
    missing = [
        k for k in ("v2_ref", "v3_ref", "roll_ref") if meta_get(model.meta.wcsinfo, k) is None
    ]
    if missing:
        return f"meta.wcsinfo has no {', '.join(missing)}"
    return (
        _absurd_wcsinfo(model.meta.wcsinfo)
        or detector_mismatch(model.meta, meta_get(model.meta, "wcs"))
        or implausible_epoch(model.meta)
    )


#: Limits of the ``meta.wcsinfo`` values the alignment uses: keyword -> (low, high).
_WCSINFO_LIMITS = {
    "v2_ref": (-36000.0, 36000.0),  # arcsec: every aperture is within 10 deg of V1
    "v3_ref": (-36000.0, 36000.0),
    "roll_ref": (-360.0, 360.0),  # deg
    "ra_ref": (-360.0, 360.0),
    "dec_ref": (-90.0, 90.0),
}


def _exposure_of(meta) -> str:
    """The exposure an image belongs to, for messages (``ImageCatalog.exposure``)."""
    obs = meta_get(meta, "observation") or {}
    visit, exposure = meta_get(obs, "visit_id"), meta_get(obs, "exposure")
    if exposure not in (None, "", "?", -999999):
        return f"{visit}_{exposure}" if visit not in (None, "", "?") else str(exposure)
    info = meta_get(meta, "wcsinfo") or {}
    pointing = [meta_get(info, k) for k in ("ra_ref", "dec_ref", "roll_ref")]
    if any(v is None for v in pointing):
        return ""
    try:
        return "pointing ({:.5f}, {:.5f}, {:.3f})".format(*map(float, pointing))
    except (TypeError, ValueError):
        return ""


def _absurd_wcsinfo(wcsinfo) -> str:
    """Why ``meta.wcsinfo``'s reference values cannot be used ('' when they can).

    Values must be finite numbers within :data:`_WCSINFO_LIMITS`; ``ra_ref`` and
    ``dec_ref`` are checked when present.
    """
    for key, (low, high) in _WCSINFO_LIMITS.items():
        value = meta_get(wcsinfo, key)
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            return f"meta.wcsinfo.{key}={value!r} is not a number"
        if not (np.isfinite(number) and low <= number <= high):
            return f"meta.wcsinfo.{key}={number!r} is not a finite value in [{low:g}, {high:g}]"
    return ""


def update_sky_columns(table: Table, wcs) -> list[str]:
    """Recompute the sky columns of ``table`` from its pixel columns with ``wcs``.

    Every ``(x, y, ra, dec)`` quadruple of :data:`SKY_COLUMNS` whose four columns
    are all present is updated; other columns are left alone (no column is added,
    so a file's layout is kept).  Values are written into the existing columns,
    keeping their type and unit.

    .. warning:: Modifies ``table`` in place.

    Returns
    -------
    list of str
        The sky columns updated.
    """
    updated = []
    for xcol, ycol, racol, deccol in SKY_COLUMNS:
        if not all(c in table.colnames for c in (xcol, ycol, racol, deccol)):
            continue
        ra, dec = wcs.pixel_to_world_values(
            np.asarray(table[xcol], dtype=float), np.asarray(table[ycol], dtype=float)
        )
        table[racol][...] = ra
        table[deccol][...] = dec
        updated += [c for c in (racol, deccol) if c not in updated]
    return updated


def update_catalog_file(
    path: str | Path, wcs, catalog_format: str = "ascii.ecsv"
) -> list[str]:
    """Recompute the sky columns of a source catalog file with ``wcs``.

    The columns are those of :func:`update_sky_columns`.

    A Parquet file keeps its schema (column order and types) and schema metadata
    (astropy units); other files are read and written with astropy in
    ``catalog_format``.  The file is replaced atomically, and only when a column
    changes.

    .. warning:: Rewrites the file at ``path``.

    Returns
    -------
    list of str
        The sky columns updated.

    Raises
    ------
    MissingCatalogError
        The file does not exist.
    CatalogError
        It cannot be read or written.
    """
    from ._io import write_atomically

    path = Path(path)
    if not path.is_file():
        raise MissingCatalogError(f"source catalog {path} does not exist")
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            original = pq.read_table(path)
            table = Table(
                {
                    c: original.column(c).to_numpy(zero_copy_only=False)
                    for c in original.column_names
                }
            )
            updated = update_sky_columns(table, wcs)
            if updated:
                columns = [
                    pa.array(np.asarray(table[c]), type=original.schema.field(c).type)
                    if c in updated
                    else original.column(c)
                    for c in original.column_names
                ]
                new = pa.Table.from_arrays(columns, schema=original.schema)
                write_atomically(path, lambda p: pq.write_table(new, p))
        else:
            table = Table.read(path, format=catalog_format)
            updated = update_sky_columns(table, wcs)
            if updated:
                write_atomically(path, lambda p: table.write(p, format=catalog_format))
    except (OSError, ValueError, TypeError) as err:
        raise CatalogError(f"source catalog {path} cannot be updated: {err}") from err
    return updated


def read_and_project(ref, source: CatalogSource, name: str, wcs, catalog_format: str):
    """Read an image's catalog (:func:`~roman_tweakreg.catalogs.load_catalog`) and
    :func:`~roman_tweakreg.plane.project` it: returns the catalog, the positions and the outline."""
    table = load_catalog(source, name, wcs, catalog_format)
    return (table, *project(ref, wcs, table["x"], table["y"]))


def detect_and_project(ref, job: DetectionJob, name: str, wcs):
    """Run a planned detection (it writes the image's catalog file), then read the
    catalog it made as :func:`read_and_project` does (from memory: the same table)."""
    table = job.run()
    source = CatalogSource(table, "detection")
    return read_and_project(ref, source, name, wcs, job.catalog_format)
