"""Inputs as a ModelLibrary: models, files, lists, associations; exposure groups.

Exposure groups
---------------
All detectors of one exposure share its pointing error, so they form one group
and get one correction.  A model's group is, in order:

1. the association member's ``group_id`` when the association gives one;
2. ``meta.group_id`` when the model carries one;
3. the exposure's identity from ``meta.observation``: ``<visit_id>_<exposure>``
   (e.g. ``0000101001001001001_0001``) when both are set;
4. the Roman file-name stem before the detector, ``r<visit>_<exposure>`` in
   ``r0000101001001001001_0001_wfi01_cal.asdf``;
5. otherwise the image is a group of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import asdf
from roman_datamodels import datamodels as rdm
from stpipe.library import AbstractModelLibrary, NoGroupID

from ._meta import meta_get
from .errors import MissingInputError, TweakRegError

__all__ = ["ModelLibrary", "exposure_group_id", "open_library", "write_association"]

_ROMAN_STEM = re.compile(r"^(r\d+_\d+)_wfi\d\d", re.IGNORECASE)
_UNSET = ("", "?", None, -999999)


def exposure_group_id(meta: Any, filename: str | None = None) -> str:
    """Return the exposure group of a model from its metadata (rules 2-4 above).

    Parameters
    ----------
    meta : mapping-like
        ``model.meta`` or the ``roman.meta`` tree read from an ASDF file.
    filename : str, optional
        File name used when the metadata does not identify the exposure.

    Raises
    ------
    stpipe.library.NoGroupID
        When nothing identifies the exposure.
    """
    group_id = meta_get(meta, "group_id")
    if group_id not in _UNSET:
        return str(group_id)
    obs = meta_get(meta, "observation") or {}
    visit_id, exposure = meta_get(obs, "visit_id"), meta_get(obs, "exposure")
    if visit_id not in _UNSET and exposure not in _UNSET:
        return f"{visit_id}_{int(exposure):04d}"
    name = filename or meta_get(meta, "filename")
    if name and (match := _ROMAN_STEM.match(Path(str(name)).name)):
        return match.group(1).lower()
    raise NoGroupID(f"{filename or 'model'}: no group_id, exposure identity or Roman file name")


class ModelLibrary(AbstractModelLibrary):
    """A library of Roman L2 models, on stpipe's ``AbstractModelLibrary``.

    Build it from an association file or dict, or from a list of models
    and/or file paths.  With ``on_disk=True`` (association input only) models
    are kept in temporary files between uses, so that a large association
    never holds every model in memory.

    Unlike stpipe's default, the library writes nothing into the models it
    is given (no ``group_id``, ``exptype`` or catalog attributes): groups and
    member attributes are read from the association with :meth:`member`.
    """

    @property
    def crds_observatory(self) -> str:
        """The observatory name, ``"roman"``."""
        return "roman"

    def _datamodels_open(self, filename, **kwargs):
        return _open_model(filename, **kwargs)

    @classmethod
    def _load_asn(cls, filename):
        return load_association(filename)

    def _filename_to_group_id(self, filename):
        meta = _read_meta(filename)
        return exposure_group_id(meta, str(filename))

    def _model_to_group_id(self, model):
        return exposure_group_id(model.meta, model.meta.filename)

    def _model_to_exptype(self, model):
        return "science"

    def _assign_member_to_model(self, model, member):
        # Deliberately write nothing into the caller's models.
        return None

    def member(self, index: int) -> dict:
        """Return a copy of the association member ``index`` (``expname``, ``group_id``...)."""
        return dict(self.asn["products"][0]["members"][index])

    def member_path(self, index: int) -> Path | None:
        """Return the absolute path of member ``index``'s file, or None for in-memory models."""
        directory = self.asn_dir
        if directory is None:
            return None
        return Path(directory) / self.asn["products"][0]["members"][index]["expname"]

    @property
    def asn_dir(self) -> Path | None:
        """The folder of the association file (None for a list of in-memory models)."""
        directory = getattr(self, "_asn_dir", None)
        return None if directory is None else Path(directory)


def _open_model(filename, **kwargs):
    """Open a Roman model lazily (arrays read on first use), without schema validation.

    Validating the whole L2 schema on read costs ~0.1 s per file, most of the time
    of opening it; outputs are validated when they are written.
    """
    config = asdf.get_config()
    previous = config.validate_on_read
    # set and restored around the call: asdf.config_context() would reload every
    # extension on each open, costing more than the validation it skips
    config.validate_on_read = False
    try:
        model = rdm.open(filename, **kwargs)
    except FileNotFoundError as err:
        raise MissingInputError(f"{filename}: input file does not exist") from err
    except Exception as err:
        raise TweakRegError(f"{filename}: cannot be opened as a Roman datamodel: {err}") from err
    finally:
        config.validate_on_read = previous
    return model


def _read_meta(filename) -> dict:
    """Read ``roman.meta`` of an ASDF file from its YAML header only (no arrays, no schemas)."""
    try:
        meta = asdf.util.load_yaml(filename)["roman"]["meta"]
    except FileNotFoundError as err:
        raise MissingInputError(f"{filename}: association member file does not exist") from err
    except (KeyError, TypeError, ValueError) as err:
        raise TweakRegError(f"{filename}: not a Roman ASDF file (no roman.meta): {err}") from err
    return {
        "group_id": meta.get("group_id"),
        "filename": meta.get("filename"),
        "observation": dict(meta.get("observation", {}) or {}),
    }


def load_association(filename) -> dict:
    """Read and check a Roman association JSON file.

    Raises
    ------
    TweakRegError
        Naming the file and what is missing when it is not an association
        with ``products[0].members[*].expname``.
    """
    path = Path(filename)
    try:
        asn = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise MissingInputError(f"{path}: association file does not exist") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TweakRegError(f"{path}: not a JSON association file ({err})") from err
    try:
        members = asn["products"][0]["members"]
        names = [m["expname"] for m in members]
    except (KeyError, IndexError, TypeError) as err:
        raise TweakRegError(f"{path}: an association needs products[0].members[*].expname") from err
    if not names:
        raise TweakRegError(f"{path}: the association's first product has no members")
    for m in members:
        m.setdefault("exptype", "science")
    return asn


def open_library(init: Any, *, on_disk: bool = False) -> ModelLibrary:
    """Turn any supported input into a :class:`ModelLibrary`.

    Parameters
    ----------
    init : ImageModel, str, Path, list, dict or ModelLibrary
        A model; an ASDF file; an association JSON file; a list of models
        and/or ASDF files; an association dict; or a library (returned as is).
    on_disk : bool
        Keep models in temporary files between uses (associations only).

    Returns
    -------
    ModelLibrary
    """
    if isinstance(init, AbstractModelLibrary):
        return init
    if isinstance(init, rdm.DataModel):
        return ModelLibrary([init])
    if isinstance(init, (str, Path)):
        path = Path(init)
        if path.suffix.lower() == ".json":
            return ModelLibrary(path, on_disk=on_disk)
        if not path.exists():
            raise MissingInputError(f"{path}: input file does not exist")
        return ModelLibrary(_files_asn([path]), on_disk=on_disk)
    if isinstance(init, dict):
        return ModelLibrary(init, on_disk=on_disk)
    if isinstance(init, Iterable):
        items = list(init)
        if items and all(isinstance(i, (str, Path)) for i in items):
            return ModelLibrary(_files_asn([Path(i) for i in items]), on_disk=on_disk)
        return ModelLibrary(items)
    raise TweakRegError(
        f"unsupported input of type {type(init).__name__}: expected an ImageModel, an ASDF "
        "file, an association JSON file, a list of those, or a ModelLibrary"
    )


def _files_asn(paths: list[Path]) -> dict:
    for p in paths:
        if not p.exists():
            raise MissingInputError(f"{p}: input file does not exist")
    members = [{"expname": str(p.resolve()), "exptype": "science"} for p in paths]
    return {"asn_pool": "", "products": [{"name": "files", "members": members}]}


def write_association(
    files: Iterable[str | Path],
    path: str | Path = "asn.json",
    *,
    product: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Roman association listing ``files``, to align them together.

    Members are ``{"expname": <path relative to the association's folder>, "exptype":
    "science"}`` in the order given; the step groups them by exposure from their
    metadata.  The file is what :func:`load_association` reads.

    Parameters
    ----------
    files : iterable of path
        Input ASDF files; each must exist.
    path : path
        The association file to write (written whole or not at all).
    product : str, optional
        Product name; default: the association's file stem.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
        The association written.

    Raises
    ------
    MissingInputError
        Naming a file that does not exist.
    TweakRegError
        When ``path`` exists and ``overwrite`` is False, or no file is given.
    """
    import os

    from ._io import write_atomically

    path = Path(path)
    files = [Path(f) for f in files]
    if not files:
        raise TweakRegError(f"{path}: an association needs at least one file")
    if path.exists() and not overwrite:
        raise TweakRegError(f"{path}: already exists; give another name or --force to replace it")
    for f in files:
        if not f.is_file():
            raise MissingInputError(f"{f}: input file does not exist")
    folder = path.resolve().parent
    members = [
        {"expname": Path(os.path.relpath(f.resolve(), folder)).as_posix(), "exptype": "science"}
        for f in files
    ]
    asn = {
        "asn_type": "image",
        "asn_rule": "roman_tweakreg_asn",
        "asn_pool": "",
        "products": [{"name": product or path.stem, "members": members}],
    }
    text = json.dumps(asn, indent=2) + "\n"
    return write_atomically(path, lambda p: p.write_text(text, encoding="utf-8"))
