"""A JSON report of a TweakRegStep run, and the fit results stored in output files.

:func:`build_report` summarises the models the step returned (per image, per
exposure group, statuses, parameters and timings) as a JSON-serialisable dict;
:func:`write_report` writes it atomically.  :func:`read_results` reads the same
per-image fields back from output ASDF files without loading pixel arrays, and
:func:`format_table` turns them into the table printed by
``roman-tweakreg report``.

Units: ``rmse_mas`` and ``mae_mas`` are milliarcseconds, ``shift_arcsec`` is
arcseconds (tangent-plane x, y), ``rotation_deg`` is degrees, timings are
seconds.  Values that are absent or not finite are ``None`` (JSON ``null``).
See ``docs/report.rst``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._io import write_atomically
from ._meta import meta_get
from .errors import TweakRegError

__all__ = [
    "REPORT_SCHEMA",
    "build_report",
    "expand_paths",
    "format_table",
    "image_entry",
    "open_meta",
    "read_results",
    "summarize",
    "write_report",
]

log = logging.getLogger(__name__)

#: Identifier stored in every report under ``schema``; bumped when keys change meaning.
REPORT_SCHEMA = "roman_tweakreg.report/1"

_PHASES = ("relative", "absolute")


# -- plain values -----------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """Recursively turn ASDF/numpy/astropy values into JSON values (non-finite -> None)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "isot"):  # astropy Time
        return str(value.isot)
    if hasattr(value, "items"):  # ASDF lazy dict nodes, stnode objects
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return [_plain(v) for v in value]
    return str(value)


def _number(value: Any, scale: float = 1.0) -> float | None:
    try:
        out = float(value) * scale
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _pair(value: Any) -> list[float | None] | None:
    if value is None:
        return None
    try:
        seq = list(value)
    except TypeError:
        return None
    return [_number(v) for v in seq[:2]] if len(seq) >= 2 else None


def _phase_summary(fit: Mapping | None) -> dict:
    """The report fields of one phase (or of the final fit) of ``wcs_fit_results``."""
    fit = fit or {}
    return {
        "status": meta_get(fit, "status"),
        "reason": meta_get(fit, "reason") or "",
        "fitgeom": meta_get(fit, "fitgeom"),
        "refcat": meta_get(fit, "refcat") or "",
        "nmatches": int(meta_get(fit, "nmatches", 0) or 0),
        "rmse_mas": _number(meta_get(fit, "rmse"), 1000.0),
        "mae_mas": _number(meta_get(fit, "mae"), 1000.0),
        "shift_arcsec": _pair(meta_get(fit, "shift")),
        "rotation_deg": _number(meta_get(fit, "<rot>", meta_get(fit, "proper_rot"))),
        "scale": _number(meta_get(fit, "<scale>")),
        "quality": _quality(meta_get(fit, "quality")),
    }


def _quality(quality: Mapping | None) -> dict | None:
    """The fit's quality figures (``wcs_fit_results[...]['quality']``); non-finite -> None."""
    return None if quality is None else _plain(quality)


def image_entry(meta: Any, file: str) -> dict:
    """Summarise one image's tweakreg outcome from its ``meta``.

    Parameters
    ----------
    meta : mapping-like
        ``model.meta`` or the ``roman.meta`` node of an ASDF file.
    file : str
        Name to report the image under.

    Returns
    -------
    dict
        ``file``, ``group_id``, ``status`` (``meta.cal_step.tweakreg``), ``wcs_name``,
        then the final fit (``fit_status``, ``reason``, ``fitgeom``, ``refcat``,
        ``nmatches``, ``rmse_mas``, ``mae_mas``, ``shift_arcsec``, ``rotation_deg``,
        ``scale``) and ``relative`` / ``absolute`` with the same fit keys per phase
        (``status`` there is the phase's own status), each with ``quality``: the
        fit's quality figures (see ``docs/outputs.rst``) or None where no fit was made.
    """
    fit = meta_get(meta, "wcs_fit_results")
    fit = _plain(fit) if fit is not None else None
    wcs = meta_get(meta, "wcs")
    status = meta_get(meta_get(meta, "cal_step"), "tweakreg")
    final = _phase_summary(fit)
    entry = {
        "file": file,
        "group_id": (fit or {}).get("group_id") or _group_of(meta),
        "status": str(status) if status is not None else None,
        "wcs_name": getattr(wcs, "name", None) if wcs is not None else None,
        "fit_status": final.pop("status"),
        **final,
    }
    if fit is None:
        entry["reason"] = "no meta.wcs_fit_results (tweakreg has not run on this file)"
    for phase in _PHASES:
        entry[phase] = _phase_summary((fit or {}).get(phase))
    return entry


def _group_of(meta: Any) -> str | None:
    from .library import exposure_group_id

    try:
        return exposure_group_id(meta)
    except Exception:
        return None


# -- reports of a run -------------------------------------------------------------------------
def _iter_metas(library_or_models: Any) -> Iterator[tuple[str, Any]]:
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


def _group_entries(images: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for img in images:
        groups.setdefault(str(img["group_id"]), []).append(img)
    out = []
    for group_id, members in groups.items():
        first = members[0]
        out.append(
            {
                "group_id": group_id,
                "n_images": len(members),
                "files": [m["file"] for m in members],
                "statuses": dict(Counter(str(m["status"]) for m in members)),
                "wcs_names": sorted({str(m["wcs_name"]) for m in members}),
                **{phase: dict(first[phase]) for phase in _PHASES},
            }
        )
    return out


def _statuses(images: list[dict]) -> dict:
    return {
        "cal_step": dict(Counter(str(i["status"]) for i in images)),
        **{phase: dict(Counter(str(i[phase]["status"]) for i in images)) for phase in _PHASES},
    }


def build_report(
    library_or_models: Any,
    *,
    parameters: dict,
    timings: dict | None = None,
    outputs: list[str | None] | None = None,
) -> dict:
    """Build the JSON-serialisable report of a TweakRegStep run.

    Models are only read (a library's models are shelved with ``modify=False``).

    Parameters
    ----------
    library_or_models : ModelLibrary, ImageModel or list of ImageModel
        The step's result (or its input after the step ran on it in memory).
    parameters : dict
        The step parameters, e.g. ``step.get_pars()``.
    timings : dict or None
        Seconds per phase, e.g. ``{"catalogs": 1.2, "relative": 3.4}``.
    outputs : list or None
        The output file written for each image (None where it was not written), in
        library order; None when the step saves no files.

    Returns
    -------
    dict
        ``schema``, ``created`` (UTC ISO time), ``version``, ``parameters``, ``outputs``
        (``expected``, ``written``, ``complete`` and ``missing``; null when no files
        were to be saved; each image entry then has its ``output`` file or null),
        ``timings`` (s), ``statuses`` (counts of ``meta.cal_step.tweakreg`` values and
        of each phase's status), ``images`` (:func:`image_entry` per image) and
        ``groups`` (per exposure group: ``group_id``, ``n_images``, ``files``,
        ``statuses``, ``wcs_names``, ``relative`` and ``absolute`` fit summaries).
    """
    images = [image_entry(meta, name) for name, meta in _iter_metas(library_or_models)]
    report = summarize(images, parameters=parameters, timings=timings)
    report["outputs"] = None
    if outputs is not None:
        for image, path in zip(images, outputs, strict=False):
            image["output"] = path
        written = [p for p in outputs if p is not None]
        report["outputs"] = {
            "expected": len(images),
            "written": len(written),
            "complete": len(written) == len(images),
            "missing": [i["file"] for i, p in zip(images, outputs, strict=False) if p is None],
        }
    return report


def summarize(
    images: list[dict], *, parameters: dict | None = None, timings: dict | None = None
) -> dict:
    """Assemble a report from :func:`image_entry` dicts (see :func:`build_report`).

    ``roman-tweakreg report --json`` uses it on :func:`read_results` entries, with
    empty ``parameters`` and ``timings``.
    """
    from . import __version__

    return {
        "schema": REPORT_SCHEMA,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "version": __version__,
        "parameters": _plain(dict(parameters or {})),
        "timings": {str(k): _number(v) for k, v in (timings or {}).items()},
        "statuses": _statuses(images),
        "images": images,
        "groups": _group_entries(images),
    }


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Write ``report`` as indented JSON, atomically (temporary file, then ``os.replace``).

    Parameters
    ----------
    report : dict
        As returned by :func:`build_report`.
    path : str or path-like
        Output file; its folder is created when needed.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    TweakRegError
        When the report cannot be serialised or written (the message names the file).
    """
    path = Path(path)
    try:
        text = json.dumps(_plain(report), indent=2, allow_nan=False) + "\n"
        write_atomically(path, lambda p: p.write_text(text, encoding="utf-8"))
    except (TypeError, ValueError, OSError) as err:
        raise TweakRegError(f"{path}: cannot write the tweakreg report: {err}") from err
    log.info("Wrote the tweakreg report %s", path)
    return path


# -- fit results stored in files --------------------------------------------------------------
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


def read_results(paths_or_asn: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict]:
    """Read the tweakreg outcome stored in output ASDF files.

    Parameters
    ----------
    paths_or_asn : path or iterable of paths
        Output ASDF files, association JSON files listing them, or folders of them.

    Returns
    -------
    list of dict
        One :func:`image_entry` per file, plus ``path`` (the file read).

    Raises
    ------
    TweakRegError
        Naming the file, when it is missing or not a Roman ASDF file.
    """
    out = []
    for path in expand_paths(paths_or_asn):
        with open_meta(path) as meta:
            entry = image_entry(meta, path.name)
        entry["path"] = str(path)
        out.append(entry)
    return out


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(entries: list[dict]) -> str:
    """Format :func:`read_results` entries as a fixed-width text table, one row per file.

    Columns: file, group, status (``meta.cal_step.tweakreg``), WCS name, number of
    matches, fit RMS (mas), shift x/y (arcsec), rotation (deg) and the reason.
    """
    rows = [
        (
            "file",
            "group",
            "status",
            "wcs name",
            "nmatches",
            "rmse [mas]",
            "shift x,y [arcsec]",
            "rot [deg]",
            "reason",
        )
    ]
    for e in entries:
        shift = e.get("shift_arcsec")
        shift_txt = "-" if not shift else f"{_fmt(shift[0], '+.4f')},{_fmt(shift[1], '+.4f')}"
        rows.append(
            (
                e["file"],
                str(e.get("group_id") or "-"),
                str(e.get("status") or "-"),
                str(e.get("wcs_name") or "-"),
                str(e.get("nmatches", 0)),
                _fmt(e.get("rmse_mas"), ".3f"),
                shift_txt,
                _fmt(e.get("rotation_deg"), "+.5f"),
                e.get("reason") or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for k, row in enumerate(rows):
        cells = [
            c.ljust(w) if i in (0, 1, 2, 3) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row[:-1], widths, strict=True))
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
        if k == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)
