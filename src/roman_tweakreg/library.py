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

Any stpipe library
------------------
The step reads every library through stpipe's public protocol only (``asn``,
``borrow``/``shelve``, ``map_function``, ``group_names``/``group_indices``,
``len``), so a library built by romancal (``romancal.datamodels.ModelLibrary``)
works as one built here and is handed back, updated in place.  When romancal is
installed, :func:`open_library` builds its libraries on romancal's class (the
rules above still apply), so that romancal's later steps accept the result.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import asdf
from roman_datamodels import datamodels as rdm
from stpipe.library import AbstractModelLibrary, NoGroupID

from ._asdf_check import check_asdf_file
from ._io import open_regular, remove_stale_temporaries, temp_prefix
from ._meta import meta_get
from .errors import InvalidInputError, MissingInputError, TweakRegError

__all__ = [
    "ModelLibrary",
    "check_members",
    "exposure_group_id",
    "library_class",
    "member",
    "member_dir",
    "open_library",
    "write_association",
]

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

    With ``on_disk=True`` and no ``temp_directory``, the models' temporary files go
    to a folder under the system's temporary folder (stpipe's default is the
    current folder), named after its owner (see :func:`roman_tweakreg._io.temp_prefix`)
    and removed with the library; folders left by killed runs are removed by the next.
    """

    def __init__(self, init, *args, on_disk: bool = False, temp_directory=None, **kwargs):
        # models opened from files stay loaded (not on disk): closed with the library
        self._closes_models = not on_disk
        remove = None
        self._asn_folder = _asn_folder(init)
        if on_disk and temp_directory is None:
            remove_stale_temporaries(tempfile.gettempdir())
            temp_directory = tempfile.mkdtemp(prefix=temp_prefix("roman_tweakreg-models"))
            # removed when the library is (or at exit), like a TemporaryDirectory
            remove = weakref.finalize(self, shutil.rmtree, temp_directory, ignore_errors=True)
        self._temp_folder = None if not on_disk or temp_directory is None else Path(temp_directory)
        try:
            super().__init__(init, *args, on_disk=on_disk, temp_directory=temp_directory, **kwargs)
        except BaseException:
            if remove is not None:
                remove()
            raise
        self._asn_copy = None

    @property
    def temp_directory(self) -> Path | None:
        """The folder of the models' temporary files (``on_disk``; None otherwise, or
        stpipe's own folder when none was given to stpipe)."""
        return self._temp_folder

    @property
    def crds_observatory(self) -> str:
        """The observatory name, ``"roman"``."""
        return "roman"

    def _datamodels_open(self, filename, **kwargs):
        # romancal's open_dataset sets this on any romancal library it is given;
        # roman_datamodels 1.1 files are read as they are.
        kwargs.pop("update_version", None)
        model = _open_model(filename, **kwargs)
        if self._closes_models:
            # the library keeps the model (and its open file) as long as it lives; when it
            # is collected, the model is closed first: its file is never left to the
            # garbage collector, which may finalise the file before the model and warn
            # (ResourceWarning: unclosed file)
            weakref.finalize(self, model.close)
        return model

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

    @property
    def asn(self):
        """The association the library was made from, read-only (stpipe's ``asn``).

        stpipe builds a new read-only copy of the whole association on each access;
        reading each member's entry in turn was then quadratic in the number of
        images (at 540 images, 40 % of the catalogs phase).  The copy is built once
        here, on first use: it is read-only, and the association is not changed after
        the library is made.
        """
        if getattr(self, "_asn_copy", None) is None:
            self._asn_copy = super().asn
        return self._asn_copy

    @property
    def asn_dir(self) -> Path | None:
        """The folder of the association file (None for a list of in-memory models)."""
        return self._asn_folder


def _asn_folder(init) -> Path | None:
    """The folder stpipe reads the members of ``init`` from (its rules; None: a list)."""
    if isinstance(init, (str, Path)):
        return Path(os.path.abspath(os.path.expanduser(os.path.expandvars(init)))).parent
    if isinstance(init, Mapping):
        return Path.cwd()
    return None


def member(library: AbstractModelLibrary, index: int) -> dict:
    """Return a copy of association member ``index`` of any stpipe library (public ``asn``)."""
    return dict(library.asn["products"][0]["members"][index])


def member_dir(library: AbstractModelLibrary, index: int, entry: dict | None = None) -> Path | None:
    """The folder of member ``index``'s file, when the library says where it is; else None.

    For libraries of this package the association folder is known; for any other
    library (e.g. romancal's) only an absolute ``expname`` tells, since stpipe's
    public protocol does not give the association's folder.  ``entry``: the member's
    association entry, when the caller has read it (stpipe's ``asn`` copies the whole
    association on each access: read per member, that is quadratic in the members).
    """
    expname = (member(library, index) if entry is None else entry).get("expname")
    if isinstance(library, ModelLibrary):
        directory = library.asn_dir
        if directory is None or not expname:
            return None
        return (directory / expname).parent
    if expname and Path(str(expname)).is_absolute():
        return Path(str(expname)).parent
    return None


@cache
def library_class() -> type[ModelLibrary]:
    """The class :func:`open_library` builds: on romancal's ``ModelLibrary`` when installed.

    With romancal installed this is a subclass of both :class:`ModelLibrary` (whose rules
    apply) and ``romancal.datamodels.ModelLibrary``, so that romancal's steps take the
    step's result as their own library; without romancal, :class:`ModelLibrary`.
    """
    if importlib.util.find_spec("romancal") is None:
        return ModelLibrary
    try:
        from romancal.datamodels import ModelLibrary as RomancalLibrary
    except ImportError:  # a broken romancal installation: work without it
        return ModelLibrary
    return type(
        "RomancalModelLibrary",
        (ModelLibrary, RomancalLibrary),
        {"__module__": __name__, "__doc__": ModelLibrary.__doc__},
    )


def __getattr__(name: str):
    """``RomancalModelLibrary`` (:func:`library_class`), importable by name (pickle)."""
    if name == "RomancalModelLibrary" and library_class() is not ModelLibrary:
        return library_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _open_model(filename, **kwargs):
    """Open a Roman model lazily (arrays read on first use), without schema validation.

    Validating the whole L2 schema on read costs ~0.1 s per file, most of the time
    of opening it; outputs are validated when they are written.  The setting is made
    in an ``asdf.config_context()``, which is this thread's own and ends with the open:
    no other thread, and no later open, sees it.
    """
    if isinstance(filename, (str, Path)):
        _check_file(filename, "input file")
    # asdf loads its extensions (entry points) once per configuration object, on first
    # use: have the configuration in effect load them, so that the context's copy shares
    # them instead of loading them again on every open (about 0.1 s of CPU per file).
    asdf.get_config().extensions  # noqa: B018 - a read, as any open does
    with asdf.config_context() as config:
        config.validate_on_read = False
        try:
            return rdm.open(filename, **kwargs)
        except FileNotFoundError as err:
            raise MissingInputError(f"{filename}: input file does not exist") from err
        except MemoryError as err:
            raise InvalidInputError(f"{filename}: not enough memory to open it") from err
        except Exception as err:
            raise InvalidInputError(
                f"{filename}: cannot be opened as a Roman datamodel (expected a Roman L2 ASDF "
                f"file): {type(err).__name__}: {err}"
            ) from err


def _read_meta(filename) -> dict:
    """Read ``roman.meta`` of an ASDF file from its YAML header only (no arrays, no schemas)."""
    _check_file(filename, "association member file")
    try:
        meta = asdf.util.load_yaml(filename)["roman"]["meta"]
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidInputError(
            f"{filename}: not a Roman ASDF file (expected a roman.meta tree): {err}"
        ) from err
    except Exception as err:  # YAML errors and anything else the parser raises
        raise InvalidInputError(
            f"{filename}: cannot read its ASDF header: {type(err).__name__}: {err}"
        ) from err
    return {
        "group_id": meta.get("group_id"),
        "filename": meta.get("filename"),
        "observation": dict(meta.get("observation", {}) or {}),
    }


def _check_file(filename, what: str) -> None:
    """:func:`~roman_tweakreg._asdf_check.check_asdf_file`, a missing file as MissingInputError."""
    try:
        check_asdf_file(filename, what)
    except FileNotFoundError as err:
        raise MissingInputError(f"{filename}: {what} does not exist") from err
    except IsADirectoryError as err:
        raise InvalidInputError(f"{filename}: {what} is a folder, expected an ASDF file") from err
    except OSError as err:
        raise InvalidInputError(f"{filename}: {what} cannot be read: {err}") from err


def check_members(asn: dict, asn_dir: str | Path | None, where: str) -> None:
    """Refuse an association whose members would overwrite each other's outputs.

    Outputs are named after each input's file name, so two members with the same
    file name (the same file listed twice, or files of one name in two folders)
    would write one output and be merged into one exposure group.  Each member
    file is also checked (:func:`~roman_tweakreg._asdf_check.check_asdf_file`), so
    that a broken or hostile file stops the run before any work.

    Parameters
    ----------
    asn : dict
        The association (``products[0].members[*].expname``).
    asn_dir : str, Path or None
        Folder relative member names are taken from.
    where : str
        The association, for messages.

    Raises
    ------
    InvalidInputError
        Naming both members (and the association) that share an output name, or the
        member file that is broken.
    MissingInputError
        Naming a member file that does not exist.
    """
    _check_group_ids(asn["products"][0]["members"], where)
    seen: dict[str, tuple[int, Path]] = {}
    for index, member in enumerate(asn["products"][0]["members"]):
        expname = member["expname"]
        if not isinstance(expname, (str, Path)):
            raise InvalidInputError(
                f"{where}: member {index} has expname {expname!r}, expected a file name"
            )
        if "\x00" in str(expname):
            raise InvalidInputError(
                f"{where}: member {index} has expname {str(expname)!r}, which holds a NUL "
                "byte: no file can have that name"
            )
        path = Path(expname) if asn_dir is None else Path(asn_dir) / expname
        key = path.name.lower()
        if key in seen:
            first, other = seen[key]
            if _same_file(other, path):
                raise InvalidInputError(
                    f"{where}: member {index} ({path}) is listed twice (also member {first}); "
                    "each input may appear once"
                )
            raise InvalidInputError(
                f"{where}: members {first} ({other}) and {index} ({path}) have the same file "
                f"name, so both would be written to the output {path.name}; rename one of them"
            )
        seen[key] = (index, path)
    for _, path in seen.values():
        _check_file(path, "association member file")


def _check_group_ids(members: list, where: str) -> None:
    """Refuse group ids that differ but read alike: ``1`` (a number) and ``"1"`` (a string).

    The step names groups by text (as romancal's associations write them), so two
    such members would silently share one correction.
    """
    seen: dict[str, tuple[int, Any]] = {}
    for index, entry in enumerate(members):
        if not isinstance(entry, dict) or entry.get("group_id") in (None, ""):
            continue
        value = entry["group_id"]
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise InvalidInputError(
                f"{where}: member {index} has group_id {value!r} ({type(value).__name__}), "
                "expected a string (as romancal writes them) or an integer"
            )
        first = seen.setdefault(str(value), (index, value))
        if type(first[1]) is not type(value):
            raise InvalidInputError(
                f"{where}: members {first[0]} and {index} have group_id {first[1]!r} "
                f"({type(first[1]).__name__}) and {value!r} ({type(value).__name__}), which "
                "would be taken as one exposure group; write every group_id as a string "
                "(as romancal does), the same for members of one exposure"
            )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or a.samefile(b)
    except OSError:
        return False


def load_association(filename) -> dict:
    """Read and check a Roman association JSON file.

    Raises
    ------
    InvalidInputError
        Naming the file and what is missing when it is not an association
        with ``products[0].members[*].expname``.
    """
    path = Path(filename)
    try:
        with open_regular(path, "association file", InvalidInputError) as f:
            asn = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError as err:
        raise MissingInputError(f"{path}: association file does not exist") from err
    except OSError as err:
        raise InvalidInputError(f"{path}: association file cannot be read: {err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"{path}: not a JSON association file ({err})") from err
    except RecursionError as err:  # arrays or objects nested thousands deep
        raise InvalidInputError(
            f"{path}: not an association: its JSON is nested too deeply to read "
            "(an association is a few levels deep)"
        ) from err
    try:
        members = asn["products"][0]["members"]
        names = [m["expname"] for m in members]
    except (KeyError, IndexError, TypeError) as err:
        raise InvalidInputError(
            f"{path}: an association needs products[0].members[*].expname"
        ) from err
    if not names:
        raise InvalidInputError(f"{path}: the association's first product has no members")
    for m in members:
        m.setdefault("exptype", "science")
    return asn


def open_library(init: Any, *, on_disk: bool = False, named_outputs: bool = True) -> ModelLibrary:
    """Turn any supported input into a :class:`ModelLibrary`.

    Parameters
    ----------
    init : ImageModel, str, Path, list, dict or ModelLibrary
        A model; an ASDF file; an association JSON file; a list of models
        and/or ASDF files; an association dict; or a library (returned as is).
    on_disk : bool
        Keep models in temporary files between uses (associations only).
    named_outputs : bool
        Whether outputs will be named after the models' ``meta.filename``: then
        in-memory models sharing one are refused (they would write one output).

    Returns
    -------
    AbstractModelLibrary
        The library given, or a new one of :func:`library_class` (romancal's when
        installed).
    """
    if isinstance(init, AbstractModelLibrary):
        return init
    cls = library_class()
    if isinstance(init, rdm.DataModel):
        return cls([init])
    if isinstance(init, (str, Path)):
        path = Path(init)
        if path.suffix.lower() == ".json":
            asn = load_association(path)
            check_members(asn, path.parent, f"association {path}")
            return cls(path, on_disk=on_disk)
        if not path.exists():
            raise MissingInputError(f"{path}: input file does not exist")
        return cls(_files_asn([path]), on_disk=on_disk)
    if isinstance(init, dict):
        check_members(init, None, "association")
        return cls(init, on_disk=on_disk)
    if isinstance(init, Iterable):
        items = list(init)
        if items and all(isinstance(i, (str, Path)) for i in items):
            return cls(_files_asn([Path(i) for i in items]), on_disk=on_disk)
        if named_outputs:
            _check_model_names(items)
        return cls(items)
    raise TweakRegError(
        f"unsupported input of type {type(init).__name__}: expected an ImageModel, an ASDF "
        "file, an association JSON file, a list of those, or a ModelLibrary"
    )


def _files_asn(paths: list[Path]) -> dict:
    for p in paths:
        if not p.exists():
            raise MissingInputError(f"{p}: input file does not exist")
    members = [{"expname": str(p.resolve()), "exptype": "science"} for p in paths]
    asn = {"asn_pool": "", "products": [{"name": "files", "members": members}]}
    check_members(asn, None, "the input list")
    return asn


def _check_model_names(models: list) -> None:
    """Refuse in-memory models that would be saved under one name (``meta.filename``)."""
    seen: dict[str, int] = {}
    for index, model in enumerate(models):
        name = meta_get(getattr(model, "meta", None), "filename")
        if not name:
            continue
        key = Path(str(name)).name.lower()
        if key in seen:
            raise InvalidInputError(
                f"input models {seen[key]} and {index} have the same meta.filename "
                f"{Path(str(name)).name!r}, so both would be written to one output; give "
                "each model its own meta.filename"
            )
        seen[key] = index


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
