"""TweakRegStep: align Roman WFI L2 images to each other and to a reference catalog."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from roman_datamodels import datamodels as rdm
from stpipe import Step, config_parser
from stpipe.library import AbstractModelLibrary

from . import align, catalogs, outputs, parameters, results
from ._parallel import refuse_in_main_import, start_server, usable_cores
from .errors import (
    InvalidParameterError,
    PSFModelError,
    ReferenceCatalogError,
    StepParameterError,
)
from .library import open_library
from .matching import FitParameters, FitResult
from .outputs import check_writable
from .plane import footprint_cone
from .refcat import DEFAULT_REFCAT, check_refcat, get_reference_catalog

if TYPE_CHECKING:
    from .library import ModelLibrary

__all__ = ["TweakRegStep", "result_line", "validate_parameters"]

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

    Input: an association, ASDF files or models with source catalogs; outputs:
    <name>_tweakregstep.asdf and <name>_wcs.asdf. Each parameter below gives its
    unit; the package documentation (docs/parameters.rst) has every parameter,
    input and output. After a run, the step's timings attribute gives the seconds
    per phase.
    """

    #: After a run: seconds per phase of the step's clock (``catalogs``, ``relative``,
    #: ``absolute``, ``update``, ``save`` when outputs are saved, and ``total``), as
    #: logged and written in the report.
    timings: dict

    # Not romancal's "tweakreg": both registered, `strun tweakreg` would fail for romancal users.
    class_alias = "roman_tweakreg"
    #: The ePSF of source detection: stpipe makes the ``override_epsf`` parameter.
    reference_file_types: ClassVar = ["epsf"]
    #: A pipeline never fetches it ahead: CRDS is asked only as :meth:`_crds_epsf` says.
    prefetch_references: ClassVar = False

    #: Generated from :data:`roman_tweakreg.parameters.PARAMETERS` (see docs/parameters.rst).
    spec = parameters.spec()

    def __init__(self, *args, **kwargs):
        """Make the step (as :class:`stpipe.Step` does), then check its parameters.

        Raises
        ------
        StepParameterError
            For a parameter outside what it accepts (logged as one ERROR line, which
            is all ``strun`` shows).
        """
        refuse_in_main_import()  # a worker process importing an unguarded script stops
        super().__init__(*args, **kwargs)
        _checked(validate_parameters, self.get_pars())

    # -- stpipe hooks: no CRDS parameter file; CRDS reference files only as _crds_epsf says --
    @classmethod
    def _datamodels_open(cls, init, **kwargs):
        return rdm.open(init, **kwargs)

    @classmethod
    def _get_crds_parameters(cls, dataset):
        if isinstance(dataset, rdm.DataModel):  # an image's (the epsf lookup)
            return dataset.get_crds_parameters(), "roman"
        return {}, "roman"

    @classmethod
    def get_config_from_reference(cls, dataset, disable=None, crds_observatory=None):
        """Return no parameters: TweakRegStep has no CRDS parameter reference file."""
        return config_parser.ConfigObj()

    # -- the story ------------------------------------------------------------
    def process(self, input_data, *more_inputs) -> ModelLibrary:
        """Align the images of ``input_data`` and return them as a ModelLibrary.

        Several inputs (``strun roman_tweakreg.TweakRegStep a.asdf b.asdf``) are
        aligned together, as the list ``[input_data, *more_inputs]``.  A
        :class:`~roman_tweakreg.catalogs.PlannedLibrary` (a library and its catalog plan,
        :meth:`plan_catalogs`) is aligned with the catalogs its plan names, without
        choosing them again.  In-memory models given as input are updated in place;
        files are never written to.
        """
        pars = self.get_pars()
        _checked(validate_parameters, pars)
        detection = _detection_parameters(pars)
        detection = replace(detection, psf_model=self._psf_model())
        refcat_name = (self.abs_refcat or DEFAULT_REFCAT).strip()
        _checked(check_refcat, refcat_name)
        self._check_output_places()
        if self.processes > usable_cores():
            log.info(
                "processes=%d capped at the %d usable cores of this process",
                self.processes,
                usable_cores(),
            )
        if more_inputs:
            input_data = _as_list(input_data) + [m for i in more_inputs for m in _as_list(i)]
        return self._align(input_data, pars, detection, refcat_name)

    def _align(self, input_data, pars, detection, refcat_name) -> ModelLibrary:
        start_server(self.processes)  # in the background, while the models are opened
        self._clock = clock = _Clock()
        self.timings = clock.timings
        with clock.phase("catalogs"):
            plan = None
            if isinstance(input_data, catalogs.PlannedLibrary):  # planned by the caller
                library, plan, input_data = input_data.library, input_data.plan, input_data.source
            else:
                library = open_library(
                    input_data,
                    on_disk=self.on_disk,
                    named_outputs=self._saves_outputs() and not self.output_file,
                )
            self._check_inputs_not_overwritten(library, input_data)
            plane, skipped, workers = self._prepare(library, detection, plan)
        with workers:
            self._check_catalogs_not_overwritten(plane)
            images = plane.images
            log.info(
                "%d images to align in %d groups; %d skipped",
                len(images),
                len({i.group_id for i in images}),
                len(skipped),
            )
            for group, exposures in align.mixed_groups(images).items():
                log.warning(
                    "Group %s holds %d exposures (%s): they get one correction; where their "
                    "pointings differ, give each exposure its own group (group_id)",
                    group, len(exposures), ", ".join(exposures),
                )  # fmt: skip
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
        self._result_line = result_line(
            [outcome[2] for _, outcome in sorted(outcomes.items())], absolute, refcat_name
        )
        # the report is written last: after the outputs when stpipe saves them (save_model)
        self._report_args = (pars, clock.timings) if self.report else None
        if self.report and not self._saves_outputs():
            self._write_report(library, outputs=None)
        if not self._saves_outputs():
            self._log_result()
        return library

    # -- the ePSF of source detection -------------------------------------------------------
    def _psf_model(self) -> str | None:
        """``psf_model``, else the ``override_epsf`` file, else None (checked here).

        Raises
        ------
        PSFModelError
            The file or folder does not exist, or ``override_epsf`` is a model in
            memory (a file name is needed: detection may run in other processes).
        """
        if self.psf_model:
            if not Path(self.psf_model).exists():
                raise PSFModelError(f"psf_model={self.psf_model!r}: no such file or folder")
            return self.psf_model
        override = self.get_ref_override("epsf")
        if override is None or (isinstance(override, str) and override.strip() in ("", "N/A")):
            return None
        if not isinstance(override, str):
            raise PSFModelError(
                f"override_epsf: a {type(override).__name__} in memory; give the ePSF file's name"
            )
        if not Path(override).is_file():
            raise PSFModelError(f"override_epsf={override!r}: no such file")
        return self.get_reference_file(None, "epsf")  # recorded as stpipe records overrides

    def _crds_epsf(self):
        """The CRDS lookup of each image's ``epsf`` when CRDS is configured, else None.

        Only without ``psf_model`` and ``override_epsf``, and when ``CRDS_SERVER_URL``
        or ``CRDS_PATH`` is set (CRDS can then be reached): the returned callable
        asks CRDS (stpipe's :meth:`get_reference_file`) for a model's ``epsf``; the
        first failure is logged in one line and no image asks again (the empirical
        PRF is used).
        """
        import os

        if self.psf_model or self.get_ref_override("epsf") is not None:
            return None
        if not (os.environ.get("CRDS_SERVER_URL") or os.environ.get("CRDS_PATH")):
            return None
        failed = []

        def lookup(model) -> str | None:
            if failed:
                return None
            try:
                path = self.get_reference_file(model, "epsf")
            # CRDS, its network and its cache: any failure; CRDS ends with sys.exit(-1)
            # when it has neither a server nor a cached context
            except (Exception, SystemExit) as err:
                failed.append(err)
                log.warning(
                    "CRDS epsf reference not available (%s: %s): empirical PRF used",
                    type(err).__name__,
                    err,
                )
                return None
            return path if path and path != "N/A" else None

        return lookup
    def _log_result(self) -> None:
        """Log the run's one-line result (:func:`result_line`), last (after saving)."""
        line, self._result_line = getattr(self, "_result_line", None), None
        if line:
            log.info("%s", line)

    def plan_catalogs(self, library) -> catalogs.CatalogPlan:
        """The catalog each image of ``library`` uses, chosen with this step's parameters.

        The first part of the catalog phase (:func:`roman_tweakreg.catalogs.plan_catalogs`):
        each model is borrowed once and its metadata read; no catalog is read or
        written.  A caller that runs the plan's detections itself (the batch, as Dask
        tasks) then runs the step on :class:`~roman_tweakreg.catalogs.PlannedLibrary`
        ``(library, plan.detected(), source)``: the step reads the catalogs as planned.

        Raises
        ------
        StepParameterError
            For a parameter outside what it accepts.
        PSFModelError
            ``psf_model`` or ``override_epsf`` names no file.
        MissingCatalogError, CatalogError
            As :func:`roman_tweakreg.catalogs.plan_catalogs`.
        """
        pars = self.get_pars()
        _checked(validate_parameters, pars)
        detection = replace(_detection_parameters(pars), psf_model=self._psf_model())
        return catalogs.plan_catalogs(library, **self._catalog_options(detection))

    def _catalog_options(self, detection) -> dict:
        """The options of :func:`roman_tweakreg.catalogs.plan_catalogs` this step gives."""
        return {
            "use_custom_catalogs": self.use_custom_catalogs,
            "catfile": self.catfile,
            "catalog_format": self.catalog_format,
            "detection": detection,
            "catalog_path": self._catalog_folder(),
            "psf_lookup": self._crds_epsf(),
        }

    def _prepare(self, library, detection, plan=None):
        """The catalog phase: plan (unless the caller planned), detect, read and project
        every catalog into the alignment plane (:func:`~roman_tweakreg.catalogs.collect`,
        or :func:`~roman_tweakreg.catalogs.read_catalogs` of the caller's ``plan``).

        Returns the plane, the skipped images and the workers (to be closed by the
        caller), which also build the corrected WCSs later.
        """
        if plan is not None:
            return catalogs.read_catalogs(plan, processes=self.processes)
        return catalogs.collect(
            library, processes=self.processes, **self._catalog_options(detection)
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

    def _check_inputs_not_overwritten(self, library, input_data) -> None:
        """Refuse, before any work, every output this run names that is one of its inputs.

        The outputs named here are those known before the alignment: each model's
        output and ``_wcs.asdf`` product (as stpipe will name them), the report, the
        reference catalog of ``save_abs_catalog`` and the catalogs detection would write;
        the inputs: the model files, the association, the catfile and local
        ``abs_refcat`` files.  The inputs are kept (``_inputs``) so that saving checks
        the outputs' final names again.  See
        :func:`roman_tweakreg.outputs.check_output_files` (also the names' length).

        Raises
        ------
        OutputError
            Naming the output, the input and the parameters that chose the name; or an
            output whose name is too long for its folder, or for a Roman file's
            ``meta.filename`` (:func:`roman_tweakreg.outputs.check_model_output_names`).
        """
        from .detection import catalog_filename
        from .library import member_dir
        from .refcat import split_refcat

        inputs: list[tuple[Path, str]] = []
        if isinstance(input_data, (str, Path)) and Path(input_data).suffix.lower() == ".json":
            inputs.append((Path(input_data), "the association"))
        names = []
        members = library.asn["products"][0]["members"]
        for index, entry in enumerate(members):
            expname = entry.get("expname")
            if not isinstance(expname, (str, Path)) or not str(expname):
                names.append(None)
                continue
            names.append(Path(str(expname)).name)
            folder = member_dir(library, index, entry)
            if folder is not None:
                inputs.append((folder / Path(str(expname)).name, f"input model {index}"))
        if self.catfile:
            inputs.append((Path(self.catfile), "the catfile"))
        for entry in split_refcat(self.abs_refcat):
            if Path(entry).expanduser().is_file():
                inputs.append((Path(entry).expanduser(), "abs_refcat"))
        self._inputs = inputs
        planned = []
        naming = self._naming()
        n = len(members)
        if self._saves_outputs():
            for index, name in enumerate(names):
                if name is None and not self.output_file:
                    continue
                idx = index if n > 1 else None
                origin = "" if self.output_file else f" from the input's file name {name!r}"
                for suffix, what in ((None, "model output"), ("wcs", "_wcs.asdf product")):
                    path = outputs.output_name(self, name, suffix, idx, self.output_file, {})
                    planned.append((path, f"the {what} of image {index}, named{origin} by "
                                          f"{naming}"))  # fmt: skip
        outputs.check_model_output_names(planned)
        if self.report:
            planned.append((self._report_path(), f"the report, named by report={self.report!r}"
                            + (f", output_dir={self.output_dir!r}" if self.output_dir else "")))
        if self.save_abs_catalog:
            for stem in _refcat_stems(split_refcat(self.abs_refcat)):
                planned.append((self._refcat_folder() / f"fit_{stem}_ref.ecsv",
                                "the reference catalog saved by save_abs_catalog"))
        outputs.check_output_files(planned, inputs)
        self._planned = planned
        folder, detected = self._catalog_folder(), []
        for index, name in enumerate(names):
            if name is not None:
                path = catalog_filename(name, folder or Path.cwd(), self.catalog_format)
                detected.append((path, f"the catalog detection would write for image {index} "
                                      f"(catalog_path={self.catalog_path!r}, output_dir="
                                      f"{self.output_dir!r})"))  # fmt: skip
        outputs.check_output_files(detected, inputs, check_names=False)

    def _check_catalogs_not_overwritten(self, plane) -> None:
        """Refuse, before the alignment, outputs that are one of the catalog files read.

        Catalog files are known once read (the models name them); they join the inputs
        checked when saving.
        """
        read = [(Path(i.catalog_file), f"the catalog of image {i.index}")
                for i in plane.images if i.catalog_file]  # fmt: skip
        self._inputs = [*getattr(self, "_inputs", []), *read]
        outputs.check_output_files(getattr(self, "_planned", []), read)

    def _naming(self) -> str:
        """The parameters that name the models' outputs, for messages."""
        suffix = self.suffix or self.default_suffix()
        parts = [f"output_dir={self.output_dir!r}" if self.output_dir else "no output_dir"]
        if self.output_file:  # stpipe names outputs after its file name only
            parts.append(f"output_file={Path(self.output_file).name!r}")
        parts.append(f"suffix={suffix!r}")
        return ", ".join(parts)

    def _refcat_folder(self) -> Path:
        return Path(self.output_dir or self.catalog_path or ".")

    def _absolute(self, plane, pars, refcat_name, relative) -> dict:
        """Absolute alignment of each rigid set of groups; plane index -> the fit as the
        image's group sees it (:func:`~roman_tweakreg.align.group_results`)."""
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
                max_bytes=self.abs_refcat_max_bytes,
            )
        except ReferenceCatalogError as err:
            log.warning("Absolute alignment skipped, relative alignment kept: %s", err)
            skipped = FitResult("SKIPPED", str(err), refcat=refcat_name)
            return dict.fromkeys(range(len(images)), skipped)
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
        observers = _observers(images)
        out: dict = {}
        for members in align.rigid_sets(images, relative):
            result = align.absolute_align(
                plane, refcat.placed, abs_pars, members=members, refcat_name=refcat.name,
                observers=observers,
            )  # fmt: skip
            if not result.applied:
                log.warning(
                    "Absolute alignment to %s failed, relative alignment kept: %s",
                    refcat.name,
                    result.reason,
                )
            own = align.group_results(result)  # each group's own figures
            for group in dict.fromkeys(images[i].group_id for i in members):
                mine = [i for i in members if images[i].group_id == group]
                view = own.get(group, result)
                view.refused = result.refused
                # keyed by image: a group split by the relative per-image gates has two
                out.update(dict.fromkeys(mine, view))
            # one line per fit: the groups of a rigid set are moved by one correction
            _log_fit("Absolute", result, [images[i] for i in members], refcat.name)
        return out

    def _save_refcat(self, refcat, epoch) -> None:
        stem = Path(refcat.name).stem.lower()
        path = self._refcat_folder() / f"fit_{stem}_ref.ecsv"
        try:
            outputs.check_output_files(
                [(path, "the reference catalog saved by save_abs_catalog")],
                getattr(self, "_inputs", None) or [],
            )
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
            aligned = (results.Status.COMPLETE, results.Status.INCOMPLETE)
            if status not in aligned or wcs is None:
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
                    batch=4 * max(min(self.processes, usable_cores()), 2) if self.on_disk else None,
                    inputs=getattr(self, "_inputs", None),
                )  # fmt: skip
        finally:
            self.timings = clock.timings
            self._write_report(model, outputs=[None if p is None else str(p) for p in written])
        self._log_result()
        return written


def _refcat_stems(entries: list[str]) -> list[str]:
    """The stems of the catalogs ``save_abs_catalog`` may save (``fit_<stem>_ref.ecsv``)."""
    from .refcat import service_name

    stems = []
    for entry in entries:
        name = service_name(entry)
        if name is None:
            name = Path(entry.split("?", 1)[0].rstrip("/")).name
        stems.append(Path(name).stem.lower())
    return stems
def _checked(check, value) -> None:
    """Run a parameter check; an error is logged once and raised as :class:`StepParameterError`.

    ``strun`` shows that one line and exits with status 1, without stpipe's traceback
    (the error is also stpipe's public ``StpipeExitException``).
    """
    try:
        check(value)
    except StepParameterError:
        raise
    except InvalidParameterError as err:
        log.error("%s", err)
        raise StepParameterError(str(err)) from None


def _as_list(item) -> list:
    """One of several command-line inputs as a list of models or ASDF files."""
    if isinstance(item, (list, tuple)):
        return list(item)
    is_json = isinstance(item, (str, Path)) and Path(item).suffix.lower() == ".json"
    if is_json or isinstance(item, (AbstractModelLibrary, dict, catalogs.PlannedLibrary)):
        raise InvalidParameterError(
            f"several inputs given, among them the association {item}: several inputs are "
            "aligned together only as ASDF files or models; for more, give one association "
            "listing every file, made with: roman-tweakreg asn FILE... -o asn.json"
        )
    return [item]


def _observers(images) -> dict:
    """Group id -> Roman's barycentric position (AU) when the group was exposed.

    From the group's first image's ``meta.ephemeris`` when usable, else the Sun-Earth
    L2 point at its epoch (:func:`roman_tweakreg.refcat._motion.l2_position`), said
    once in the log; None for a group without epoch (no parallax displacement).
    """
    from .refcat._motion import l2_position

    out, fallback = {}, []
    for image in images:
        if image.group_id in out:
            continue
        if image.observer is not None:
            out[image.group_id] = np.asarray(image.observer, float)
        elif image.epoch is not None:
            out[image.group_id] = l2_position(image.epoch)
            fallback.append(image.group_id)
        else:
            out[image.group_id] = None
    if fallback:
        log.info(
            "No usable meta.ephemeris (Roman's barycentric position) in %d of %d exposure "
            "groups (%s): reference stars' parallaxes are seen from the Sun-Earth L2 point "
            "(the Earth's position plus 0.01 AU away from the Sun) at their exposure times",
            len(fallback), len(out),
            ", ".join(fallback[:5]) + (" ..." if len(fallback) > 5 else ""),
        )  # fmt: skip
    return out


def _pm(value: float, sigma: float | None, fmt: str = ".2f") -> str:
    """``value ± sigma`` (or the value alone when the uncertainty is unknown)."""
    text = format(value, fmt)
    return text if sigma is None or not np.isfinite(sigma) else f"{text} ± {sigma:{fmt}}"
#: The image statuses, in the order the closing line counts them.
IMAGE_STATUSES = ("COMPLETE", "INCOMPLETE", "FAILED", "SKIPPED")


def _status_counts(statuses) -> str:
    """Images by status: ``"N/M COMPLETE"`` (M images in all), then each other status
    that occurs, in the order of :data:`IMAGE_STATUSES` (``"0/4 COMPLETE, 4 INCOMPLETE"``)."""
    values = [str(getattr(s, "value", s)) for s in statuses]
    others = [f"{values.count(name)} {name}" for name in IMAGE_STATUSES[1:] if name in values]
    return ", ".join([f"{values.count('COMPLETE')}/{len(values)} COMPLETE", *others])


def _log_fit(phase: str, result: FitResult, images: list, refcat: str = "") -> None:
    """Log one line summarising a group's (or a rigid set's) fit of one phase.

    The line names the fit geometry, and for ``rscale`` the scale, for ``general`` the
    scales of both axes and the skew.
    """
    groups = list(dict.fromkeys(i.group_id for i in images))
    if len(groups) == 1:
        what = f"group {groups[0]}"
    elif len(groups) <= 3:
        what = f"groups {', '.join(groups)}"
    else:
        what = f"{len(groups)} groups ({groups[0]} ... {groups[-1]})"
    target = f" to {refcat}" if refcat else ""
    if result.status == "REFERENCE":
        log.info("%s fit, %s (%d images): reference of the others", phase, what, len(images))
        return
    fit = result.fit or {}
    geometry = f" ({fit['fitgeom']})" if fit.get("fitgeom") else ""
    if "shift" not in fit:
        log.info(
            "%s fit%s%s, %s (%d images): %d matches, %s: %s",
            phase, geometry, target, what, len(images), result.nmatches, result.status,
            result.reason,
        )  # fmt: skip
        return
    shift = 1000.0 * np.asarray(fit["shift"], float)
    sx, sy = fit.get("shift_sigma_mas", (None, None))
    rotation = float(fit.get("<rot>", fit.get("proper_rot", 0.0)))
    rot_sigma = fit.get("rot_sigma_arcsec")
    log.info(
        "%s fit%s%s, %s (%d images): %d matches, shift (%s, %s) mas, rotation %s deg%s, "
        "rms %.2f mas, mae %.2f mas: %s%s",
        phase, geometry, target, what, len(images), result.nmatches,
        _pm(shift[0], sx), _pm(shift[1], sy),
        _pm(rotation, None if rot_sigma is None else rot_sigma / 3600.0, ".6f"), _scale_text(fit),
        1000.0 * float(fit["rmse"]), 1000.0 * float(fit["mae"]), result.status,
        f" ({result.reason})" if result.reason else "",
    )  # fmt: skip


def _scale_text(fit: dict) -> str:
    """``, scale s`` (rscale) or ``, scale (sx, sy), skew k deg`` (general); '' otherwise."""
    geometry = fit.get("fitgeom")
    if geometry == "rscale" and fit.get("<scale>") is not None:
        return f", scale {float(fit['<scale>']):.9f}"
    if geometry == "general" and fit.get("scale") is not None:
        sx, sy = (float(v) for v in fit["scale"])
        return f", scale ({sx:.9f}, {sy:.9f}), skew {float(fit.get('skew', 0.0)):.6f} deg"
    return ""


def result_line(statuses, absolute: dict, refcat: str) -> str:
    """The run's one-line result: images by status, then the absolute fit's rms.

    Parameters
    ----------
    statuses : iterable of str
        Each image's ``meta.cal_step.tweakreg``.
    absolute : dict
        Exposure group -> its absolute :class:`~roman_tweakreg.matching.FitResult`
        (each group's own figures).
    refcat : str
        The reference catalog asked for.

    Returns
    -------
    str
        e.g. ``36/36 COMPLETE, absolute rms 3.05 mas to gaia.ecsv`` or ``30/36 COMPLETE,
        4 INCOMPLETE, 2 SKIPPED, absolute fit to GAIADR3 SKIPPED: <reason>``
        (:func:`_status_counts`).
    """
    line = _status_counts(statuses)
    applied = [r for r in absolute.values() if r.applied and "rmse" in (r.fit or {})]
    pairs = sum(r.nmatches for r in applied)
    if applied and pairs:
        rms = np.sqrt(sum(r.nmatches * float(r.fit["rmse"]) ** 2 for r in applied) / pairs)
        names = ", ".join(dict.fromkeys(r.refcat or refcat for r in applied))
        return f"{line}, absolute rms {1000.0 * rms:.2f} mas to {names}"
    if absolute:
        first = next(iter(absolute.values()))
        why = f": {first.reason}" if first.reason else ""
        return f"{line}, absolute fit to {first.refcat or refcat} {first.status}{why}"
    return line


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
