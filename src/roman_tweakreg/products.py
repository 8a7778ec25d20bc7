"""Finding the files of a run and reading their metadata (arrays never read).

Used by :mod:`roman_tweakreg.report` (reports of files and of models in memory) and
:mod:`roman_tweakreg.plots`:

* :func:`expand_paths`: the ASDF files named by paths, associations and folders;
* :func:`open_meta`: a file's ``roman.meta`` node, lazily;
* :func:`iter_metas`: ``(file name, meta)`` of models in memory or in a library;
* :func:`find_input`, :func:`inputs_map`: the input file an output was made from.

A new input layout (where outputs and inputs are found) is taught here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import TweakRegError

__all__ = ["expand_paths", "find_input", "inputs_map", "iter_metas", "open_meta"]


def expand_paths(paths_or_asn: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """List the ASDF files named by paths, association JSON files and folders.

    An association lists files under ``products[0].members[*].expname``, relative to
    its own folder; a folder stands for the ``*.asdf`` files in it (sorted), the WCS
    products ``*_wcs.asdf`` left out.

    Raises
    ------
    TweakRegError
        Naming the path, when it does not exist or an association cannot be read.
    """
    from .library import load_association

    items = [paths_or_asn] if isinstance(paths_or_asn, (str, os.PathLike)) else paths_or_asn
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.suffix.lower() == ".json":
            asn = load_association(path)
            for member in asn["products"][0]["members"]:
                name = Path(member["expname"])
                out.append(name if name.is_absolute() else path.parent / name)
        elif path.is_dir():
            # the step's WCS products (<name>_wcs.asdf) hold no image: not listed
            found = sorted(p for p in path.glob("*.asdf") if not p.name.endswith("_wcs.asdf"))
            if not found:
                raise TweakRegError(f"{path}: folder has no .asdf files")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise TweakRegError(f"{path}: no such file or folder")
    return out


@contextlib.contextmanager
def open_meta(path: str | os.PathLike) -> Iterator[Any]:
    """Open a Roman ASDF file and yield its ``roman.meta`` node; arrays are never read.

    Raises
    ------
    TweakRegError
        Naming the file, when it does not exist or is not a Roman ASDF file.
    """
    import asdf

    path = Path(path)
    if not path.is_file():
        raise TweakRegError(f"{path}: file does not exist")
    try:
        try:
            af = asdf.open(path, lazy_load=True, lazy_tree=True, memmap=False)
        except TypeError:  # asdf without lazy_tree
            af = asdf.open(path, lazy_load=True, memmap=False)
    except Exception as err:
        raise TweakRegError(f"{path}: cannot be read as an ASDF file: {err}") from err
    with af:
        try:
            meta = af["roman"]["meta"]
        except (KeyError, TypeError) as err:
            raise TweakRegError(f"{path}: not a Roman data file (no roman.meta)") from err
        yield meta


def iter_metas(library_or_models: Any) -> Iterator[tuple[str, Any]]:
    """Yield ``(file name, meta)`` of each model of a library, a model or a list of models."""
    from stpipe.library import AbstractModelLibrary

    if isinstance(library_or_models, AbstractModelLibrary):
        library = library_or_models
        with library:
            for index in range(len(library)):
                model = library.borrow(index)
                try:
                    yield str(model.meta.filename or f"image {index}"), model.meta
                finally:
                    library.shelve(model, index, modify=False)
        return
    models = [library_or_models] if hasattr(library_or_models, "meta") else library_or_models
    for index, model in enumerate(models):
        yield str(model.meta.filename or f"image {index}"), model.meta


def _input_stem(output_name: str) -> str:
    """``<root>_cal_tweakregstep.asdf`` -> ``<root>_cal``: strip the step suffix."""
    stem = Path(output_name).stem
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def find_input(output: Path, inputs: dict[str, Path] | None) -> Path | None:
    """Find the input file an output was made from.

    The input name is the output name without its last ``_<suffix>``
    (``x_cal_tweakregstep.asdf`` -> ``x_cal.asdf``).  With ``inputs`` (file
    name -> path, from ``--inputs``) only those are considered; otherwise the
    output's folder and a sibling ``inputs`` folder (the layout of
    ``roman-tweakreg example``) are searched.

    Returns
    -------
    Path or None
    """
    name = _input_stem(output.name) + output.suffix
    if inputs is not None:
        return inputs.get(name)
    for folder in (output.parent, output.parent.parent / "inputs"):
        candidate = folder / name
        if candidate.is_file() and candidate.resolve() != output.resolve():
            return candidate
    return None


def inputs_map(inputs: Iterable[str | os.PathLike] | None) -> dict[str, Path] | None:
    """File name -> path of the input files named by ``inputs`` (see :func:`expand_paths`);
    None without ``inputs``."""
    if inputs is None:
        return None
    return {p.name: p for p in expand_paths(list(inputs))}
