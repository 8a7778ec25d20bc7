"""A JSON report of a TweakRegStep run, and the fit results stored in output files.

:func:`build_report` summarises the models the step returned (per image, per
exposure group, statuses, parameters and timings) as a JSON-serialisable dict;
:func:`write_report` writes it atomically.  :func:`read_results` reads the same
per-image fields back from output ASDF files without loading pixel arrays, and
:func:`format_report` turns them into what ``roman-tweakreg report`` prints (a
table, CSV or JSON).

Units: ``rmse_mas`` and ``mae_mas`` are milliarcseconds, ``shift_arcsec`` is
arcseconds (tangent-plane x, y), ``rotation_deg`` is degrees, timings are
seconds.  Values that are absent or not finite are ``None`` (JSON ``null``).
See ``docs/report.rst``.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._io import write_atomically
from ._meta import meta_get
from .errors import TweakRegError
from .products import expand_paths, iter_metas, open_meta
from .results import Key, keys_rst, plain

__all__ = [
    "GROUP_FIELDS",
    "IMAGE_FIELDS",
    "REPORT_KEYS",
    "REPORT_SCHEMA",
    "TABLE_DECIMALS",
    "TABLE_WIDTH",
    "Field",
    "build_report",
    "fields_rst",
    "fit_results_table",
    "format_report",
    "group_prefix",
    "group_rows",
    "image_entry",
    "image_rows",
    "read_results",
    "schema_rst",
    "summarize",
    "write_report",
]

log = logging.getLogger(__name__)

#: Identifier stored in every report under ``schema``; bumped when keys change meaning.
REPORT_SCHEMA = "roman_tweakreg.report/2"

_PHASES = ("relative", "absolute")

#: Keys of a fit summary: the final fit of an image entry, and ``relative`` / ``absolute``.
_REPORT_FIT_KEYS = (
    Key("status", "The fit's status (in an image entry: ``fit_status``); see ``wcs_fit_results``.",
        get=lambda fit: meta_get(fit, "status")),
    Key("reason", "Why the fit failed or was skipped.",
        get=lambda fit: meta_get(fit, "reason") or ""),
    Key("fitgeom", "Fit geometry.", get=lambda fit: meta_get(fit, "fitgeom")),
    Key("refcat", "Reference catalog of an absolute fit.",
        get=lambda fit: meta_get(fit, "refcat") or ""),
    Key("nmatches", "Matched pairs of the fit (the group's own).",
        get=lambda fit: int(meta_get(fit, "nmatches", 0) or 0)),
    Key("image_nmatches", "Of those, the pairs of the image's own sources (null where not "
        "recorded).", get=lambda fit: _count(meta_get(fit, "image_nmatches"))),
    Key("rmse_mas", "RMS residual (milliarcseconds).",
        get=lambda fit: _number(meta_get(fit, "rmse"), 1000.0)),
    Key("mae_mas", "Mean absolute residual (milliarcseconds).",
        get=lambda fit: _number(meta_get(fit, "mae"), 1000.0)),
    Key("shift_arcsec", "Shift ``[x, y]`` (arcseconds in the tangent plane).",
        get=lambda fit: _pair(meta_get(fit, "shift"))),
    Key("rotation_deg", "Mean rotation ``<rot>`` (degrees).",
        get=lambda fit: _number(meta_get(fit, "<rot>", meta_get(fit, "proper_rot")))),
    Key("scale", "Mean scale ``<scale>``.", get=lambda fit: _number(meta_get(fit, "<scale>"))),
    Key("shift_sigma_mas", "1-sigma uncertainty of the shift ``[x, y]`` (milliarcseconds; "
        "null where not recorded).", get=lambda fit: _pair(meta_get(fit, "shift_sigma_mas"))),
    Key("rotation_sigma_arcsec", "1-sigma uncertainty of the rotation (arcseconds).",
        get=lambda fit: _number(meta_get(fit, "rot_sigma_arcsec"))),
    Key("scale_sigma", "1-sigma uncertainty of the scale.",
        get=lambda fit: _number(meta_get(fit, "scale_sigma"))),
    Key("skew_sigma_arcsec", "1-sigma uncertainty of the skew (arcseconds).",
        get=lambda fit: _number(meta_get(fit, "skew_sigma_arcsec"))),
    Key("quality", "The fit's quality figures as in ``wcs_fit_results`` (null where no fit "
        "was made).", get=lambda fit: _quality(meta_get(fit, "quality"))),
)  # fmt: skip

#: Every key table of the JSON report (:func:`build_report`), by the name the docs use;
#: with :data:`roman_tweakreg.results.SCHEMA` the one definition of what is written.
REPORT_KEYS = {
    "report": (
        Key("schema", f"``{REPORT_SCHEMA}``."),
        Key("created", "UTC time the report was made (ISO 8601)."),
        Key("version", "roman_tweakreg version."),
        Key("made_from", "``run``: written by the step (or :func:`build_report`) from the "
            "models it aligned; ``files``: made from output files (``roman-tweakreg report``, "
            ":func:`summarize`), which do not record the parameters and timings."),
        Key("parameters", "The step parameters as run; null when made from files (the "
            "outputs do not record them)."),
        Key("timings", "Seconds per phase (null when made from files), as given by the "
            "caller. The step gives its own "
            "clock's: ``catalogs``, ``relative`` (when there are several groups), "
            "``absolute``, ``update``, ``save`` (when it saves its outputs; the report itself "
            "is written after) and ``total``; the same figures are kept on the step as "
            "``TweakRegStep.timings`` after a run."),
        Key("statuses", "Counts per value: ``cal_step`` (``meta.cal_step.tweakreg``), "
            "``relative`` and ``absolute`` (each phase's status)."),
        Key("images", "One entry per image (the keys below)."),
        Key("outputs", "Which outputs exist (the keys below); null when the step saved no "
            "files."),
        Key("groups", "One entry per exposure group (the keys below)."),
        Key("fits", "The rows of the report's fit table, one per exposure group and phase "
            "(groups moved by one absolute fit share a row): the columns of "
            ":data:`GROUP_FIELDS`, by their CSV and JSON names (see above)."),
    ),
    "report.image": (
        Key("file", "The image's file name."),
        Key("group_id", "Its exposure group."),
        Key("status", "``meta.cal_step.tweakreg``."),
        Key("wcs_name", "``meta.wcs.name``."),
        Key("catalog", "The catalog file it was aligned with, when its metadata names one."),
        Key("n_sources", "Its usable catalog sources."),
        Key("fit_status", "The status of the fit that set the final WCS (SUCCESS, FAILED, "
            "SKIPPED); the other keys of that fit follow (the fit keys below)."),
        *(k for k in _REPORT_FIT_KEYS if k.name != "status"),
        Key("relative", "The relative phase's fit (the fit keys below), ``status`` being the "
            "phase's own."),
        Key("absolute", "The absolute phase's fit (the fit keys below)."),
        Key("path", "The file read (only in entries read from files, "
            ":func:`~roman_tweakreg.report.read_results`)."),
        Key("output", "The output file written for the image, or null when it was not "
            "written (only when the step saved its outputs)."),
    ),
    "report.fit": _REPORT_FIT_KEYS,
    "report.group": (
        Key("group_id", "The exposure group."),
        Key("n_images", "Its images."),
        Key("files", "Their files."),
        Key("statuses", "Counts of their ``meta.cal_step.tweakreg`` values."),
        Key("wcs_names", "Their WCS names."),
        Key("relative", "The relative fit summary (shared by the group's images)."),
        Key("absolute", "The absolute fit summary."),
    ),
    "report.outputs": (
        Key("expected", "Outputs expected: one per image."),
        Key("written", "Outputs written."),
        Key("complete", "``written == expected``."),
        Key("missing", "The images whose output was not written."),
    ),
}  # fmt: skip


# -- plain values -----------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON values of ASDF/numpy/astropy values (:func:`~roman_tweakreg.results.plain`,
    non-finite -> None)."""
    return plain(value, nan_as_none=True)


def _number(value: Any, scale: float = 1.0) -> float | None:
    try:
        out = float(value) * scale
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


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
    return {key.name: key.get(fit) for key in _REPORT_FIT_KEYS}


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
        ``catalog`` (the catalog file name, when the metadata names one), ``n_sources``
        (its usable catalog sources, when recorded), then the
        final fit (``fit_status``, ``reason``, ``fitgeom``, ``refcat``,
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
        "catalog": _catalog_of(meta),
        "n_sources": (fit or {}).get("n_sources"),
        "fit_status": final.pop("status"),
        **final,
    }
    if fit is None:
        entry["reason"] = "no meta.wcs_fit_results (tweakreg has not run on this file)"
    for phase in _PHASES:
        entry[phase] = _phase_summary((fit or {}).get(phase))
    return entry


def _catalog_of(meta: Any) -> str | None:
    """The catalog file the image was aligned with, when named in its metadata."""
    value = meta_get(meta, "tweakreg_catalog")
    if not isinstance(value, str) or not value:
        value = meta_get(meta_get(meta, "source_catalog"), "tweakreg_catalog_name")
    return Path(value).name if isinstance(value, str) and value else None


def _group_of(meta: Any) -> str | None:
    from stpipe.library import NoGroupID

    from .library import exposure_group_id

    try:
        return exposure_group_id(meta)
    except (NoGroupID, TypeError, ValueError) as err:  # nothing (usable) names the exposure
        log.debug("No exposure group: %s", err)
        return None


# -- reports of a run -------------------------------------------------------------------------
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
        The report (``made_from`` ``run``): ``schema``, ``created`` (UTC ISO time),
        ``version``, ``parameters``, ``outputs`` (``expected``, ``written``,
        ``complete`` and ``missing``; null when no files were to be saved; each image
        entry then has its ``output`` file or null), ``timings`` (s), ``statuses``
        (counts of ``meta.cal_step.tweakreg`` values and of each phase's status),
        ``images`` (:func:`image_entry` per image), ``groups`` (per exposure group:
        ``group_id``, ``n_images``, ``files``, ``statuses``, ``wcs_names``,
        ``relative`` and ``absolute`` fit summaries) and ``fits`` (:func:`group_rows`).
    """
    images = [image_entry(meta, name) for name, meta in iter_metas(library_or_models)]
    report = summarize(images, parameters=parameters, timings=timings or {})
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
    """Assemble a report from :func:`image_entry` dicts (the layout of :func:`build_report`).

    ``roman-tweakreg report`` uses it on :func:`read_results` entries, for both
    ``--format json`` and ``--json FILE``.  Without ``parameters`` the report is one
    made from files (``made_from`` ``files``): output files do not record the step
    parameters and timings, so both are null, not empty.
    """
    from . import __version__

    from_files = parameters is None
    return {
        "schema": REPORT_SCHEMA,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "version": __version__,
        "made_from": "files" if from_files else "run",
        "parameters": None if from_files else _plain(dict(parameters)),
        "timings": (
            None
            if from_files and not timings
            else {str(k): _number(v) for k, v in (timings or {}).items()}
        ),
        "statuses": _statuses(images),
        "outputs": None,
        "images": images,
        "groups": _group_entries(images),
        "fits": group_rows(images),
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


# -- the report an astronomer reads: one declaration per column -------------------------------
#: Width the text table of ``roman-tweakreg report`` is made to fit (a terminal's 120 columns).
TABLE_WIDTH = 120


@dataclass(frozen=True)
class Field:
    """One column of ``roman-tweakreg report``, declared once for every view.

    The text table and its legend, CSV, JSON and the column table of
    ``docs/report.rst`` are all made from these declarations (a test checks the docs),
    so a new column is one line in :data:`GROUP_FIELDS` or :data:`IMAGE_FIELDS`.

    Attributes
    ----------
    name : str
        Key in CSV and JSON rows.
    header : str
        Column heading in the text table (the unit goes on a line below it).
    unit : str
        Unit of the value (``mas``, ``deg``) or ``''``.
    fmt : str
        Format specification of the value in the text table.
    doc : str
        One-line meaning, for the documentation and the table's legend.
    get : callable
        ``get(row)`` -> value, from a :func:`group_rows` / :func:`image_rows` source dict.
    column : bool
        Shown as a column of the text table; otherwise on a line of its own under the
        row (the reason), in the heading (the reference catalog) or only in CSV and
        JSON (the catalog file name), so that the table fits :data:`TABLE_WIDTH`.
    """

    name: str
    header: str
    unit: str
    fmt: str
    doc: str
    get: Callable[[dict], Any]
    column: bool = True

    @property
    def title(self) -> str:
        """The heading with its unit, e.g. ``rms [mas]``."""
        return f"{self.header} [{self.unit}]" if self.unit else self.header

    def text(self, value: Any) -> str:
        """``value`` formatted for the table (``-`` for an absent number)."""
        if value is None or value == "":
            return "" if self.fmt == "s" else "-"
        return format(value, self.fmt)


def _q(row: dict, key: str) -> float | None:
    """A quality figure of a fit row, or None."""
    return _number((row.get("quality") or {}).get(key))


def _shift_mas(row: dict, axis: int) -> float | None:
    shift = row.get("shift_arcsec")
    return None if not shift or shift[axis] is None else 1000.0 * shift[axis]


def _sigma(row: dict, key: str, axis: int | None = None) -> float | None:
    """An uncertainty of a fit row (one axis of a pair), or None."""
    value = row.get(key)
    if axis is not None:
        value = None if not value else value[axis]
    return _number(value)
def _own_relative(entry: dict) -> int | None:
    """An image's pairs in its group's relative fit; None for the reference group (not fitted)."""
    relative = entry.get("relative") or {}
    return None if relative.get("status") == "REFERENCE" else relative.get("image_nmatches")


#: Columns of the fit rows: one per exposure group and phase (groups aligned to the
#: reference catalog by one fit share a row).
GROUP_FIELDS = (
    Field("group", "group", "", "s",
          "Exposure group(s) the fit moved; groups moved by one absolute fit share a row "
          "(ids joined by ``+``; in the text table shortened to what follows the ids' "
          "common beginning, which the table's heading gives).",
          lambda r: r["group"]),
    Field("phase", "phase", "", "s",
          "``relative`` (to the other exposures) or ``absolute`` (to the reference catalog); "
          "in the text table, the part of the table the row is in.",
          lambda r: r["phase"], column=False),
    Field("n_images", "images", "", "d", "Images moved by this fit.", lambda r: r["n_images"]),
    Field("status", "status", "", "s",
          "The phase's status: SUCCESS, REFERENCE (the group the others were aligned to), "
          "FAILED or SKIPPED.",
          lambda r: r["status"]),
    Field("refcat", "refcat", "", "s",
          "Reference catalog of an absolute fit (in the text table, in the heading of the "
          "absolute fits).",
          lambda r: r["refcat"], column=False),
    Field("nmatches", "matches", "", "d",
          "Matched pairs the fit used (``nmatches`` of the phase in ``meta.wcs_fit_results``; "
          "summed over the groups of a shared row; ``-`` (null) for the reference group, "
          "which is not fitted).",
          lambda r: None if r["status"] == "REFERENCE" else r["nmatches"]),
    Field("shift_x_mas", "shift x", "mas", "+.2f",
          "The fit's own correction: tangent-plane shift along x.",
          lambda r: _shift_mas(r, 0)),
    Field("shift_y_mas", "shift y", "mas", "+.2f", "Tangent-plane shift along y.",
          lambda r: _shift_mas(r, 1)),
    Field("shift_x_sigma_mas", "± x", "mas", ".2f",
          "1-sigma uncertainty of the shift along x (``shift_sigma_mas``; in the text table "
          "on a line ``±`` under the row, with the next two).",
          lambda r: _sigma(r, "shift_sigma_mas", 0), column=False),
    Field("shift_y_sigma_mas", "± y", "mas", ".2f", "The same along y.",
          lambda r: _sigma(r, "shift_sigma_mas", 1), column=False),
    Field("rotation_deg", "rotation", "deg", "+.6f", "Mean rotation ``<rot>``.",
          lambda r: r["rotation_deg"]),
    Field("rotation_sigma_arcsec", "± rot", "arcsec", ".4f",
          "1-sigma uncertainty of the rotation (``rotation_sigma_arcsec``).",
          lambda r: _sigma(r, "rotation_sigma_arcsec"), column=False),
    Field("rmse_mas", "rms", "mas", ".2f",
          "RMS residual of the fit (of all its pairs in a shared row).",
          lambda r: r["rmse_mas"]),
    Field("mae_mas", "mae", "mas", ".2f", "Mean absolute residual of the fit.",
          lambda r: r["mae_mas"]),
    Field("expected_chance", "chance", "", ".1f",
          "Pairs chance alone would give for these source densities "
          "(``quality.expected_chance``); far below ``matches`` for a true match.",
          lambda r: _q(r, "expected_chance")),
    Field("significance", "signif.", "sigma", ".1f",
          "How far the matches stand above chance, in Gaussian sigma; 5 or more needed "
          "(``quality.significance``; the lowest of the groups' in a shared row).",
          lambda r: _q(r, "significance")),
    Field("rmse_over_noise", "rms/noise", "", ".2f",
          "RMS residual over the residuals' robust core, near 1 when the residuals are "
          "noise, far above with mismatches (``quality.rmse_over_noise``; the highest of "
          "the groups' in a shared row).",
          lambda r: _q(r, "rmse_over_noise")),
    Field("matched_fraction", "matched", "", ".2f",
          "Pairs over the smaller source count in the overlap, 0 to 1 "
          "(``quality.matched_fraction``).",
          lambda r: _q(r, "matched_fraction")),
    Field("reason", "reason", "", "s",
          "Why the fit failed or was skipped (see :doc:`troubleshooting`; in the text table "
          "on a line of its own under the row).",
          lambda r: r["reason"], column=False),
)  # fmt: skip

#: Columns of the image rows: only what is the image's own.
IMAGE_FIELDS = (
    Field("file", "file", "", "s", "The output file.", lambda r: r["file"]),
    Field("group", "group", "", "s",
          "Its exposure group (``wcs_fit_results.group_id``; shortened in the text table as "
          "in the fits).",
          lambda r: r.get("group_id")),
    Field("status", "status", "", "s",
          "``meta.cal_step.tweakreg``: COMPLETE, FAILED, SKIPPED (INCOMPLETE: tweakreg has "
          "not run on the file).",
          lambda r: r.get("status")),
    Field("wcs_name", "wcs name", "", "s",
          "``meta.wcs.name``: ``FIT-LVL2-<refcat>`` or ``FIT-LVL2-RELATIVE``; unchanged "
          "when no fit applied.",
          lambda r: r.get("wcs_name")),
    Field("catalog", "catalog", "", "s",
          "The source catalog the image was aligned with (CSV and JSON only).",
          lambda r: r.get("catalog"), column=False),
    Field("n_sources", "sources", "", "d",
          "Its usable catalog sources (``wcs_fit_results.n_sources``).",
          lambda r: r.get("n_sources")),
    Field("relative_nmatches", "rel. matches", "", "d",
          "Pairs of its own sources in its group's relative fit "
          "(``wcs_fit_results.relative.image_nmatches``); ``-`` (null) in the reference "
          "group, whose sources are the reference and were not fitted.",
          _own_relative),
    Field("absolute_nmatches", "abs. matches", "", "d",
          "Pairs of its own sources in its group's absolute fit "
          "(``wcs_fit_results.absolute.image_nmatches``); a group's images sum to its "
          "``matches``.",
          lambda r: (r.get("absolute") or {}).get("image_nmatches")),
    Field("reason", "reason", "", "s",
          "Why the image was not aligned, or its fits failed (in the text table on a line "
          "of its own under the row).",
          lambda r: r.get("reason"), column=False),
)  # fmt: skip

_FIT_KEYS_OF_ROW = ("status", "refcat", "nmatches", "shift_arcsec", "rotation_deg", "rmse_mas",
                    "mae_mas", "reason", "shift_sigma_mas", "rotation_sigma_arcsec")  # fmt: skip
#: What one absolute fit of several groups gives each of them alike (the rest is each one's).
_SHARED_KEYS = ("status", "refcat", "fitgeom", "shift_arcsec", "rotation_deg", "scale")


def schema_rst(name: str) -> str:
    """The reST table of the keys of ``wcs_fit_results`` or the JSON report named ``name``
    (a key of :data:`roman_tweakreg.results.SCHEMA` or :data:`REPORT_KEYS`; the docs'
    ``schema-keys`` directive).

    Raises
    ------
    ValueError
        For another ``name``.
    """
    from .results import SCHEMA

    tables = {**SCHEMA, **REPORT_KEYS}
    if name not in tables:
        raise ValueError(f"name={name!r}: expected one of {', '.join(tables)}")
    return keys_rst(tables[name])


def fields_rst(kind: str) -> str:
    """The reST table of the report's ``fits`` or ``images`` columns (used by the docs).

    Raises
    ------
    ValueError
        For another ``kind``.
    """
    fields = {"fits": GROUP_FIELDS, "images": IMAGE_FIELDS}.get(kind)
    if fields is None:
        raise ValueError(f"kind={kind!r}: expected fits or images")
    lines = [".. list-table::", "   :header-rows: 1", "", "   * - Column", "     - Meaning"]
    for f in fields:
        lines += [f"   * - ``{f.title}``", f"     - {f.doc} (``{f.name}`` in CSV and JSON)"]
    return "\n".join(lines)


def _combine(rows: list[dict]) -> dict:
    """One row of several groups moved by one absolute fit, from each group's own figures.

    The correction is shared; pairs add up, the rms is that of all pairs
    (``sqrt(sum(n rms^2) / sum(n))``), the mae their mean, the chance pairs add up, the
    matched fraction is all pairs over all sources that could pair, and of the figures
    that do not add up the least favourable is given: the lowest significance, the
    highest rms/noise.
    """
    out = dict(rows[0])
    out["group"] = "+".join(r["group"] for r in rows)
    out["n_images"] = sum(r["n_images"] for r in rows)
    counts = [int(r.get("nmatches") or 0) for r in rows]
    total = sum(counts)
    out["nmatches"] = total

    def pooled(key: str, power: int) -> float | None:
        values = [(n, r.get(key)) for n, r in zip(counts, rows, strict=True)]
        if total == 0 or any(v is None for n, v in values if n):
            return None
        return (sum(n * v**power for n, v in values if n) / total) ** (1.0 / power)

    out["rmse_mas"] = pooled("rmse_mas", 2)
    out["mae_mas"] = pooled("mae_mas", 1)
    qualities = [r.get("quality") or {} for r in rows]
    if all(qualities):
        smaller = sum(
            n / q["matched_fraction"] if q.get("matched_fraction") else 0.0
            for n, q in zip(counts, qualities, strict=True)
        )
        chance = [q.get("expected_chance") for q in qualities]
        signif = [q.get("significance") for q in qualities]
        noise = [q.get("rmse_over_noise") for q in qualities]
        out["quality"] = {
            "expected_chance": None if None in chance else sum(chance),
            "significance": None if None in signif else min(signif),
            "rmse_over_noise": None if None in noise else max(noise),
            "matched_fraction": min(1.0, total / smaller) if smaller else None,
        }
    else:
        out["quality"] = None
    return out


def group_rows(entries: list[dict]) -> list[dict]:
    """One row per exposure group and phase, from :func:`image_entry` dicts.

    A phase that was not run for any image of the group (SKIPPED, ``not run``) has no
    row.  Groups moved by one absolute fit (the same correction, status and reference
    catalog) share one row, whose figures are those of all their pairs (see
    :data:`GROUP_FIELDS`); groups whose absolute fit failed or was skipped alike share
    one row too.  Values are those of :data:`GROUP_FIELDS`, keyed by their ``name``.
    """
    groups: dict[str, list[dict]] = {}
    for entry in entries:
        if entry.get("fit_status") is not None:
            groups.setdefault(str(entry.get("group_id")), []).append(entry)
    rows: list[dict] = []
    for phase in _PHASES:
        merged: dict[tuple, list[dict]] = {}
        for group, members in groups.items():
            fit = members[0][phase]
            if fit.get("status") in (None, "SKIPPED") and fit.get("reason") == "not run":
                continue
            source = {"group": group, "phase": phase, "n_images": len(members),
                      "quality": fit.get("quality"),
                      **{k: fit.get(k) for k in _FIT_KEYS_OF_ROW}}  # fmt: skip
            keys = _SHARED_KEYS if fit.get("status") == "SUCCESS" else _FIT_KEYS_OF_ROW
            key = tuple(json.dumps(_plain(fit.get(k))) for k in keys)
            if phase == "relative":  # each group's own fit
                key = (group, *key)
            merged.setdefault(key, []).append(source)
        for alike in merged.values():
            shared = len(alike) > 1 and alike[0]["status"] == "SUCCESS"
            rows.append(_combine(alike) if shared else _combine_alike(alike))
    return [{f.name: _plain(f.get(r)) for f in GROUP_FIELDS} for r in rows]


def _combine_alike(rows: list[dict]) -> dict:
    """One row of groups whose absolute fit failed or was skipped alike (same figures)."""
    if len(rows) == 1:
        return rows[0]
    out = dict(rows[0])
    out["group"] = "+".join(r["group"] for r in rows)
    out["n_images"] = sum(r["n_images"] for r in rows)
    return out


def image_rows(entries: list[dict]) -> list[dict]:
    """One row per image with only its own values (see :data:`IMAGE_FIELDS`)."""
    return [{f.name: _plain(f.get(e)) for f in IMAGE_FIELDS} for e in entries]


# -- the text table -----------------------------------------------------------------------------
def group_prefix(ids: Iterable[str]) -> str:
    """The common beginning of exposure group ids, up to a ``_``, leaving each id a part.

    The report's text table and the figures show the ids without it (``0001`` for
    ``0000101001001001001_0001``); '' when the ids share no such beginning.
    """
    ids = [i for i in ids if i and i != "None"]
    if not ids:
        return ""
    common = min(ids)
    for other in ids:  # the common beginning of the strings (not of path components)
        while not other.startswith(common):
            common = common[:-1]
    cut = common.rfind("_") + 1
    if cut and all(len(i) > cut for i in ids):
        return common[:cut]
    return ""


def _short_group(group: Any, prefix: str, most: int = 3) -> str:
    if group is None:
        return ""
    parts = [p.removeprefix(prefix) for p in str(group).split("+")]
    if len(parts) > most:
        return f"{parts[0]}+...+{parts[-1]} ({len(parts)})"
    return "+".join(parts)


def _plain_text(doc: str) -> str:
    """A field's reST doc as plain text (``code`` and :role:`x` markup removed)."""
    text = re.sub(r":\w+:`([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", doc)
    return text.replace("``", "")


def _text_table(fields: tuple[Field, ...], rows: list[dict], prefix: str) -> list[str]:
    """Fixed-width rows of the table columns; each note (reason) on a line under its row."""
    shown = [f for f in fields if f.column]
    cells = []
    for r in rows:
        values = dict(r)
        values["group"] = _short_group(r.get("group"), prefix)
        cells.append([f.text(values[f.name]) for f in shown])
    heads = [[f.header, f"[{f.unit}]" if f.unit else ""] for f in shown]
    for i, head in enumerate(heads):  # a two-word heading on two lines to narrow its column
        words = head[0].split(" ")
        data = max((len(c[i]) for c in cells), default=0)
        if not head[1] and len(words) == 2 and data < len(head[0]):
            head[:] = words
    widths = [
        max([len(h) for h in head] + [len(c[i]) for c in cells])
        for i, head in enumerate(heads)
    ]

    def line(texts: list[str]) -> str:
        parts = [
            t.ljust(w) if f.fmt == "s" else t.rjust(w)
            for f, t, w in zip(shown, texts, widths, strict=True)
        ]
        return "  ".join(parts).rstrip()

    lines = [line([h[0] for h in heads])]
    if any(h[1] for h in heads):
        lines.append(line([h[1] for h in heads]))
    lines.append("-" * max(len(x) for x in lines))
    for r, texts in zip(rows, cells, strict=True):
        lines.append(line(texts))
        notes = [str(r.get(f.name)) for f in fields if not f.column and f.name == "reason"
                 and r.get(f.name)]  # fmt: skip
        lines += [f"    ^ {note}" for note in notes]
        sigmas = [(f, r.get(f.name)) for f in fields if f.name in _SIGMA_FIELDS]
        if any(v is not None for _, v in sigmas):
            lines.append("    ± " + ", ".join(
                f"{f.header.removeprefix('± ')} {f.text(v)} {f.unit}" for f, v in sigmas
            ))  # fmt: skip
    return lines


#: Uncertainties of a fit, on a line ``±`` under its row in the text table.
_SIGMA_FIELDS = ("shift_x_sigma_mas", "shift_y_sigma_mas", "rotation_sigma_arcsec")


def _legend(fields: tuple[Field, ...]) -> list[str]:
    import textwrap

    width = max(len(f.header) for f in fields if f.column)
    out = []
    for f in fields:
        if not f.column:
            continue
        text = _plain_text(f.doc)
        out += textwrap.wrap(
            text,
            TABLE_WIDTH,
            initial_indent=f"  {f.title.ljust(width + 6)}  "[: width + 10],
            subsequent_indent=" " * (width + 10),
        )
    if any(f.name in _SIGMA_FIELDS for f in fields):
        out += textwrap.wrap(
            "1-sigma uncertainties of the fit's shift (x, y) and rotation, from its weighted "
            "residuals and the design of the fit, on a line under its row.",
            TABLE_WIDTH,
            initial_indent=f"  {'±'.ljust(width + 6)}  "[: width + 10],
            subsequent_indent=" " * (width + 10),
        )
    return out


def _fits_text(fits: list[dict], prefix: str) -> list[str]:
    lines: list[str] = []
    for phase, heading in (
        ("relative", "Relative fits (each exposure group to the reference group)"),
        ("absolute", "Absolute fits (groups moved by one fit share a row)"),
    ):
        rows = [r for r in fits if r["phase"] == phase]
        if not rows:
            continue
        refcats = sorted({r["refcat"] for r in rows if r.get("refcat")})
        target = f", to {', '.join(refcats)}" if refcats else ""
        lines += [f"{heading}{target}:", "", *_text_table(GROUP_FIELDS, rows, prefix), ""]
    return lines or ["(no fit recorded)", ""]


def format_report(entries: list[dict], fmt: str = "table", *, legend: bool = True) -> str:
    """Format :func:`read_results` entries as ``roman-tweakreg report`` prints them.

    Parameters
    ----------
    entries : list of dict
        :func:`image_entry` dicts.
    fmt : {"table", "csv", "json"}
        ``table``: the fit rows (:data:`GROUP_FIELDS`; relative, then absolute), then
        the image rows (:data:`IMAGE_FIELDS`), as fixed-width text that fits
        :data:`TABLE_WIDTH` columns for WFI file names, with a legend of the columns
        (``legend``); a row's reason is on a line of its own under it.  ``csv``: one
        table, a ``kind`` column (``fit`` or ``image``) then every field of both (empty
        where a field does not apply); numbers unrounded.  ``json``: the report of
        :func:`summarize` (the layout the step writes), as ``--json FILE`` writes it.
    legend : bool
        For ``table``: end with the meaning of each column.

    Raises
    ------
    ValueError
        For another ``fmt``.
    """
    if fmt == "json":
        return json.dumps(_plain(summarize(entries)), indent=2, allow_nan=False)
    fits, images = group_rows(entries), image_rows(entries)
    if fmt == "table":
        prefix = group_prefix(str(e.get("group_id")) for e in entries)
        lines = _fits_text(fits, prefix)
        lines += ["Images:", "", *_text_table(IMAGE_FIELDS, images, prefix)]
        if legend:
            lines += ["", "Columns of the fits:", *_legend(GROUP_FIELDS), "",
                      "Columns of the images:", *_legend(IMAGE_FIELDS)]  # fmt: skip
            if prefix:
                lines.append(f"Groups are shown without the common beginning {prefix!r}.")
            lines.append("More columns (catalog, phase, reference catalog) in --format csv "
                         "or json.")  # fmt: skip
        return "\n".join(lines)
    if fmt == "csv":
        names = ["kind", *dict.fromkeys(f.name for f in GROUP_FIELDS + IMAGE_FIELDS)]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n", restval="")
        writer.writeheader()
        for kind, rows in (("fit", fits), ("image", images)):
            for row in rows:
                writer.writerow(
                    {"kind": kind, **{k: "" if v is None else v for k, v in row.items()}}
                )
        return buffer.getvalue().rstrip("\n")
    raise ValueError(f"format={fmt!r}: expected table, csv or json")


_TABLE_NUMBERS = (("rotation", "rotation_deg"), ("rmse", "rmse_mas"), ("mae", "mae_mas"))
#: Decimals of :func:`fit_results_table`: mas to 0.001 (1 microarcsecond, far below any
#: fit's noise); degrees to 1e-8 (0.04 mas across 0.4 deg, the WFI field's half width).
TABLE_DECIMALS = {"mas": 3, "deg": 8}


def fit_results_table(library_or_models: Any):
    """The tweakreg outcome of each image as an astropy Table, one row per image.

    Models are only read (a library's models are shelved with ``modify=False``), so it
    can be called on the step's result directly::

        result = TweakRegStep.call("asn.json")
        table = roman_tweakreg.fit_results_table(result)

    Parameters
    ----------
    library_or_models : ModelLibrary, ImageModel or list of ImageModel

    Returns
    -------
    astropy.table.Table
        Columns ``file``, ``group_id``, ``status`` (``meta.cal_step.tweakreg``),
        ``wcs_name``, ``catalog``, ``n_sources`` (0 when not recorded), then the fit
        that set the final WCS: ``fit_status``,
        ``refcat``, ``nmatches`` (the group's), ``image_nmatches`` (of those, the pairs of
        the image's own sources; 0 when not recorded), ``shift_x``, ``shift_y`` (mas),
        their 1-sigma uncertainties ``shift_x_sigma``, ``shift_y_sigma`` (mas),
        ``rotation`` (deg), its uncertainty ``rotation_sigma`` (arcsec),
        ``rmse``, ``mae`` (mas) and ``reason``; then the same fit columns of each phase
        prefixed ``relative_`` and ``absolute_``.  Missing numbers are NaN.  Numbers
        are rounded (:data:`TABLE_DECIMALS`): mas to 0.001, degrees to 1e-8; the full
        values are in each model's ``meta.wcs_fit_results``.
    """
    import astropy.units as u
    from astropy.table import Table

    entries = [image_entry(meta, name) for name, meta in iter_metas(library_or_models)]
    mas, deg = TABLE_DECIMALS["mas"], TABLE_DECIMALS["deg"]
    columns: dict[str, list] = {}
    for entry in entries:
        keys = ("file", "group_id", "status", "wcs_name", "catalog", "n_sources")
        row = {k: entry.get(k) for k in keys}
        row["n_sources"] = int(row["n_sources"] or 0)
        final = {**entry, "status": entry["fit_status"]}
        phases = (("", final), ("relative_", entry["relative"]), ("absolute_", entry["absolute"]))
        for prefix, fit in phases:
            row[prefix + ("fit_status" if not prefix else "status")] = fit.get("status")
            row[prefix + "refcat"] = fit.get("refcat") or ""
            row[prefix + "nmatches"] = int(fit.get("nmatches") or 0)
            row[prefix + "image_nmatches"] = int(fit.get("image_nmatches") or 0)
            for axis, name in enumerate(("shift_x", "shift_y")):
                value = _shift_mas(fit, axis)
                row[prefix + name] = np.nan if value is None else round(value, mas)
            sigma = fit.get("shift_sigma_mas") or [None, None]
            for axis, name in enumerate(("shift_x_sigma", "shift_y_sigma")):
                row[prefix + name] = np.nan if sigma[axis] is None else round(sigma[axis], mas)
            rot_sigma = fit.get("rotation_sigma_arcsec")
            # arcsec, to a microarcsecond as the mas columns
            row[prefix + "rotation_sigma"] = np.nan if rot_sigma is None else round(rot_sigma, 6)
            for name, key in _TABLE_NUMBERS:
                digits = deg if name == "rotation" else mas
                row[prefix + name] = np.nan if fit.get(key) is None else round(fit[key], digits)
            row[prefix + "reason"] = fit.get("reason") or ""
        for key, value in row.items():
            columns.setdefault(key, []).append("" if value is None else value)
    table = Table(columns) if entries else Table()
    for name in table.colnames:
        base = name.removeprefix("relative_").removeprefix("absolute_")
        if base in ("shift_x", "shift_y", "rmse", "mae", "shift_x_sigma", "shift_y_sigma"):
            table[name].unit = u.mas
        elif base == "rotation":
            table[name].unit = u.deg
        elif base == "rotation_sigma":
            table[name].unit = u.arcsec
    return table
