"""TweakRegStep: align Roman WFI L2 images to each other and to a reference catalog."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from roman_datamodels import datamodels as rdm
from stpipe import Step, config_parser
from stpipe.library import AbstractModelLibrary

from . import align, catalogs, outputs, parameters, results
from .errors import InvalidParameterError, ReferenceCatalogError
from .geometry import footprint_cone
from .library import open_library
from .matching import FitParameters, FitResult
from .outputs import check_writable
from .refcat import DEFAULT_REFCAT, check_refcat, get_reference_catalog

if TYPE_CHECKING:
    from .library import ModelLibrary

__all__ = ["TweakRegStep", "validate_parameters"]

log = logging.getLogger(__name__)


def validate_parameters(pars: dict) -> None:
    """Check every parameter once, before any I/O.

    Each parameter of ``pars`` defined in :mod:`roman_tweakreg.parameters` is checked
    against its type and accepted values (bounds, choices), then the rules between
    parameters (``tolerance`` at most ``searchrad``); see
    :func:`roman_tweakreg.parameters.validate`.

    Raises
    ------
    InvalidParameterError
        Naming the parameter, its value and what is expected.
    """
    parameters.validate(pars)


def _detection_parameters(pars: dict):
    from .detection import DetectionParameters

    names = parameters.names("detection")
    return DetectionParameters(**{name: pars[name] for name in names}).validate()


def _fit_parameters(pars: dict, prefix: str) -> FitParameters:
    return FitParameters(**{name: pars[prefix + name] for name in parameters.FIT_NAMES})


class TweakRegStep(Step):
    """Align Roman WFI images: each exposure to the others, then all to a reference catalog.

    See the package documentation for inputs, parameters and outputs.

    Attributes
    ----------
    timings : dict
        After a run: seconds per phase of the step's clock (``catalogs``,
        ``relative``, ``absolute``, ``update``, ``save`` when outputs are saved, and
        ``total``), as logged and written in the report.
    """

    # Not romancal's "tweakreg": both registered, `strun tweakreg` would fail for romancal users.
    class_alias = "roman_tweakreg"
    reference_file_types: ClassVar = []

    #: Generated from :data:`roman_tweakreg.parameters.PARAMETERS` (see docs/parameters.rst).
    spec = parameters.spec()

    # -- stpipe hooks: this step uses no reference files and never asks CRDS --
    @classmethod
    def _datamodels_open(cls, init, **kwargs):
        return rdm.open(init, **kwargs)

    @classmethod
    def _get_crds_parameters(cls, dataset):
        return {}, "roman"

    @classmethod
    def get_config_from_reference(cls, dataset, disable=None, crds_observatory=None):
        """Return no parameters: TweakRegStep has no CRDS parameter reference file."""
        return config_parser.ConfigObj()

    # -- the story ------------------------------------------------------------
    def process(self, input_data, *more_inputs) -> ModelLibrary:
        """Align the images of ``input_data`` and return them as a ModelLibrary.

        Several inputs (``strun roman_tweakreg.TweakRegStep a.asdf b.asdf``) are
        aligned together, as the list ``[input_data, *more_inputs]``.  In-memory
        models given as input are updated in place; files are never written to.
        """
        pars = self.get_pars()
        validate_parameters(pars)
        detection = _detection_parameters(pars)
        refcat_name = (self.abs_refcat or DEFAULT_REFCAT).strip()
        check_refcat(refcat_name)
        self._check_output_places()
        if more_inputs:
            input_data = _as_list(input_data) + [m for i in more_inputs for m in _as_list(i)]
        return self._align(input_data, pars, detection, refcat_name)

    def _align(self, input_data, pars, detection, refcat_name) -> ModelLibrary:
        self._clock = clock = _Clock()
        self.timings = clock.timings
        with clock.phase("catalogs"):
            library = open_library(
                input_data,
                on_disk=self.on_disk,
                named_outputs=self._saves_outputs() and not self.output_file,
            )
            plane, skipped, workers = self._prepare(library, detection)
        with workers:
            images = plane.images
            log.info(
                "%d images to align in %d groups; %d skipped",
                len(images),
                len({i.group_id for i in images}),
                len(skipped),
            )
            relative = {}
            if len({i.group_id for i in images}) > 1:
                with clock.phase("relative"):
                    relative = align.relative_align(
                        plane,
                        _fit_parameters(pars, ""),
                        enforce_user_order=self.enforce_user_order,
                        expand_refcat=self.expand_refcat,
                    )
                for group, result in relative.items():
                    _log_fit("Relative", result, [i for i in images if i.group_id == group])
            with clock.phase("absolute"):
                absolute = self._absolute(plane, pars, refcat_name, relative) if images else {}
            with clock.phase("update"):
                outcomes = results.outcomes(plane, relative, absolute, skipped, workers)
                self._write(library, outcomes)
                if self.update_source_catalog_coordinates:
                    self._update_catalog_files(plane, outcomes)
        # the report is written last: after the outputs when stpipe saves them (save_model)
        self._report_args = (pars, clock.timings) if self.report else None
        if self.report and not self._saves_outputs():
            self._write_report(library, outputs=None)
        return library

    def _prepare(self, library, detection):
        """Read every catalog and project it into the alignment plane
        (:func:`~roman_tweakreg.catalogs.collect` with the step's parameters).

        Returns the plane, the skipped images and the workers (to be closed by the
        caller), which also build the corrected WCSs later.
        """
        return catalogs.collect(
            library,
            processes=self.processes,
            use_custom_catalogs=self.use_custom_catalogs,
            catfile=self.catfile,
            catalog_format=self.catalog_format,
            detection=detection,
            catalog_path=self._catalog_folder(),
        )

    def _write_report(self, library, outputs: list | None) -> None:
        """Write the JSON report; ``outputs`` lists each image's output path (None: none)."""
        from .errors import TweakRegError
        from .report import build_report, write_report

        args, self._report_args = getattr(self, "_report_args", None), None
        if args is None:
            return
        pars, timings = args
        try:
            report = build_report(library, parameters=pars, timings=timings, outputs=outputs)
            write_report(report, self._report_path())
        except (TweakRegError, OSError) as err:  # a report must never lose the alignment
            log.warning("Report not written: %s", err)

    def _report_path(self) -> Path:
        path = Path(self.report)
        if not path.is_absolute() and self.output_dir:
            path = Path(self.output_dir) / path
        return path

    # -- output places, checked before any work ---------------------------------------------
    def _saves_outputs(self) -> bool:
        """Whether stpipe will save the outputs after :meth:`process` (``save_results``)."""
        return bool(self.save_results or self.output_file)

    def _catalog_folder(self) -> str:
        """Where detected catalogs go: ``catalog_path``, else ``output_dir``, else ''."""
        return self.catalog_path or self.output_dir or ""

    def _check_output_places(self) -> None:
        """Check that every folder this run will write into can be written, before any work.

        Raises
        ------
        OutputError
            Naming the folder, the parameter that chose it and the reason.
        """
        places = []
        if self._saves_outputs():
            folder = Path(self.make_output_path(basepath="probe.asdf")).parent
            places.append((folder, "output_dir (the models' outputs)"))
        if self.report:
            places.append((self._report_path().parent, "report"))
        if self.catalog_path:
            places.append((Path(self.catalog_path), "catalog_path"))
        if self.save_abs_catalog:
            places.append((self._refcat_folder(), "save_abs_catalog"))
        for folder, what in places:
            check_writable(folder, what)

    def _refcat_folder(self) -> Path:
        return Path(self.output_dir or self.catalog_path or ".")

    def _absolute(self, plane, pars, refcat_name, relative) -> dict:
        """Absolute alignment of each rigid set of groups; group id -> result."""
        abs_pars = _fit_parameters(pars, "abs_")
        images = plane.images
        ra, dec, radius = footprint_cone(plane)
        radius += abs_pars.searchrad / 3600.0
        epochs = [i.epoch for i in images if i.epoch is not None]
        start = time.perf_counter()
        try:
            refcat = get_reference_catalog(
                refcat_name,
                ra,
                dec,
                radius,
                epoch=min(epochs) if epochs else None,
                min_sources=abs_pars.minobj,
                timeout=parameters.service_timeout(pars),
                retries=self.abs_refcat_retries,
                cache_dir=self.abs_refcat_cache,
                base_url=self.abs_refcat_url or None,
            )
        except ReferenceCatalogError as err:
            log.warning("Absolute alignment skipped, relative alignment kept: %s", err)
            skipped = FitResult("SKIPPED", str(err), refcat=refcat_name)
            return dict.fromkeys({i.group_id for i in images}, skipped)
        log.info(
            "Reference catalog %s (%s, epoch %s): %d stars in the cone of %.4f deg "
            "around (%.6f, %.6f), obtained in %.2f s",
            refcat.name,
            refcat.source or "-",
            "unknown" if refcat.epoch is None else f"{refcat.epoch:g}",
            len(refcat),
            radius,
            ra,
            dec,
            time.perf_counter() - start,
        )
        for message in refcat.warnings:
            log.warning("%s", message)
        if self.save_abs_catalog:
            self._save_refcat(refcat, min(epochs) if epochs else None)
        out = {}
        for members in align.rigid_sets(images, relative):
            result = align.absolute_align(
                plane, refcat.positions, abs_pars, members=members, refcat_name=refcat.name
            )
            if not result.applied:
                log.warning(
                    "Absolute alignment to %s failed, relative alignment kept: %s",
                    refcat.name,
                    result.reason,
                )
            out.update(dict.fromkeys({images[i].group_id for i in members}, result))
            out.update(align.group_results(result))  # each group's own figures
            for group in dict.fromkeys(images[i].group_id for i in members):
                own = [images[i] for i in members if images[i].group_id == group]
                _log_fit("Absolute", out[group], own, refcat.name)
        return out

    def _save_refcat(self, refcat, epoch) -> None:
        stem = Path(refcat.name).stem.lower()
        path = self._refcat_folder() / f"fit_{stem}_ref.ecsv"
        try:
            refcat.write(path, epoch)
        except (OSError, MemoryError) as err:
            log.warning("save_abs_catalog: the reference catalog was not saved: %s: %s", path, err)
            return
        log.info("Saved the reference catalog used (at epoch %s) in %s", epoch, path)

    @staticmethod
    def _write(library, outcomes) -> None:
        with library:
            for index in range(len(library)):
                model = library.borrow(index)
                try:
                    wcs, fit, status, name, catalog_name = outcomes[index]
                    results.update_model(model, wcs, fit, status, name)
                    if catalog_name:
                        model.meta["tweakreg_catalog"] = catalog_name
                        if "source_catalog" not in model.meta:
                            model.meta["source_catalog"] = {}
                        model.meta.source_catalog["tweakreg_catalog_name"] = catalog_name
                    log.debug("Updated image %d of %d", index + 1, len(library))
                finally:
                    library.shelve(model, index)

    def _update_catalog_files(self, plane, outcomes) -> None:
        """Rewrite the sky columns of each aligned image's catalog file (opt-in parameter)."""
        for image in plane.images:
            wcs, _, status, _, _ = outcomes[image.index]
            if status is not results.Status.COMPLETE or wcs is None:
                continue
            if not image.catalog_file:
                log.info("%s: in-memory catalog, no catalog file to update", image.name)
                continue
            self.update_catalog_coordinates(image.catalog_file, wcs)

    # -- romancal's ExposurePipeline calls these on its tweakreg step ----------
    def _update_catalog_coordinates(self, catalog, tweaked_wcs) -> None:
        """Recompute the RA/Dec columns of an in-memory source catalog with ``tweaked_wcs``.

        The name and arguments romancal's ``ExposurePipeline`` uses after the step;
        see :func:`roman_tweakreg.catalogs.update_sky_columns`.

        .. warning:: Modifies ``catalog`` (an astropy Table) in place.
        """
        catalogs.update_sky_columns(catalog, tweaked_wcs)

    def update_catalog_coordinates(self, tweakreg_catalog_name, tweaked_wcs) -> None:
        """Recompute the RA/Dec columns of a source catalog file with ``tweaked_wcs``.

        All other columns, the column types and the Parquet schema metadata are kept;
        the file is replaced atomically.  See
        :func:`roman_tweakreg.catalogs.update_catalog_file`.

        .. warning:: Rewrites the file ``tweakreg_catalog_name``.
        """
        updated = catalogs.update_catalog_file(
            tweakreg_catalog_name, tweaked_wcs, self.catalog_format
        )
        if updated:
            log.info("Updated %s of %s", ", ".join(updated), tweakreg_catalog_name)
        else:
            log.warning("%s has no RA/Dec columns to update", tweakreg_catalog_name)

    # -- outputs are written whole or not at all (see roman_tweakreg.outputs) ----
    def save_model(self, model, suffix=None, idx=None, output_file=None, force=False, **components):
        """Save like stpipe, but each model through a temporary file renamed into place.

        A library is saved model by model, each with its WCS product
        ``<name>_wcs.asdf`` (a roman_datamodels ``WfiWcsModel``, as romancal writes),
        then the report (``report``) is written, saying which outputs exist, also when
        saving failed or was interrupted.  The time it took is ``timings["save"]``.

        Each model is named after its ``meta.filename`` (``output_use_model``) unless
        ``output_file`` is given: then, as in other stpipe steps, after
        ``output_file`` with the step suffix, and the model's index when the library
        holds several (``aligned.asdf`` gives ``aligned_tweakregstep.asdf`` for one
        model, ``aligned_0_tweakregstep.asdf``, ``aligned_1_tweakregstep.asdf`` ... for
        several; the WCS products ``aligned_0_wcs.asdf`` ...).

        Raises
        ------
        OutputError
            When an output cannot be written (full disk, file size limit, memory):
            naming the file and which outputs were written before it.
        """
        if not isinstance(model, (AbstractModelLibrary, rdm.DataModel)):
            return super().save_model(
                model, suffix=suffix, idx=idx, output_file=output_file, force=force, **components
            )
        output_file = output_file or self.output_file
        if not force and not self.save_results and not output_file:
            return None
        if not isinstance(model, AbstractModelLibrary):
            path = outputs.output_path(self, model, suffix, idx, output_file, components)
            return outputs.save_model(model, path)
        clock = getattr(self, "_clock", None) or _Clock()
        written: list = [None] * len(model)
        try:
            with clock.phase("save"):
                outputs.save_library(
                    self, model, suffix=suffix, output_file=output_file,
                    components=components, written=written, processes=self.processes,
                    batch=4 * max(self.processes, 2) if self.on_disk else None,
                )  # fmt: skip
        finally:
            self.timings = clock.timings
            self._write_report(model, outputs=[None if p is None else str(p) for p in written])
        return written


def _as_list(item) -> list:
    """One of several command-line inputs as a list of models or ASDF files."""
    if isinstance(item, (list, tuple)):
        return list(item)
    is_json = isinstance(item, (str, Path)) and Path(item).suffix.lower() == ".json"
    if is_json or isinstance(item, (AbstractModelLibrary, dict)):
        raise InvalidParameterError(
            f"several inputs given, among them the association {item}: several inputs are "
            "aligned together only as ASDF files or models; for more, give one association "
            "listing every file, made with: roman-tweakreg asn FILE... -o asn.json"
        )
    return [item]


def _log_fit(phase: str, result: FitResult, images: list, refcat: str = "") -> None:
    """Log one line summarising a group's (or a rigid set's) fit of one phase."""
    groups = sorted({i.group_id for i in images})
    what = f"group {groups[0]}" if len(groups) == 1 else f"groups {', '.join(groups)}"
    target = f" to {refcat}" if refcat else ""
    if result.status == "REFERENCE":
        log.info("%s fit, %s (%d images): reference of the others", phase, what, len(images))
        return
    fit = result.fit or {}
    if "shift" not in fit:
        log.info(
            "%s fit%s, %s (%d images): %d matches, %s: %s",
            phase, target, what, len(images), result.nmatches, result.status, result.reason,
        )  # fmt: skip
        return
    shift = 1000.0 * np.asarray(fit["shift"], float)
    log.info(
        "%s fit%s, %s (%d images): %d matches, shift (%.2f, %.2f) mas, rotation %.6f deg, "
        "rms %.2f mas, mae %.2f mas: %s%s",
        phase, target, what, len(images), result.nmatches, shift[0], shift[1],
        float(fit.get("<rot>", fit.get("proper_rot", 0.0))), 1000.0 * float(fit["rmse"]),
        1000.0 * float(fit["mae"]), result.status, f" ({result.reason})" if result.reason else "",
    )  # fmt: skip


class _Clock:
    """Wall time per phase, logged as the run progresses; ``timings`` is the step's."""

    def __init__(self):
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        log.info("Phase %s started (%.1f s elapsed)", name, t - self.start)
        try:
            yield
        finally:  # also a phase that failed or was interrupted took its time
            self.timings[name] = time.perf_counter() - t
            self.timings["total"] = time.perf_counter() - self.start
        log.info("Phase %s done in %.2f s", name, self.timings[name])
