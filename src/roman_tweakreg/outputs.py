"""Saving the step's outputs: whole or not at all, then the report saying which exist.

:meth:`TweakRegStep.save_model <roman_tweakreg.TweakRegStep.save_model>` (the method
stpipe calls after :meth:`~roman_tweakreg.TweakRegStep.process`) hands its work to
:func:`save_library` and :func:`save_model` here:

- every output folder is checked before any work (:func:`check_writable`, called by
  the step before alignment), so a run does not align for minutes and then fail to
  save;
- each model is written through a temporary file renamed into place
  (:func:`roman_tweakreg._io.write_atomically`), with its WCS product
  ``<name>_wcs.asdf`` (a roman_datamodels ``WfiWcsModel``, as romancal writes);
- a write that fails (full disk, file size limit, memory) raises
  :class:`~roman_tweakreg.errors.OutputError` naming the file, why, and which outputs
  were written before it; an interrupt stops the saving with nothing half-written;
- the JSON report, when asked for, is written last, listing the outputs that exist.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import errno
import functools
import io
import logging
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
from asdf import lazy_nodes
from asdf.tags.core import NDArrayType
from astropy.modeling.models import Shift
from roman_datamodels import datamodels as rdm

from ._io import remove_stale_temporaries, write_atomically
from .errors import OutputError

__all__ = [
    "check_model_output_names",
    "check_output_files",
    "check_output_names",
    "check_writable",
    "describe_write_error",
    "output_name",
    "output_path",
    "save_library",
    "save_model",
    "wcs_product",
]

log = logging.getLogger(__name__)


def output_path(step, model, suffix, idx, output_file, components) -> str:
    """The output file of ``model``, named as stpipe names it (see :func:`save_library`)."""
    return output_name(step, model.meta.filename, suffix, idx, output_file, components)


def output_name(step, filename, suffix, idx, output_file, components) -> str:
    """The output file of a model whose ``meta.filename`` is ``filename`` (see
    :func:`output_path`), so that outputs can be named before the models are opened."""
    if not output_file and (step.output_use_model or not step.search_output_file):
        output_file, idx = filename, None
    if idx is not None:
        components = {"idx": idx, **components}
    return step.make_output_path(basepath=output_file, suffix=suffix, **components)


def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    """A file's real path (symbolic links resolved) and its (device, inode) when it exists."""
    real = os.path.realpath(path)
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return real, None
    return real, (st.st_dev, st.st_ino)


def check_output_files(planned, inputs, *, check_names: bool = True) -> None:
    """Refuse, before anything is written, outputs that would overwrite an input or
    whose names are too long for their folder.

    An output is refused when it resolves to an input: the same path once symbolic
    links are resolved (an ``output_dir`` that is a link to the inputs' folder, an
    output name that is a link to an input), or the same file by device and inode (a
    hard link).  Whatever ``output_dir``, ``output_file``, ``suffix`` and the
    association say, input files are never written.  An output whose name is longer
    than its folder allows (``os.pathconf(folder, "PC_NAME_MAX")``, 255 bytes on
    most file systems) is refused with the limit, rather than failing after the
    alignment.

    Parameters
    ----------
    planned : iterable of (path, str)
        Each output file and what it is, with the parameters that chose its name
        (for the message).
    inputs : iterable of (path, str)
        Each input file (models, association, catfile, catalogs, reference catalog)
        and what it is.
    check_names : bool
        Whether to check the names' length too (not for outputs that may not be
        written at all, such as detected catalogs).

    Raises
    ------
    OutputError
        Naming the output, the input it would overwrite (or the name's length and the
        folder's limit), and the parameters that chose the name.
    """
    by_path, by_inode = {}, {}
    for path, what in inputs:
        real, inode = _identity(Path(path))
        by_path.setdefault(real, (path, what))
        if inode is not None:
            by_inode.setdefault(inode, (path, what))
    limits: dict[str, int] = {}
    for path, why in planned:
        path = Path(path)
        name_bytes = len(os.fsencode(path.name))
        folder = str(path.parent)
        if folder not in limits:
            limits[folder] = _name_max(path.parent)
        if check_names and name_bytes > limits[folder]:
            raise OutputError(
                f"{path}: the output's name is {name_bytes} bytes long, longer than the "
                f"{limits[folder]} bytes its folder {path.parent} allows (PC_NAME_MAX); it "
                f"is {why}: choose a shorter name; nothing was aligned"
            )
        real, inode = _identity(path)
        hit = by_path.get(real)
        how = "the same file once symbolic links are resolved"
        if hit is not None and os.path.abspath(path) == os.path.abspath(hit[0]):
            how = "the same path"
        if hit is None and inode is not None:
            hit, how = by_inode.get(inode), "the same file by device and inode (a hard link)"
        if hit is not None:
            raise OutputError(
                f"{path}: this output would overwrite the input {hit[0]} ({hit[1]}; {how}); "
                f"it is {why}; input files are never written: choose another output_dir, "
                "output_file or suffix; nothing was aligned"
            )


@functools.cache
def filename_max() -> int | None:
    """The longest ``meta.filename`` roman_datamodels' schemas accept (characters), or None.

    A model is saved with ``meta.filename`` set to its output's file name, so an output
    whose name is longer fails the schema's validation when written: 120 characters in
    roman_datamodels 0.2x (``archive_catalog`` ``nvarchar(120)``).
    """

    def find(node):
        if isinstance(node, dict):
            props = node.get("properties")
            spec = props.get("filename") if isinstance(props, dict) else None
            if isinstance(spec, dict) and isinstance(spec.get("maxLength"), int):
                return spec["maxLength"]
            node = list(node.values())
        if isinstance(node, list):
            for value in node:
                if (found := find(value)) is not None:
                    return found
        return None

    models = (rdm.ImageModel, rdm.WfiWcsModel)
    limits = [n for m in models if (n := find(m().get_schema()["properties"]["meta"]))]
    return min(limits) if limits else None


def check_model_output_names(planned) -> None:
    """Refuse model files (outputs, ``_wcs.asdf`` products) whose names are longer than
    a Roman file's ``meta.filename`` may be (:func:`filename_max`), before any work.

    Parameters
    ----------
    planned : iterable of (path, str)
        Each model file to be written and what it is (with what chose its name).

    Raises
    ------
    OutputError
        Naming the output, its length, the limit and what chose the name.
    """
    limit = filename_max()
    if limit is None:
        return
    for path, why in planned:
        name = Path(path).name
        if len(name) > limit:
            raise OutputError(
                f"{path}: the output's name is {len(name)} characters long, but a Roman "
                f"file's meta.filename, which is set to its name, holds at most {limit} "
                f"(roman_datamodels' schema); it is {why}: give a shorter output_file (or "
                "rename the input); nothing was aligned"
            )


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the nearest existing folder of ``folder`` takes."""
    for place in (folder, *folder.parents):
        try:
            return int(os.pathconf(place, "PC_NAME_MAX"))
        except (OSError, ValueError):
            continue
    return 255


def save_model(model, path: str | os.PathLike, *, announce: bool = True) -> str | os.PathLike:
    """Write ``model`` to ``path`` atomically; return ``path``.

    ``announce``: log ``Saved model in <path>`` (as stpipe does); :func:`save_library`
    logs its files itself, in library order, whichever process wrote them.

    Raises
    ------
    OutputError
        Naming ``path`` and why it was not written; nothing is left at ``path``.
    """
    name = model.meta.filename
    try:
        write_atomically(path, lambda tmp: _save(model, tmp))
    except (OSError, MemoryError) as err:
        model.meta.filename = name  # the save may have renamed it to the output
        raise OutputError(f"{path}: output not written: {describe_write_error(err)}") from err
    if announce:
        log.info("Saved model in %s", path)
    return path


def save_library(
    step,
    library,
    *,
    suffix=None,
    output_file=None,
    components: dict,
    written: list | None = None,
    processes: int = 1,
    batch: int | None = None,
    inputs: list | None = None,
) -> list:
    """Save every model of ``library`` and its ``_wcs.asdf`` product.

    Writing a file is mostly asdf's schema validation of its tree (twice per image:
    the model and its WCS product), so the files are written by worker processes
    (:class:`roman_tweakreg._parallel.Workers`, as the step's per-image work; each
    model is sent to its worker whole) while this process keeps the accounts: which
    outputs exist, and the errors.  Every output is attempted, wherever it is written,
    so that the outputs that exist after an error do not depend on where the work ran.

    Parameters
    ----------
    step : TweakRegStep
        Names the outputs (``output_dir``, ``output_file``, ``output_use_model``...).
    library : ModelLibrary
        The step's result.
    suffix, output_file, components
        As stpipe passes them to ``save_model``.
    written : list or None
        Filled, as they are written, with each model's output path (None where none
        was written), in library order: after an error or an interrupt it says which
        outputs exist (the step's report lists them).
    processes : int
        Processes writing files, this one included (the step's ``processes``; 0: one
        per usable core, at most 4; 1: all here).
    batch : int or None
        Models borrowed at once (each batch is shared out to new workers); None: all
        (an ``on_disk`` library keeps fewer in memory with a small batch).
    inputs : list or None
        The run's input files as ``(path, what)``: an output that would overwrite one
        is refused before the batch holding it is written (:func:`check_output_files`;
        the step refuses the outputs it can name before the alignment already).

    Returns
    -------
    list
        Each model's output path.

    Raises
    ------
    OutputError
        When an output cannot be written: naming the file, and which outputs were
        written (the others do not exist).  Files being written when the error or an
        interrupt came are finished or removed, never left half-written.
    """
    n = len(library)
    if written is None:
        written = [None] * n
    written[:] = [None] * n
    output_file = output_file or step.output_file
    errors: list[str] = []
    if step.output_use_model and not output_file:
        check_output_names(library)
    size = max(1, batch or n)
    with library:
        for start in range(0, n, size):
            models: dict = {}
            try:
                for index in range(start, min(n, start + size)):
                    models[index] = library.borrow(index)
                jobs = []
                for index, model in models.items():
                    idx = index if n > 1 else None
                    path = output_path(step, model, suffix, idx, output_file, components)
                    wcs_path = None
                    if isinstance(model, rdm.ImageModel) and model.meta.wcs is not None:
                        wcs_path = output_path(step, model, "wcs", idx, output_file, {})
                    jobs.append((index, path, wcs_path))
                planned = [
                    (p, f"the {what} of image {i}") for i, path, wcs_path in jobs
                    for p, what in ((path, "model output"), (wcs_path, "_wcs.asdf product"))
                    if p is not None
                ]  # fmt: skip
                check_model_output_names(planned)
                check_output_files(planned, inputs or [])
                _save_batch(models, jobs, processes, written, errors)
            finally:
                for index, model in models.items():
                    library.shelve(model, index, modify=False)  # saving changed nothing
            if errors:
                break
    if errors:
        done = [str(p) for p in written if p is not None]
        raise OutputError(
            f"{errors[0]}; {len(done)} of {n} outputs (each a model with its _wcs.asdf "
            "product) were written"
            + (f" ({', '.join(done)})" if done else "")
            + "; the others do not exist"
        )
    return written


def _save_batch(models: dict, jobs: list, processes: int, written: list, errors: list) -> None:
    """Run the jobs ``(index, path, wcs_path)`` here or in workers; fill written, errors."""
    from ._parallel import Workers

    submitted = []
    # jobs of one size, run here too: two waiting keep a worker busy, and the last
    # ones stay here, so that this process and the workers finish together
    with Workers(processes if len(jobs) > 1 else 1, depth=2) as workers:
        try:
            for k, (index, path, wcs_path) in enumerate(jobs):
                model = _Portable(models[index])
                future = workers.submit(_save_one, model, path, wcs_path, left=len(jobs) - 1 - k)
                submitted.append(((index, path, wcs_path), future))
            for (index, _, wcs_path), future in submitted:  # logged in library order
                written[index], error = future.result()
                if written[index] is not None:
                    log.info("Saved model in %s", written[index])
                    if wcs_path is not None and not error:
                        log.info("Saved model in %s", wcs_path)
                if error:
                    errors.append(error)
        except BaseException:
            workers.close()  # running jobs end (their files whole); waiting ones are dropped
            for (index, *_), future in submitted:
                if written[index] is None and _succeeded(future):
                    written[index] = future.result()[0]
            raise


def _succeeded(future) -> bool:
    """Whether a job (a Future, or a worker's relay) has ended without an exception."""
    remote = getattr(future, "remote", None)
    if remote is None:  # run here
        return future.done() and future.exception() is None
    # a worker's outcome: (whether the job returned, its value or error, its log records)
    return remote.done() and not remote.cancelled() and remote.exception() is None and (
        remote.result()[0]
    )


class _Portable:
    """A model to be saved, sent to a worker process as its class and top-level nodes.

    A roman_datamodels model cannot be unpickled as it is; its nodes can, and a new model
    of its class holding them writes the same file.  The nodes and arrays asdf reads
    lazily from a file (``asdf.lazy_nodes``, ``NDArrayType``: tied to the open file) are
    sent as the plain mappings, lists and arrays they stand for.  In this process the
    model itself is used.
    """

    def __init__(self, model):
        self.model = model

    def __reduce__(self):
        model = self.model
        nodes = {key: getattr(model, key) for key in model.keys()}
        buffer = io.BytesIO()
        _PlainNodes(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump((type(model), nodes))
        return _rebuild, (buffer.getvalue(),)


class _PlainNodes(pickle.Pickler):
    """Pickles asdf's lazy nodes and arrays as the mappings, lists and arrays they stand for."""

    def reducer_override(self, obj):
        if isinstance(obj, lazy_nodes.AsdfOrderedDictNode):
            return collections.OrderedDict, (list(obj.items()),)
        if isinstance(obj, lazy_nodes.AsdfDictNode):
            return dict, (list(obj.items()),)
        if isinstance(obj, lazy_nodes.AsdfListNode):
            return list, (list(obj),)
        if isinstance(obj, NDArrayType):  # an array read from the file when first used
            return np.asarray, (np.asarray(obj),)
        return NotImplemented


def _rebuild(data: bytes) -> _Portable:
    cls, nodes = pickle.loads(data)
    model = cls()
    for key, value in nodes.items():
        setattr(model, key, value)
    return _Portable(model)


def _save_one(context, portable: _Portable, path: str, wcs_path: str | None):
    """Save a model's WCS product, then the model; return its path (None: not written),
    error.

    The product is written first and the model last, so that a model never exists
    without its product, even when the process is killed in between (SIGTERM under
    ``strun``, a batch system's stop): what such a kill leaves is at worst a product
    without its model.  When the model cannot be written (an error, an interrupt), the
    product just written is removed: an output counts, and exists, as the pair.
    """
    model = portable.model
    if wcs_path is None:
        log.info("%s: no WCS, no _wcs product", model.meta.filename)
    else:
        try:
            save_model(wcs_product(model), wcs_path, announce=False)
        except OutputError as err:
            return None, str(err)
    try:
        save_model(model, path, announce=False)
    except BaseException as err:  # an error or an interrupt: no product without its model
        if wcs_path is not None:
            with contextlib.suppress(OSError):
                Path(wcs_path).unlink()
        if isinstance(err, OutputError):
            return None, str(err)
        raise
    return path, None


L1_BORDER = 4  #: pixels the Level 1 WCS's frame extends beyond the Level 2 image, per side


@functools.cache
def _product_meta_keys() -> tuple:
    """The ``meta`` keys of a ``WfiWcsModel`` (its schema's), in schema order."""
    meta = rdm.WfiWcsModel().get_schema()["properties"]["meta"]
    return tuple(key for part in meta["allOf"] for key in part["properties"])


def wcs_product(model) -> rdm.WfiWcsModel:
    """The ``_wcs.asdf`` product of an aligned ``model``: its WCS at Level 2 and Level 1.

    The same product as roman_datamodels' ``WfiWcsModel.from_model_with_wcs`` (the
    romancal format; a test checks the files are the same):

    - ``meta``: each of the model's ``meta`` entries the product's schema has;
    - ``wcs_l2``: the model's WCS;
    - ``wcs_l1``: the same WCS for the Level 1 frame, whose pixels start ``L1_BORDER``
      earlier on each axis (a shift of the pixel coordinates, and a bounding box
      ``2 * L1_BORDER`` longer).

    ``wcs_l2`` and the ``meta`` entries are the model's own objects, not copies: the
    product is only written (and the model's file is written apart from it), and a
    copy of a corrected WCS is a tenth of the time of saving an image.  ``wcs_l1`` is
    a copy (it gets a transform of its own), so the two share no object: the YAML
    written is the same as roman_datamodels', anchors included.
    """
    product = rdm.WfiWcsModel()
    product.meta = {}
    for key in _product_meta_keys():
        if key in model.meta:
            product.meta[key] = model.meta[key]
    wcs = model.meta.wcs
    product.wcs_l2 = wcs
    l1 = copy.deepcopy(wcs)
    l1.insert_transform("detector", Shift(-L1_BORDER) & Shift(-L1_BORDER), after=True)
    box = wcs.bounding_box
    if box is not None:
        l1.bounding_box = tuple((lo, hi + 2 * L1_BORDER) for lo, hi in box)
    product.wcs_l1 = l1
    return product


def check_output_names(library) -> None:
    """Refuse to save two models under one name (outputs are named after ``meta.filename``).

    Inputs are checked up front by their file names; this catches models whose
    ``meta.filename`` differs from their file's name, before any output is written.

    Raises
    ------
    OutputError
        Naming both images and the shared name.
    """
    seen: dict[str, int] = {}
    with library:
        for index in range(len(library)):
            model = library.borrow(index)
            try:
                name = Path(str(model.meta.filename)).name
            finally:
                library.shelve(model, index, modify=False)
            if name.lower() in seen:
                raise OutputError(
                    f"images {seen[name.lower()]} and {index} have the same meta.filename "
                    f"{name!r}: both would be saved to one output, so none was saved"
                )
            seen[name.lower()] = index


def describe_write_error(err: BaseException) -> str:
    """Say in words why a write failed (the errno's meaning, then the error)."""
    if isinstance(err, MemoryError):
        return "not enough memory to write it"
    reason = {
        errno.ENOSPC: "the disk is full (ENOSPC)",
        errno.EFBIG: "the file is larger than allowed (EFBIG: file size limit)",
        errno.EDQUOT: "the disk quota is exceeded (EDQUOT)",
        errno.EROFS: "the file system is read-only (EROFS)",
        errno.EACCES: "permission denied (EACCES)",
        errno.EPERM: "operation not permitted (EPERM)",
        errno.EEXIST: "a file of that name is in the way (expected a folder)",
        errno.ENOTDIR: "a part of the path is a file, not a folder (ENOTDIR)",
        errno.ENOENT: "files cannot be created there (ENOENT)",
    }.get(getattr(err, "errno", None))
    return f"{reason}: {err}" if reason else f"{type(err).__name__}: {err}"


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """Create ``folder`` if needed and check that a file can be created in it.

    The package's temporaries that killed runs left in it (their owner, a process of
    this host, no longer runs) are removed meanwhile
    (:func:`roman_tweakreg._io.remove_stale_temporaries`).

    Parameters
    ----------
    folder : str or path-like
        The folder.
    what : str
        Which parameter or output chose it, for the message.

    Returns
    -------
    pathlib.Path
        ``folder``.

    Raises
    ------
    OutputError
        Naming the folder and why it cannot be written (also for root, for whom
        permission bits do not apply: a file is really created and removed).

    .. warning:: Creates ``folder`` (and its parents) when it does not exist.
    """
    folder = Path(folder or ".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)  # what killed runs left, at once
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".roman_tweakreg-probe-")
        os.close(fd)
        Path(probe).unlink()
    except OSError as err:
        raise OutputError(
            f"{folder}: the folder for {what} cannot be written: {describe_write_error(err)}; "
            "nothing was aligned"
        ) from err
    return folder


def _save(model, path) -> None:
    """Write ``model`` to ``path``, every array in a binary block.

    roman_datamodels writes arrays under 512 elements inline, as YAML lists, which
    asdf then validates number by number; binary blocks hold the same values and
    validate at once (a third less time for small arrays; large arrays are blocks
    anyway).  The file is validated against the schemas on write as before.
    """
    model.save(path, all_array_storage="internal")
