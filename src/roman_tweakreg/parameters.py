"""Every parameter of the step, defined once.

Each :class:`Parameter` holds a name, a type, a default, the accepted values
(bounds or choices), a unit and a one-line doc.  Everything else is read from
:data:`PARAMETERS`:

* the stpipe spec of :class:`~roman_tweakreg.TweakRegStep` (:func:`spec`);
* the checks of :func:`~roman_tweakreg.step.validate_parameters` and of
  :meth:`~roman_tweakreg.detection.DetectionParameters.validate` (:func:`check`,
  :func:`validate`), whose messages name the parameter, the value given and what
  is accepted;
* the defaults of :class:`~roman_tweakreg.matching.FitParameters` and
  :class:`~roman_tweakreg.detection.DetectionParameters` (:func:`default`);
* the parameter tables of the documentation (:func:`table_rst`, the
  ``parameters`` directive of ``docs/conf.py``).

The rules the alignment derives from the matching parameters (the retry after
source confusion, the second matching after a fit and when it is made) live in
:mod:`roman_tweakreg.matching`, which applies them (:data:`~roman_tweakreg.matching.DERIVED`);
the docs' tables state them with ``tolerance`` (``table_rst(..., derived=DERIVED)``).

To add a parameter: add a :class:`Parameter` below (an alignment parameter with
:func:`_fit_pair`, which makes its ``abs_`` twin), then use it; the spec, the
checks and the docs follow.  A matching parameter also becomes a field of
``FitParameters`` (add the field; its default is read from here).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidParameterError

__all__ = [
    "FIT_NAMES",
    "MATCH_PIXEL_SCALE",
    "MAX_SEARCHRAD",
    "OFFSET_SEARCH_MEMORY",
    "PARAMETERS",
    "SECTIONS",
    "Parameter",
    "check",
    "default",
    "get",
    "names",
    "offset_search_bytes",
    "service_timeout",
    "spec",
    "table_rst",
    "validate",
]


#: Documentation sections, in order: key -> title.
SECTIONS = {
    "catalogs": "Catalogs",
    "detection": "Detection (images without any catalog)",
    "outputs": "Input handling, outputs and reports",
    "relative": "Relative alignment (exposure groups to each other)",
    "absolute": "Absolute alignment (all images, one rigid set, to the reference catalog)",
}

_SPEC_TYPES = {bool: "boolean", int: "integer", float: "float", str: "string"}
_NOUNS = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}
_BOOLS = (bool, np.bool_)
_UNIT_WORDS = {"px": "pixels"}


@dataclass(frozen=True)
class Parameter:
    """One parameter: its name, type, default, accepted values and doc.

    Attributes
    ----------
    name : str
        The stpipe parameter name (``abs_`` for the absolute fit).
    kind : type
        ``bool``, ``int``, ``float`` or ``str``.
    default : object
        The default value (``None`` for "not set").
    doc : str
        One line: the spec comment, and the description in the docs tables.
    section : str
        A key of :data:`SECTIONS`.
    unit : str
        Unit of a number (``arcsec``, ``px``, ``s``), or ''.
    low, high : float or None
        Bounds of a number; ``low_open`` / ``high_open`` exclude the bound itself.
    choices : tuple of str
        The accepted values of a string (case-sensitive), or ().
    none_ok : bool or None
        Whether ``None`` is accepted; by default when the default is ``None``, and
        for strings (an unset path or name).
    odd : bool
        An integer that must be odd.
    noun : str
        What a value is, in messages, when not the type's own ("a number of seconds").
    spec_args : str
        Arguments put in the spec before ``default`` (``min=0``): checked by stpipe
        when the step is made, as romancal's spec does.
    in_step : bool
        False for a parameter of :class:`~roman_tweakreg.detection.DetectionParameters`
        that the step does not expose.
    why_high : str
        Why the upper bound is what it is, said when a value exceeds it.
    """

    name: str
    kind: type
    default: Any
    doc: str
    section: str
    unit: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    none_ok: bool | None = None
    odd: bool = False
    noun: str = ""
    spec_args: str = ""
    in_step: bool = True
    why_high: str = ""

    @property
    def accepts_none(self) -> bool:
        """Whether ``None`` is an accepted value."""
        if self.none_ok is not None:
            return self.none_ok
        return self.default is None or (self.kind is str and not self.choices)

    @property
    def label(self) -> str:
        """The name as messages give it (detection parameters say so)."""
        prefix = "detection parameter " if self.section == "detection" else ""
        return prefix + self.name

    @property
    def expected(self) -> str:
        """What is accepted, in words: ``an integer >= 1``, ``one of shift, rshift``."""
        if self.choices:
            text = "one of " + ", ".join(self.choices)
        else:
            text = self.noun or _NOUNS[self.kind]
            if self.odd:
                text = text.replace("an integer", "an odd integer")
            bounds = self._bounds()
            text = f"{text} {bounds}" if bounds else text
            if self.unit and not self.noun:  # a noun says its unit ("a number of seconds")
                text += f" ({_UNIT_WORDS.get(self.unit, self.unit)})"
        return f"{text}, or None" if self.accepts_none and self.default is None else text

    def _bounds(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if low is not None and high is not None:
            return (
                f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
            )
        if low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return ""

    def problem(self, value: Any) -> str:
        """Why ``value`` is not accepted, or '' when it is."""
        if value is None:
            return "" if self.accepts_none else self.expected
        if self.kind is bool:
            return "" if isinstance(value, _BOOLS) else self.expected
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                return self.expected
            return ""
        number = numbers.Integral if self.kind is int else numbers.Real
        if not isinstance(value, number) or isinstance(value, _BOOLS):
            return self.expected
        if not math.isfinite(value):
            return f"{self.expected} (finite)"
        if self.odd and value % 2 != 1:
            return self.expected
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return self.expected
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return f"{self.expected}: {self.why_high}" if self.why_high else self.expected
        return ""

    def spec_line(self) -> str:
        """The parameter's line of the stpipe spec."""
        args = f"{self.spec_args}, " if self.spec_args else ""
        value = "None" if self.default is None else repr(self.default)
        return f"{self.name} = {_SPEC_TYPES[self.kind]}({args}default={value}) # {self.help}"

    @property
    def help(self) -> str:
        """The one-line doc with the unit of a number (``... (arcsec)``): the spec comment,
        which ``strun --help`` shows."""
        unit = {**_UNIT_WORDS, "s": "seconds"}.get(self.unit, self.unit)
        return f"{self.doc} ({unit})" if unit and unit not in self.doc.lower() else self.doc


def _number(value: float | None) -> str | None:
    if value is None:
        return None
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _fit_pair(name: str, kind: type, relative: Any, absolute: Any, doc: str, **kw) -> list:
    """A matching parameter of both fits: ``name`` and ``abs_<name>``.

    ``doc`` is written for both: ``{fit}`` becomes "relative" or "absolute".
    """
    return [
        Parameter(name, kind, relative, doc.format(fit="relative"), "relative", **kw),
        Parameter(f"abs_{name}", kind, absolute, doc.format(fit="absolute"), "absolute", **kw),
    ]


_GEOMETRIES = ("shift", "rshift", "rscale", "general")

#: Pixel scale (arcsec) of the tangent plane in which sources are matched: tweakwcs's
#: offset search bins its 2D histogram in pixels of this size (WFI's).
MATCH_PIXEL_SCALE = 0.11
#: Memory (bytes) the offset search may take: its 2D histogram has
#: ``(2 ceil(searchrad / MATCH_PIXEL_SCALE) + 1)**2`` bins.
OFFSET_SEARCH_MEMORY = 256 * 2**20
#: Peak memory (bytes) of tweakwcs's offset search per histogram bin (measured with
#: tracemalloc over searchrad 30-120 arcsec: 26.1; the histogram, numpy's bin counts and
#: the peak search's copies).
_BYTES_PER_BIN = 26


def offset_search_bytes(searchrad: float) -> float:
    """Peak memory (bytes) of tweakwcs's 2D-histogram offset search over ``searchrad`` arcsec."""
    bins = 2 * math.ceil(searchrad / MATCH_PIXEL_SCALE) + 1
    return float(bins) ** 2 * _BYTES_PER_BIN


def _max_searchrad() -> float:
    """The largest whole number of arcsec whose offset search fits OFFSET_SEARCH_MEMORY."""
    half = (math.isqrt(OFFSET_SEARCH_MEMORY // _BYTES_PER_BIN) - 1) // 2
    radius = math.floor(half * MATCH_PIXEL_SCALE)
    while offset_search_bytes(radius) > OFFSET_SEARCH_MEMORY:  # rounding: step back
        radius -= 1
    return float(radius)


#: The largest search radius accepted (arcsec): 176 with the values above.
MAX_SEARCHRAD = _max_searchrad()
_WHY_SEARCHRAD = (
    f"the offset search's 2D histogram of (2 x searchrad / {MATCH_PIXEL_SCALE} arcsec + 1)^2 "
    f"bins would need more than {OFFSET_SEARCH_MEMORY // 2**20} MiB beyond {MAX_SEARCHRAD:g} "
    "arcsec (and the reference catalog cone grows with it); pointing errors of Roman are "
    "arcseconds"
)

#: The matching parameters, each as (relative, absolute): the fields of ``FitParameters``.
_FIT = (
    _fit_pair("minobj", int, 15, 15, "Minimum matches for the {fit} fit", low=1),
    _fit_pair("searchrad", float, 2.0, 6.0,
              "Search radius of the {fit} initial offset; also the largest plausible correction",
              unit="arcsec", low=0, low_open=True, high=MAX_SEARCHRAD, why_high=_WHY_SEARCHRAD),
    _fit_pair("use2dhist", bool, True, True, "Find the initial {fit} offset with a 2D histogram"),
    _fit_pair("separation", float, 1.0, 0.1,
              "Sources closer than this are not used in {fit} matching",
              unit="arcsec", low=0, low_open=True),
    _fit_pair("tolerance", float, 0.7, 0.7,
              "Matching tolerance of the {fit} fit after the initial offset; at most the "
              "search radius", unit="arcsec", low=0, low_open=True),
    _fit_pair("fitgeometry", str, "rshift", "rshift",
              "Geometry of the {fit} fit: shift, rshift, rscale or general", choices=_GEOMETRIES),
    _fit_pair("nclip", int, 3, 3, "Clipping iterations of the {fit} fit", low=0),
    _fit_pair("sigma", float, 3.0, 3.0, "Clipping limit (x rmse) of the {fit} fit",
              low=0, low_open=True),
)  # fmt: skip

#: Names of the matching parameters of one fit (the fields of ``FitParameters``);
#: the absolute fit's are these with ``abs_`` in front.
FIT_NAMES: tuple[str, ...] = tuple(relative.name for relative, _ in _FIT)

#: Every parameter, in the order of the spec and of the docs tables.
PARAMETERS: tuple[Parameter, ...] = (
    # -- catalogs
    Parameter("use_custom_catalogs", bool, False,
              "Use catalogs from catfile / association / meta.tweakreg_catalog", "catalogs"),
    Parameter("catalog_format", str, "ascii.ecsv",
              "astropy format of custom catalog files (and of catalogs the step writes)",
              "catalogs"),
    Parameter("catfile", str, "", "Text file: '<model file> <catalog file>' per line",
              "catalogs"),
    Parameter("catalog_path", str, "",
              "Folder for written catalogs (default: output_dir, else the current folder)",
              "catalogs"),
    # -- detection (the step's; the others are DetectionParameters' only)
    Parameter("kernel_fwhm", float, 2.0,
              "PSF FWHM: the matched filter and the start of the fitted FWHM",
              "detection", unit="px", low=0.8, high=10),
    Parameter("snr_threshold", float, 10.0, "Minimum matched-filter peak signal-to-noise",
              "detection", low=0, low_open=True),
    Parameter("bkg_boxsize", int, 128, "Background mesh box size, clipped to the image",
              "detection", unit="px", low=8),
    Parameter("brightest", int, None, "Keep only the N sources of highest flux",
              "detection", low=1),
    Parameter("peakmax", float, None,
              "Drop sources whose brightest background-subtracted pixel exceeds this",
              "detection"),
    Parameter("psf_model", str, None,
              "ePSF reference file (romancal's EpsfRefModel, CRDS type epsf) or folder of "
              "them, chosen per image by detector and optical element; None: override_epsf, "
              "else CRDS's epsf when CRDS_SERVER_URL or CRDS_PATH is set, else an empirical "
              "PRF", "detection"),
    Parameter("bkg_filter_size", int, 3, "Median-filter size of the background mesh (boxes)",
              "detection", low=1, odd=True, in_step=False),
    Parameter("min_separation", float, 2.0, "Minimum distance between two detections",
              "detection", unit="px", low=1, in_step=False),
    Parameter("max_peak_fraction", float, 0.7,
              "Largest share of the 3x3 flux in the brightest pixel (1 disables)",
              "detection", low=0, high=1, low_open=True, in_step=False),
    Parameter("aperture_radius", float, 2.0, "Flux aperture radius, in units of kernel_fwhm",
              "detection", low=0, low_open=True, in_step=False),
    # -- relative alignment
    Parameter("expand_refcat", bool, False,
              "Add sources of aligned groups to the relative reference", "relative"),
    Parameter("enforce_user_order", bool, False,
              "Align groups in input order (first is reference)", "relative"),
    *(pair[0] for pair in _FIT),
    # -- absolute alignment
    Parameter("abs_refcat", str, "GAIADR3",
              "Reference catalog: service name (GAIADR3...), GAIADR3_S3 (Gaia DR3 HATS on AWS "
              "S3, as romancal), local file, HATS folder or URL; a comma list is tried in "
              "order; '' means GAIADR3", "absolute"),
    Parameter("abs_refcat_url", str, "",
              "Catalog service base URL; '' means $ASTROMETRIC_CATALOG_URL or "
              "https://gsss.stsci.edu/webservices", "absolute"),
    Parameter("abs_refcat_timeout", float, 30.0,
              "Seconds a try of a catalog service or URL request may take in all (headers "
              "and body: a deadline, not per read)", "absolute",
              unit="s", low=0, low_open=True, noun="a number of seconds"),
    Parameter("vo_timeout", float, None,
              "romancal's name for abs_refcat_timeout; when set, it is used instead",
              "absolute", unit="s", low=0, low_open=True, noun="a number of seconds",
              spec_args="min=0"),
    Parameter("abs_refcat_retries", int, 3,
              "Retries of failed catalog service requests (exponential backoff)", "absolute",
              low=0),
    Parameter("abs_refcat_max_bytes", int, 500_000_000,
              "Largest answer taken from the catalog service or a catalog URL, before and "
              "after decompression; a larger one is refused (relative alignment kept)",
              "absolute", unit="bytes", low=1, spec_args="min=1"),
    Parameter("abs_refcat_cache", str, None,
              "Catalog cache folder; None: $ROMAN_TWEAKREG_CACHE or ~/.cache/roman_tweakreg; "
              "'off' disables", "absolute"),
    *(pair[1] for pair in _FIT),
    # -- input handling, outputs and reports (save_abs_catalog: of the absolute section)
    Parameter("on_disk", bool, False,
              "Keep association models in temporary files between uses (large associations)",
              "outputs"),
    Parameter("processes", int, 0,
              "Processes for per-image work (catalogs, corrected WCS, saving): 0 one per "
              "usable core (at most 4), 1 no worker process; more than the usable cores are "
              "capped at their number (logged)", "outputs", low=0, spec_args="min=0"),
    Parameter("report", str, "",
              "Write a JSON fit report to this file (relative to output_dir); '' for none",
              "outputs"),
    Parameter("save_abs_catalog", bool, False,
              "Write the reference catalog used as fit_<refcat>_ref.ecsv", "absolute"),
    Parameter("output_use_model", bool, True, "Name outputs after each model's meta.filename",
              "outputs"),
    Parameter("output_ext", str, ".asdf", "Output file type", "outputs"),
    Parameter("update_source_catalog_coordinates", bool, False,
              "Rewrite the RA/Dec columns of each aligned image's source catalog file with its "
              "corrected WCS", "outputs"),
    Parameter("update_version", bool, False,
              "Accepted for romancal parameter files; models are read as they are", "outputs"),
)  # fmt: skip

_BY_NAME = {p.name: p for p in PARAMETERS}


def get(name: str) -> Parameter:
    """The :class:`Parameter` called ``name``.

    Raises
    ------
    KeyError
        For a name that is not a parameter.
    """
    return _BY_NAME[name]


def default(name: str) -> Any:
    """The default value of parameter ``name``."""
    return _BY_NAME[name].default


def spec() -> str:
    """The stpipe spec of the step: one line per parameter the step exposes."""
    return "\n" + "".join(f"        {p.spec_line()}\n" for p in PARAMETERS if p.in_step) + "    "


def check(name: str, value: Any) -> None:
    """Check one parameter's value.

    Raises
    ------
    InvalidParameterError
        ``<name>=<value>: expected <what is accepted>``.
    """
    param = _BY_NAME[name]
    problem = param.problem(value)
    if problem:
        raise InvalidParameterError(f"{param.label}={value!r}: expected {problem}")


# Rules between two parameters: (the smaller, the larger, why).
_ORDER = tuple(
    (f"{prefix}tolerance", f"{prefix}searchrad", "the matching tolerance must not exceed the "
     "search radius")
    for prefix in ("", "abs_")
)  # fmt: skip


def validate(pars: Mapping[str, Any]) -> None:
    """Check every parameter of ``pars`` that is one of :data:`PARAMETERS`, then the
    rules between parameters (``tolerance`` at most ``searchrad``).

    Parameters missing from ``pars`` are not checked; other keys (stpipe's own
    parameters) are ignored.

    Raises
    ------
    InvalidParameterError
        Naming the first parameter not accepted, its value and what is accepted.
    """
    for param in PARAMETERS:
        if param.name in pars:
            check(param.name, pars[param.name])
    for small, large, why in _ORDER:
        if small in pars and large in pars and pars[small] > pars[large]:
            raise InvalidParameterError(
                f"{small}={pars[small]} is larger than {large}={pars[large]}: {why}"
            )


def names(section: str, *, in_step: bool = True) -> tuple[str, ...]:
    """Names of one section's parameters (the step's only, unless ``in_step`` is False)."""
    return tuple(p.name for p in PARAMETERS if p.section == section and (p.in_step or not in_step))


def service_timeout(pars: Mapping[str, Any]) -> float:
    """Seconds to wait for the catalog service per try: ``vo_timeout`` (romancal's name)
    when set, else ``abs_refcat_timeout``; the step and the batch both ask here."""
    vo_timeout = pars.get("vo_timeout")
    return float(pars["abs_refcat_timeout"] if vo_timeout is None else vo_timeout)


# -- documentation ------------------------------------------------------------------------------
def _literal(value: Any) -> str:
    return "None" if value is None else f"``{value!r}``"


def table_rst(section: str, *, in_step: bool = True, derived: Sequence = ()) -> str:
    """The reST table of one section's parameters (used by the docs' ``parameters`` directive).

    Parameters
    ----------
    section : str
        A key of :data:`SECTIONS`.
    in_step : bool
        True: the step's parameters; False: every parameter of the section (for
        ``detection``, the step's and :class:`DetectionParameters`' own).
    derived : sequence
        Rules derived from the matching parameters, each with a one-line ``doc``
        (:data:`roman_tweakreg.matching.DERIVED`), stated after ``tolerance``'s doc.

    Raises
    ------
    ValueError
        For another ``section``.
    """
    if section not in SECTIONS:
        raise ValueError(f"section={section!r}: expected one of {', '.join(SECTIONS)}")
    lines = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 25 12 25 38",
        "",
        "   * - Parameter",
        "     - Default",
        "     - Accepted",
        "     - Meaning",
    ]
    for p in PARAMETERS:
        if p.section != section or (in_step and not p.in_step):
            continue
        doc = p.doc.replace("*", r"\*")
        notes = [d.doc for d in derived if p.name.removeprefix("abs_") == "tolerance"]
        text = doc + "." + "".join(f" {d[0].upper()}{d[1:]}." for d in notes)
        lines += [
            f"   * - ``{p.name}``",
            f"     - {_literal(p.default)}",
            f"     - {p.expected}",
            f"     - {text}",
        ]
    return "\n".join(lines)
