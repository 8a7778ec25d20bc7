"""Many associations as tasks on a Dask cluster: a summary, retries, resume.

:func:`align_associations` runs :class:`~roman_tweakreg.step.TweakRegStep` on each
association as one ``dask.distributed`` task (a ``LocalCluster`` on this machine
unless a client is given: ``dask-jobqueue`` or ``dask-kubernetes`` clusters work
the same).  Outputs go to ``<output_dir>/<association name>/``; a small manifest
there records the parameters and the outputs' sizes and checksums, so that a
resumed batch skips what is done.  ``<output_dir>/batch_summary.ecsv`` has one
row per association and is rewritten (atomically) as tasks finish.

When ``abs_refcat`` names a catalog of the web service, the sky covered by all
associations is planned first: nearby associations share a region, each region
is fetched once (a task of its own) into ``<output_dir>/refcat/`` and each
association's task reads its cone from its region's file.

Each association's task opens it once and asks the step which catalog each image uses
(:meth:`~roman_tweakreg.step.TweakRegStep.plan_catalogs`); images without one are
detected one task each (:func:`detect_one`), spread over the cluster, and the step
then reads the catalogs as planned (:class:`~roman_tweakreg.catalogs.PlannedLibrary`).
See ``docs/batch.rst``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.table import Table

from ._io import write_atomically
from .errors import InvalidParameterError, MissingInputError, TweakRegError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    from distributed import Client, Future

    from ._parallel import ExecutorUse
    from .catalogs import PlannedLibrary

__all__ = [
    "DETECTION_PRIORITY",
    "MANIFEST_NAME",
    "REFCAT_FOLDER",
    "SUMMARY_COLUMNS",
    "SUMMARY_NAME",
    "WORKER_CONFIG",
    "AssociationJob",
    "align_associations",
    "align_one",
    "check_done",
    "dashboard_address",
    "detect_one",
    "local_cluster",
    "plan_association",
    "read_inputs",
]

log = logging.getLogger(__name__)

SUMMARY_NAME = "batch_summary.ecsv"
MANIFEST_NAME = "tweakreg_manifest.json"
REFCAT_FOLDER = "refcat"
#: Step parameters the batch sets itself.
RESERVED = ("output_dir", "output_file", "save_results", "input_dir", "pre_hooks", "post_hooks")
#: Dask settings of the workers of the batch's own ``LocalCluster`` (docs/batch.rst,
#: "Throughput"): the statistical profiler samples the task's stack every 10 ms; it cost
#: about a tenth more CPU per association (more on a loaded machine); the batch needs none.
WORKER_CONFIG = {"distributed.worker.profile.enabled": False}
#: Dask priority of the detection tasks an association's task submits: above any other
#: task's (0), so that the thread an association's task leaves while it waits for them
#: detects rather than starting another task.
DETECTION_PRIORITY = 10
#: Extra margin (deg) of a region around the cones of its associations.
_REGION_SLACK = 0.005

#: The summary's columns: name, type, unit, description (docs/batch.rst shows this table).
SUMMARY_COLUMNS: tuple[tuple[str, type, str | None, str], ...] = (
    ("association", str, None, "association name, also its output folder"),
    ("status", str, None, "COMPLETE, PARTIAL, FAILED or SKIPPED (done before, --resume)"),
    ("done_status", str, None, "of a SKIPPED row: the status of the run that made its "
     "outputs (whose seconds, detect_seconds and worker the row keeps)"),
    ("n_images", int, None, "images in the association (also of one that FAILED)"),
    ("n_complete", int, None, "images whose cal_step.tweakreg is COMPLETE"),
    ("abs_rms", float, "mas", "rms of the absolute fit (worst of its fits; to 0.001 mas); "
     "NaN without one"),
    ("abs_nmatches", int, None, "matches of the absolute fit (fewest of its fits); 0 without"),
    ("seconds", float, "s", "wall time of the task, its wait for its detection tasks "
     "excluded (to 0.01 s)"),
    ("detect_seconds", float, "s", "summed wall time of its detection tasks (not in seconds; "
     "to 0.01 s)"),
    ("worker", str, None, "address of the Dask worker that ran it"),
    ("error", str, None, "why it failed, or why some images are not COMPLETE"),
    ("file", str, None, "the association file"),
)
_STATUSES = ("COMPLETE", "PARTIAL", "FAILED", "SKIPPED")
_KEPT = ("n_images", "n_complete", "abs_rms", "abs_nmatches", "error")  # in a SKIPPED row
#: Of the run that made the outputs, also kept in a SKIPPED row (from the manifest).
_KEPT_RUN = ("seconds", "detect_seconds", "worker")
#: Decimals the summary gives (mas to 0.001, seconds to 0.01: finer is noise).
_DECIMALS = {"abs_rms": 3, "seconds": 2, "detect_seconds": 2}


@dataclass(frozen=True)
class AssociationJob:
    """One association to align: what a task needs, small and picklable.

    Attributes
    ----------
    name : str
        Association name (the file name without ``.json``); its output folder.
    path : str
        The association file.
    folder : str
        Output folder, ``<output_dir>/<name>``.
    parameters : dict
        Step parameters (validated, converted), without the reserved ones.
    fingerprint : str
        SHA-256 of the parameters and of the association file's content.
    """

    name: str
    path: str
    folder: str
    parameters: dict
    fingerprint: str


# -- inputs ----------------------------------------------------------------------------------
def read_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand ``inputs`` into association files.

    A ``.json`` path is an association; any other file is a list of
    associations, one a line (blank lines and ``#`` comments ignored, relative
    paths taken from the list's folder).

    Raises
    ------
    MissingInputError
        Naming a list file that does not exist.
    InvalidParameterError
        When no association is given, or two have the same name (they would
        share an output folder).
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    paths: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.suffix.lower() == ".json":
            paths.append(path.resolve())
            continue
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError as err:
            raise MissingInputError(f"{path}: association list file does not exist") from err
        except (OSError, UnicodeDecodeError) as err:
            raise TweakRegError(f"{path}: cannot be read as a list of associations: {err}") from err
        for line in lines:
            entry = line.split("#", 1)[0].strip()
            if entry:
                paths.append((path.parent / Path(entry).expanduser()).resolve())
    if not paths:
        raise InvalidParameterError("inputs: no association given")
    seen: dict[str, Path] = {}
    for path in paths:
        name = path.stem
        if name in seen:
            raise InvalidParameterError(
                f"associations {seen[name]} and {path} have the same name {name!r}: each "
                "association's outputs go to a folder named after it"
            )
        seen[name] = path
    return paths


def _step_parameters(step_parameters: dict) -> dict:
    """Validate the step parameters once, before any task; return them converted."""
    from stpipe.config_parser import ValidationError

    from .step import TweakRegStep, validate_parameters

    reserved = sorted(set(step_parameters) & set(RESERVED))
    if reserved:
        raise InvalidParameterError(
            f"{', '.join(reserved)}: set by the batch (outputs go to <output_dir>/<association>)"
        )
    try:
        step = TweakRegStep(**step_parameters)
    except ValidationError as err:
        raise InvalidParameterError(f"step parameters: {err}") from err
    pars = step.get_pars()
    validate_parameters(pars)
    if isinstance(step.override_epsf, str) and step.override_epsf:  # not in get_pars()
        pars["override_epsf"] = step.override_epsf
    if "processes" not in step_parameters:
        pars["processes"] = 1  # the cluster owns the cores: one process per task
    return {k: v for k, v in pars.items() if k not in RESERVED}


def _fingerprint(parameters: dict, asn_bytes: bytes) -> str:
    from . import __version__

    text = json.dumps(
        {"parameters": parameters, "version": __version__}, sort_keys=True, default=str
    )
    digest = hashlib.sha256(text.encode())
    digest.update(hashlib.sha256(asn_bytes).digest())
    return digest.hexdigest()


# -- the task ----------------------------------------------------------------------------------
def _row(job: AssociationJob, status: str, **values) -> dict:
    row = {"association": job.name, "status": status, "file": job.path}
    row.update(values)
    return row


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Visible files of ``folder`` (not the manifest): name -> (size, mtime_ns)."""
    out = {}
    if folder.is_dir():
        for entry in os.scandir(folder):
            if entry.is_file() and not entry.name.startswith(".") and entry.name != MANIFEST_NAME:
                st = entry.stat()
                out[entry.name] = (st.st_size, st.st_mtime_ns)
    return out


def check_done(job: AssociationJob) -> dict | None:
    """Return the SKIPPED summary row of an association done before, or None to redo it.

    Done means: its manifest exists, was made with the same parameters and the
    same association, and every output it lists is present with the same size
    and SHA-256.
    """
    manifest = Path(job.folder) / MANIFEST_NAME
    try:
        done = json.loads(manifest.read_text())
        if done["fingerprint"] != job.fingerprint:
            log.info("%s: made with other parameters or another association; redone", job.name)
            return None
        for out in done["outputs"]:
            path = Path(job.folder) / out["name"]
            if path.stat().st_size != out["size"] or _sha256(path) != out["sha256"]:
                log.info("%s: output %s changed since it was made; redone", job.name, path)
                return None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.info("%s: manifest %s unusable (%s); redone", job.name, manifest, err)
        return None
    kept = {k: v for k, v in done["summary"].items() if k in _KEPT}
    kept.update({k: v for k, v in (done.get("run") or {}).items() if k in _KEPT_RUN})
    kept.setdefault("worker", _worker_address())
    return _row(job, "SKIPPED", done_status=done["summary"].get("status", ""), **kept)


def _association_size(path: str) -> int:
    """The members an association file lists (0 when it cannot be read as one)."""
    from .library import load_association

    try:
        return len(load_association(path)["products"][0]["members"])
    except (TweakRegError, OSError):
        return 0


def _summarise(library) -> dict:
    """Status counts and the absolute fit's figures of an aligned library."""
    statuses, rms, nmatches, reasons = [], [], [], []
    with library:
        for index in range(len(library)):
            model = library.borrow(index)
            try:
                status = str(model.meta.cal_step.tweakreg)
                fit = dict(model.meta.get("wcs_fit_results") or {})
                name = str(model.meta.filename)
            finally:
                library.shelve(model, index, modify=False)
            statuses.append(status)
            absolute = dict(fit.get("absolute") or {})
            if absolute.get("status") == "SUCCESS" and "rmse" in absolute:
                rms.append(float(absolute["rmse"]) * 1000.0)
                nmatches.append(int(absolute.get("nmatches", 0)))
            if status != "COMPLETE" and not reasons:
                reasons.append(f"{name}: {status} ({fit.get('reason', 'no reason given')})")
    n_complete = statuses.count("COMPLETE")
    if n_complete == len(statuses):
        status = "COMPLETE"
    else:
        # INCOMPLETE images are aligned to each other: a partial result too
        status = "PARTIAL" if n_complete or "INCOMPLETE" in statuses else "FAILED"
        others = len(statuses) - n_complete
        reasons[0] = f"{others} of {len(statuses)} images not COMPLETE; first: {reasons[0]}"
    return {
        "status": status,
        "n_images": len(statuses),
        "n_complete": n_complete,
        "abs_rms": max(rms) if rms else math.nan,
        "abs_nmatches": min(nmatches) if nmatches else 0,
        "error": reasons[0] if reasons else "",
    }


def _task_parameters(job: AssociationJob) -> dict:
    """The step parameters of an association's task (and of its detection plan)."""
    pars = dict(job.parameters)
    if not pars.get("catalog_path"):
        pars["catalog_path"] = job.folder
    return pars


def detect_one(detection) -> dict:
    """Detect the sources of one image and write its catalog (a task).

    Parameters
    ----------
    detection : DetectionJob
        As the step plans it (:meth:`~roman_tweakreg.step.TweakRegStep.plan_catalogs`).

    Returns
    -------
    dict
        ``image``, ``catalog`` (the file written), ``sources``, ``seconds``,
        ``worker`` and ``error``: the message of a bad input (a
        :class:`~roman_tweakreg.errors.TweakRegError`), '' when it succeeded.

    Raises
    ------
    Exception
        Anything else: the scheduler retries the task.
    """
    start = time.perf_counter()
    from .outputs import check_writable

    out = {"image": detection.image_file or detection.image, "catalog": str(detection.catalog_file)}
    try:
        check_writable(Path(detection.catalog_file).parent, "catalog_path")  # as the step does
        out["sources"] = len(detection.run())
        out["error"] = ""
    except TweakRegError as err:
        log.warning("%s: detection FAILED: %s", out["image"], err)
        out["sources"], out["error"] = 0, f"{type(err).__name__}: {err}"
    out["seconds"] = time.perf_counter() - start
    out["worker"] = _worker_address()
    return out


def align_one(
    job: AssociationJob,
    refcat_file: str | None = None,
    resume: bool = False,
    *,
    detect_retries: int = 0,
    token: str = "",
) -> dict:
    """Align one association (the task); return its summary row.

    The association is opened once: the step plans each image's catalog
    (:meth:`~roman_tweakreg.step.TweakRegStep.plan_catalogs`), the images without one
    are detected (:func:`detect_one`) as Dask tasks of their own when this runs in a
    Dask worker (spread over the cluster; here otherwise), and the step then runs on
    the library and its plan (:class:`~roman_tweakreg.catalogs.PlannedLibrary`).

    Parameters
    ----------
    job : AssociationJob
        The association and the step parameters.
    refcat_file : str or None
        The local file of the association's sky region (see
        :mod:`roman_tweakreg.refcat._plan`), used as ``abs_refcat``; None keeps
        the parameter as given.
    resume : bool
        Return a SKIPPED row, doing nothing, when :func:`check_done` says so.
    detect_retries : int
        Retries of a detection task that raised something other than a bad-input error.
    token : str
        Ends the detection tasks' keys (``detect-<association>-<k>-<token>``).

    Returns
    -------
    dict
        The summary row: FAILED with the message when the input is bad (a
        :class:`~roman_tweakreg.errors.TweakRegError`), which no retry would change,
        or when a detection failed (``detection of <image file> failed:`` and why; the
        step does not run).  ``detect_seconds`` is the detection tasks' summed time;
        ``seconds`` the task's own (its wait for them excluded).

    Raises
    ------
    Exception
        Anything else (a lost file system, memory...): the scheduler retries the task.

    .. warning:: Writes the outputs and the manifest under ``job.folder``.
    """
    from .step import TweakRegStep

    start = time.perf_counter()
    worker = _worker_address()
    if resume and (row := check_done(job)) is not None:
        row["seconds"] = time.perf_counter() - start
        return row
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    pars = _task_parameters(job)
    if refcat_file:
        pars["abs_refcat"] = refcat_file
    before = _listing(folder)  # the detected catalogs are outputs too
    detect_seconds = 0.0

    def failed(message: str) -> dict:
        log.warning("%s: FAILED: %s", job.name, message)
        return _row(job, "FAILED", seconds=time.perf_counter() - start, worker=worker,
                    detect_seconds=detect_seconds, error=message,
                    n_images=_association_size(job.path))  # fmt: skip
    per_image: dict[str, int] = {}
    try:
        planned = plan_association(job, pars)
        waited = time.perf_counter()
        detected = _detect_all(job, planned.plan.detections, detect_retries, token)
        start += time.perf_counter() - waited  # seconds: the task's own work, as before
        detect_seconds = float(sum(d["seconds"] for d in detected))
        bad = [d for d in detected if d["error"]]
        if bad:
            return failed(f"detection of {bad[0]['image']} failed: {bad[0]['error']}")
        planned = replace(planned, plan=planned.plan.detected())
        with _per_image_work_on_cluster() as use:
            library = TweakRegStep.call(planned, output_dir=str(folder), save_results=True, **pars)
        per_image = dict(use.jobs) if use is not None else {}
        summary = _summarise(library)
    except TweakRegError as err:
        return failed(f"{type(err).__name__}: {err}")
    after = _listing(folder)
    outputs = [
        {"name": name, "size": size, "sha256": _sha256(folder / name)}
        for name, (size, mtime) in sorted(after.items())
        if before.get(name) != (size, mtime)
    ]
    manifest = {
        "association": job.name,
        "file": job.path,
        "fingerprint": job.fingerprint,
        "parameters": job.parameters,
        "summary": summary,
        "run": {  # kept in the summary row when a resumed batch skips the association
            "seconds": time.perf_counter() - start,
            "detect_seconds": detect_seconds,
            "worker": worker,
            "per_image_jobs": per_image,  # where the step's per-image jobs ran
        },
        "outputs": outputs,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True, default=str)
    write_atomically(folder / MANIFEST_NAME, lambda p: p.write_text(text))
    return _row(
        job,
        seconds=time.perf_counter() - start,
        worker=worker,
        detect_seconds=detect_seconds,
        **summary,
    )


def plan_association(job: AssociationJob, parameters: dict | None = None) -> PlannedLibrary:
    """Open an association once and plan its catalogs: the first part of its task.

    The models are opened as the step opens them and each image's catalog is chosen by
    the step itself (:meth:`~roman_tweakreg.step.TweakRegStep.plan_catalogs`) with the
    task's parameters (``parameters``, default those of ``job``, ``catalog_path``
    defaulting to the association's output folder).

    Returns
    -------
    PlannedLibrary
        The library, its plan (with the detections still to run) and the association file.

    Raises
    ------
    TweakRegError
        The association or a model cannot be read, or an image has no catalog.
    """
    from .catalogs import PlannedLibrary
    from .library import open_library
    from .step import TweakRegStep

    pars = _task_parameters(job) if parameters is None else parameters
    library = open_library(job.path, on_disk=bool(pars.get("on_disk")))
    step = TweakRegStep(output_dir=job.folder, save_results=True, **pars)
    return PlannedLibrary(library, step.plan_catalogs(library), job.path)


def _detect_all(job: AssociationJob, detections: Sequence, retries: int, token: str) -> list:
    """Run an association's planned detections: :func:`detect_one`'s result for each.

    In a Dask worker each is a task of its own (``detect-<association>-<k>-<token>``,
    priority :data:`DETECTION_PRIORITY`), spread over the cluster while this task waits
    outside the worker's thread pool;
    elsewhere they run here, one after the other.  A task that failed for good gives
    a result whose ``error`` says why.
    """
    if not detections:
        return []
    try:
        from distributed import get_client, get_worker, rejoin, secede, wait

        get_worker()
    except (ImportError, ValueError):  # not in a Dask worker
        return [detect_one(d) for d in detections]
    log.info("%s: source detection of %d images, one task each", job.name, len(detections))
    token = token or job.fingerprint[:16]
    keys = [f"detect-{job.name}-{k}-{token}" for k in range(len(detections))]
    client = get_client()
    # ahead of the associations' tasks still waiting: a free worker takes a detection
    # before it starts (and opens) another association
    futures = client.map(detect_one, detections, key=keys, retries=retries, pure=False,
                         priority=DETECTION_PRIORITY)  # fmt: skip
    secede()  # this worker's thread is free while they run: it takes them too
    try:
        wait(futures)
    finally:
        rejoin()
    out = []
    for detection, future in zip(detections, futures, strict=True):
        if future.status == "finished":
            out.append(future.result())
            continue
        err = future.exception()
        out.append({"image": detection.image_file or detection.image,
                    "catalog": str(detection.catalog_file), "sources": 0, "seconds": 0.0,
                    "worker": "", "error": f"{type(err).__name__}: {err}"})  # fmt: skip
    return out


@contextmanager
def _per_image_work_on_cluster() -> Iterator[ExecutorUse | None]:
    """In a Dask worker: the step's per-image jobs go to the cluster (None elsewhere).

    The task leaves the worker's thread pool while the step runs
    (``distributed.worker_client``), so that its per-image jobs, and other tasks, can run
    on this worker meanwhile: a task waiting for its jobs never holds a thread they need.
    The executor is the client's (``get_executor(pure=False)``); the step sends at most
    four jobs per thread of the cluster and runs the others itself.
    """
    try:
        from distributed import get_worker, worker_client

        get_worker()
    except (ImportError, ValueError):  # not a Dask task
        yield None
        return
    from ._parallel import per_image_executor

    with worker_client() as client:
        threads = sum(client.nthreads().values())  # of the whole cluster
        with per_image_executor(client.get_executor(pure=False), max(1, threads)) as use:
            yield use


def _cone_of(job: AssociationJob):
    """The sky cone of an association's members (a task); None when it cannot be read."""
    from .library import load_association
    from .refcat._plan import sky_cone

    try:
        asn = load_association(job.path)
        return sky_cone(job.path, [m["expname"] for m in asn["products"][0]["members"]])
    except TweakRegError as err:  # the association's own task will say what is wrong
        log.warning("%s: footprint not read, no shared reference catalog: %s", job.name, err)
        return None


def _region_options(parameters: dict) -> dict:
    """How the shared regions are fetched: the service, its timeout (``vo_timeout`` when
    set, as the step), retries and cache, from the step parameters."""
    from .parameters import service_timeout

    return {
        "base_url": parameters.get("abs_refcat_url") or None,
        "timeout": service_timeout(parameters),
        "retries": parameters["abs_refcat_retries"],
        "cache_dir": parameters.get("abs_refcat_cache"),
        "max_bytes": parameters.get("abs_refcat_max_bytes"),
    }


def _fetch_region(region, refcat: str, path: str, margin: float, options: dict) -> str:
    from .refcat._plan import fetch_region

    return fetch_region(region, refcat, path, margin, **options)


# -- the client side -------------------------------------------------------------------------
class _Summary:
    """The summary table, rewritten atomically at most every ``interval`` seconds."""

    def __init__(self, path: Path, order: Sequence[str], meta: dict, interval: float = 1.0):
        self.path, self.order, self.meta, self.interval = path, list(order), meta, interval
        self.rows: dict[str, dict] = {}
        self.written = -math.inf

    def add(self, row: dict) -> None:
        self.rows[row["association"]] = row
        if time.monotonic() - self.written >= self.interval:
            self.write()

    def table(self) -> Table:
        rows = [self.rows[name] for name in self.order if name in self.rows]
        defaults = {str: "", int: 0, float: math.nan}
        columns = {}
        for name, kind, _, _ in SUMMARY_COLUMNS:
            values = [kind(r.get(name, defaults[kind])) for r in rows]
            if name in _DECIMALS:
                values = [round(v, _DECIMALS[name]) for v in values]
            columns[name] = np.array(values, dtype=kind if kind is not str else str)
            if kind is str and not rows:
                columns[name] = np.array([], dtype="U1")
        table = Table(columns, meta=dict(self.meta))
        for name, _, unit, description in SUMMARY_COLUMNS:
            table[name].unit = unit
            table[name].description = description
        return table

    def write(self) -> Table:
        table = self.table()
        write_atomically(self.path, lambda p: table.write(p, format="ascii.ecsv"))
        self.written = time.monotonic()
        return table


class _ProgressLine:
    """A one-line progress bar with counts, elapsed time and an ETA (on a terminal)."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.total, self.width, self.stream = total, width, stream
        self.start = time.monotonic()

    def update(self, done: int) -> None:
        if self.stream is None:
            return
        from dask.utils import format_time

        elapsed = time.monotonic() - self.start
        frac = done / self.total if self.total else 1.0
        eta = format_time(elapsed / done * (self.total - done)) if done else "?"
        bar = "#" * int(self.width * frac)
        self.stream.write(
            f"\r[{bar:<{self.width}}] {done}/{self.total} associations | "
            f"{format_time(elapsed)} elapsed | ETA {eta}   "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


def dashboard_address(client: Client) -> str:
    """The Dask dashboard's address, or why there is none."""
    info = client.scheduler_info()
    if "dashboard" not in info.get("services", {}):
        return "not available (the dashboard needs bokeh: pip install 'dask[diagnostics]')"
    return client.dashboard_link


def align_associations(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    client: Client | None = None,
    resume: bool = False,
    *,
    workers: int | None = None,
    retries: int = 2,
    region_radius: float = 1.0,
    progress: bool | None = None,
    **step_parameters: Any,
) -> Table:
    """Align each association with :class:`~roman_tweakreg.step.TweakRegStep`, as Dask tasks.

    Parameters
    ----------
    inputs : path or list of paths
        Association files (``.json``) and/or text files listing them one a line.
    output_dir : path
        Outputs go to ``output_dir/<association name>/``, the summary to
        ``output_dir/batch_summary.ecsv``, shared reference catalogs to
        ``output_dir/refcat/``.  Nothing is written next to the inputs.
    client : distributed.Client, optional
        A client of a running cluster; default a ``LocalCluster`` of ``workers``
        processes of one thread each, closed at the end.
    resume : bool
        Skip (status SKIPPED) associations whose outputs are all present and
        whole and were made with the same parameters; redo the others.
    workers : int, optional
        Worker processes of the local cluster; default the usable cores.
    retries : int
        Retries of a task that raised something other than a bad-input error
        (a lost worker is rescheduled by Dask on its own).
    region_radius : float
        Largest radius (deg) of a shared reference catalog region.
    progress : bool, optional
        Draw a progress bar on stderr; default when stderr is a terminal.
    **step_parameters
        TweakRegStep parameters (not ``output_dir``, ``save_results``...).

    Returns
    -------
    astropy.table.Table
        The summary, one row per association in input order (also written).

    Raises
    ------
    InvalidParameterError
        Before any task, for a bad step parameter or duplicate association names.

    .. warning:: Writes under ``output_dir`` (and the catalog cache).
    """
    output_dir = Path(output_dir).expanduser().resolve()
    paths = read_inputs(inputs)
    parameters = _step_parameters(step_parameters)
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise InvalidParameterError(f"workers={workers!r}: expected an integer >= 1")
    if not isinstance(retries, int) or retries < 0:
        raise InvalidParameterError(f"retries={retries!r}: expected an integer >= 0")
    if not (isinstance(region_radius, (int, float)) and region_radius > 0):
        raise InvalidParameterError(f"region_radius={region_radius!r}: expected a number > 0")
    if client is not None:
        return _run(client, paths, output_dir, parameters, resume, retries, region_radius, progress)
    if resume and (table := _all_done(paths, output_dir, parameters)) is not None:
        return table  # nothing to do: no cluster started
    from distributed import Client

    with local_cluster(workers) as cluster, Client(cluster) as local:
        return _run(local, paths, output_dir, parameters, resume, retries, region_radius, progress)


def _all_done(paths: list[Path], output_dir: Path, parameters: dict) -> Table | None:
    """With ``--resume`` and no cluster given: the summary when every association was done
    before (checked here, as a local cluster's workers would), else None (work to do).

    Each row keeps the figures of the run that made the outputs (:func:`check_done`);
    the summary is written as the batch writes it.
    """
    jobs, unreadable = _jobs(paths, output_dir, parameters)
    if unreadable:
        return None
    rows = []
    for job in jobs:
        row = check_done(job)
        if row is None:
            return None
        rows.append(row)
    summary = _Summary(
        output_dir / SUMMARY_NAME,
        [j.name for j in jobs],
        {"parameters": {k: str(v) for k, v in sorted(parameters.items())}},
    )
    for row in rows:
        summary.rows[row["association"]] = row
    table = summary.write()
    log.info(
        "Resume: all %d associations done before, nothing to do (no cluster started); "
        "summary in %s",
        len(jobs),
        summary.path,
    )
    return table


def local_cluster(workers: int | None = None, **options: Any):
    """The batch's own ``LocalCluster``: ``workers`` processes of one thread each.

    Its workers run with :data:`WORKER_CONFIG` (Dask's statistical profiler off).

    Parameters
    ----------
    workers : int, optional
        Worker processes; default the usable cores.
    **options
        More ``LocalCluster`` arguments (``env``...).

    Returns
    -------
    distributed.LocalCluster
        Started; close it (or use it as a context manager).
    """
    import dask
    from distributed import LocalCluster

    from ._parallel import usable_cores

    with dask.config.set(WORKER_CONFIG):  # the nannies hand this configuration to workers
        return LocalCluster(
            n_workers=workers or usable_cores(),
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            **options,
        )


def _jobs(paths: list[Path], output_dir: Path, parameters: dict):
    jobs, failed = [], []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as err:
            data = b""
            failed.append(
                (
                    path,
                    f"MissingInputError: {path}: association file cannot be read "
                    f"({err.strerror or err})",
                )
            )
        job = AssociationJob(
            path.stem,
            str(path),
            str(output_dir / path.stem),
            parameters,
            _fingerprint(parameters, data),
        )
        jobs.append(job)
    return jobs, {str(p): msg for p, msg in failed}


def _run(client, paths, output_dir, parameters, resume, retries, region_radius, progress):
    from dask.base import tokenize
    from distributed import as_completed

    output_dir.mkdir(parents=True, exist_ok=True)
    jobs, unreadable = _jobs(paths, output_dir, parameters)
    summary = _Summary(
        output_dir / SUMMARY_NAME,
        [j.name for j in jobs],
        {"parameters": {k: str(v) for k, v in sorted(parameters.items())}},
    )
    log.info("Dask dashboard: %s", dashboard_address(client))
    token = tokenize(str(output_dir), time.time_ns())
    todo = []
    for job in jobs:
        if job.path in unreadable:
            summary.add(_row(job, "FAILED", error=unreadable[job.path]))
        else:
            todo.append(job)
    show = sys.stderr.isatty() if progress is None else progress
    bar = _ProgressLine(len(jobs), sys.stderr if show else None)
    if resume and todo:  # checksums are read where the files are: on the workers
        checks = client.map(
            check_done, todo, key=[f"check-{j.name}-{token}" for j in todo], pure=False
        )
        rows = client.gather(checks, errors="skip")
        skipped = {r["association"] for r in rows if r is not None}
        for row in rows:
            if row is not None:
                summary.add(row)
        todo = [j for j in todo if j.name not in skipped]
        log.info("Resume: %d associations done before, %d to do", len(skipped), len(todo))
    region_of, regions = _plan(client, todo, parameters, output_dir, retries, region_radius, token)
    futures: dict[Future, AssociationJob] = {}
    waiting = list(reversed(todo))  # popped in input order

    def submit_more(queue) -> None:
        """Keep as many association tasks submitted as the cluster has threads."""
        while waiting and len(futures) < _in_flight(client):
            job = waiting.pop()
            region = region_of.get(job.name)
            future = client.submit(
                align_one,
                job,
                regions[region] if region else None,
                detect_retries=retries,
                token=token,
                key=f"tweakreg-{job.name}-{token}",
                retries=retries,
                pure=False,
            )
            futures[future] = job
            queue.add(future)

    done = len(summary.rows)
    bar.update(done)
    try:
        queue = as_completed()
        submit_more(queue)
        for future in queue:
            job = futures.pop(future)
            row = _outcome(future, job, region_of.get(job.name), regions)
            done += 1
            summary.add(row)
            bar.update(done)
            log.info(
                "%d/%d %s: %s, %s/%s images COMPLETE in %.1f s%s%s",
                done,
                len(jobs),
                job.name,
                row["status"],
                row.get("n_complete", 0),
                row.get("n_images", 0),
                row.get("seconds", math.nan),
                f" on {row['worker']}" if row.get("worker") else "",
                f": {row['error']}" if row.get("error") else "",
            )
            submit_more(queue)
    finally:
        bar.close()
        for future in futures:
            future.cancel()
        table = summary.write()
    counts = {s: int(np.sum(table["status"] == s)) for s in _STATUSES}
    log.info(
        "Batch done: %s; summary in %s",
        ", ".join(f"{n} {s}" for s, n in counts.items() if n),
        summary.path,
    )
    return table


def _in_flight(client) -> int:
    """How many association tasks the batch keeps submitted: the cluster's threads (at
    least 1), counted again as each task ends (a cluster that grows gets more).

    No more: an association's task waiting for its detection tasks leaves its thread to
    them, and no other association's task is there to take it first (and open one more
    association).
    """
    return max(sum(client.nthreads().values()), 1)


def _outcome(future, job, region, regions) -> dict:
    if future.status == "finished":
        return future.result()
    try:
        err = future.exception()
    except Exception as exc:  # cancelled: the exception itself is the reason
        err = exc
    message = f"{type(err).__name__}: {err}"
    if region is not None and regions[region].status == "error":
        message = f"reference catalog of region {region} not obtained: {message}"
    log.warning("%s: FAILED for good: %s", job.name, message)
    return _row(job, "FAILED", error=message, n_images=_association_size(job.path))


def _plan(client, todo, parameters, output_dir, retries, region_radius, token):
    """Plan and fetch the shared reference catalog regions; association name -> region."""
    from .refcat import DEFAULT_REFCAT
    from .refcat._plan import is_service_name, plan_regions

    refcat = (parameters.get("abs_refcat") or DEFAULT_REFCAT).strip()
    if not todo or not is_service_name(refcat):
        return {}, {}
    cones = client.gather(
        client.map(_cone_of, todo, key=[f"footprint-{j.name}-{token}" for j in todo], pure=False)
    )
    plan = plan_regions(cones, region_radius)
    margin = (parameters["abs_searchrad"] + parameters["searchrad"]) / 3600.0 + _REGION_SLACK
    options = _region_options(parameters)
    region_of, futures = {}, {}
    for region in plan:
        name = f"{region.ra:08.4f}{region.dec:+08.4f}_{region.radius + margin:.4f}"
        path = output_dir / REFCAT_FOLDER / name / f"{refcat.upper()}.parquet"
        futures[region.name] = client.submit(
            _fetch_region,
            region,
            refcat,
            str(path),
            margin,
            options,
            key=f"refcat-{region.name}-{token}",
            retries=retries,
            pure=False,
        )
        for index in region.members:
            region_of[todo[index].name] = region.name
    log.info(
        "Reference catalog %s: %d associations in %d regions of at most %.2f deg",
        refcat,
        len(region_of),
        len(plan),
        region_radius,
    )
    return region_of, futures
