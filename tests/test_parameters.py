"""Each parameter is defined once (roman_tweakreg.parameters); spec, checks, docs read it."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import asdf
import numpy as np
import pytest

from roman_tweakreg import InvalidParameterError, TweakRegStep, matching, parameters
from roman_tweakreg.detection import DetectionParameters
from roman_tweakreg.matching import FitParameters, _match_again, _rematcher
from roman_tweakreg.step import _detection_parameters, _fit_parameters, validate_parameters

DOCS = Path(__file__).resolve().parent.parent / "docs"
STRUN = str(Path(sys.executable).parent / "strun")

# The step's spec as it was written by hand before it was generated (0.1.x): every entry as
# stpipe parses it (type, stpipe-checked bounds, default). A change here is a change of the
# step's interface (romancal parameter files, users' scripts), never an accident.
PREVIOUS_SPEC = {
    "use_custom_catalogs": "boolean(default=False)",
    "catalog_format": "string(default='ascii.ecsv')",
    "catfile": "string(default='')",
    "catalog_path": "string(default='')",
    "kernel_fwhm": "float(default=2.0)",
    "snr_threshold": "float(default=10.0)",
    "bkg_boxsize": "integer(default=128)",
    "brightest": "integer(default=None)",
    "peakmax": "float(default=None)",
    "psf_model": "string(default=None)",
    "expand_refcat": "boolean(default=False)",
    "enforce_user_order": "boolean(default=False)",
    "minobj": "integer(default=15)",
    "searchrad": "float(default=2.0)",
    "use2dhist": "boolean(default=True)",
    "separation": "float(default=1.0)",
    "tolerance": "float(default=0.7)",
    "fitgeometry": "string(default='rshift')",
    "nclip": "integer(default=3)",
    "sigma": "float(default=3.0)",
    "abs_refcat": "string(default='GAIADR3')",
    "abs_refcat_url": "string(default='')",
    "abs_refcat_timeout": "float(default=30.0)",
    "vo_timeout": "float(min=0, default=None)",
    "abs_refcat_retries": "integer(default=3)",
    "abs_refcat_cache": "string(default=None)",
    "abs_refcat_max_bytes": "integer(min=1, default=500000000)",
    "abs_minobj": "integer(default=15)",
    "abs_searchrad": "float(default=6.0)",
    "abs_use2dhist": "boolean(default=True)",
    "abs_separation": "float(default=0.1)",
    "abs_tolerance": "float(default=0.7)",
    "abs_fitgeometry": "string(default='rshift')",
    "abs_nclip": "integer(default=3)",
    "abs_sigma": "float(default=3.0)",
    "on_disk": "boolean(default=False)",
    "processes": "integer(min=0, default=0)",
    "report": "string(default='')",
    "save_abs_catalog": "boolean(default=False)",
    "output_use_model": "boolean(default=True)",
    "output_ext": "string(default='.asdf')",
    "update_source_catalog_coordinates": "boolean(default=False)",
    "update_version": "boolean(default=False)",
}
STEP = [p for p in parameters.PARAMETERS if p.in_step]
ALL = {p.name: p for p in parameters.PARAMETERS}


def test_generated_spec_parses_to_the_previous_parameters_and_defaults():
    spec = TweakRegStep.load_spec_file()
    ours = {k: v for k, v in spec.items() if k in PREVIOUS_SPEC or k in ALL}
    assert ours == PREVIOUS_SPEC
    pars = TweakRegStep().get_pars()
    assert {p.name: pars[p.name] for p in STEP} == {p.name: p.default for p in STEP}
    assert (pars["abs_searchrad"], pars["abs_separation"], pars["vo_timeout"]) == (6.0, 0.1, None)


def test_romancal_parameter_file_loads_and_is_valid():
    path = files("roman_tweakreg") / "data" / "romancal-1.1.0-tweakreg.asdf"
    with asdf.open(str(path)) as af:
        given = dict(af["parameters"])
    assert set(given) <= {p.name for p in STEP}
    step = TweakRegStep.from_config_file(str(path))
    pars = step.get_pars()
    validate_parameters(pars)
    assert {k: pars[k] for k in given} == given
    assert (pars["abs_refcat"], pars["vo_timeout"], pars["fitgeometry"]) == (
        "GAIADR3_S3",
        1200.0,
        "general",
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("minobj", True, "minobj=True: expected an integer >= 1"),
        ("abs_searchrad", math.inf,
         "abs_searchrad=inf: expected a number in (0, 176] (arcsec) (finite)"),
        ("use2dhist", "yes", "use2dhist='yes': expected True or False"),
        ("abs_refcat_retries", -1, "abs_refcat_retries=-1: expected an integer >= 0"),
        ("abs_refcat_timeout", None, "abs_refcat_timeout=None: expected a number of seconds > 0"),
        ("vo_timeout", -5.0, "vo_timeout=-5.0: expected a number of seconds > 0, or None"),
        ("kernel_fwhm", 0.5,
         "detection parameter kernel_fwhm=0.5: expected a number in [0.8, 10] (pixels)"),
        ("brightest", 0, "detection parameter brightest=0: expected an integer >= 1, or None"),
        ("catalog_format", 3, "catalog_format=3: expected a string"),
        ("abs_fitgeometry", None,
         "abs_fitgeometry=None: expected one of shift, rshift, rscale, general"),
        ("abs_refcat_max_bytes", 0, "abs_refcat_max_bytes=0: expected an integer >= 1 (bytes)"),
    ],
)  # fmt: skip
def test_validate_parameters_names_parameter_value_and_expected(name, value, message):
    pars = TweakRegStep().get_pars()
    pars[name] = value
    with pytest.raises(InvalidParameterError, match=f"^{re.escape(message)}$"):
        validate_parameters(pars)


def test_the_tolerance_rule_and_what_is_not_checked():
    pars = TweakRegStep().get_pars()
    pars.update(abs_tolerance=6.5)
    with pytest.raises(
        InvalidParameterError,
        match=r"^abs_tolerance=6.5 is larger than abs_searchrad=6.0: the matching tolerance",
    ):
        validate_parameters(pars)
    # stpipe's own parameters are stpipe's; a mapping of some parameters checks those only
    validate_parameters({"suffix": 3, "pre_hooks": None, "minobj": 4})
    validate_parameters({"tolerance": 5.0})  # no searchrad given: no rule between the two


@pytest.mark.parametrize("param", [p for p in parameters.PARAMETERS if p.kind in (int, float)])
def test_bounds_are_inclusive_or_open_as_defined(param):
    if param.default is not None:
        parameters.check(param.name, param.default)
    for bound, is_open, outside in (
        (param.low, param.low_open, -1.0),
        (param.high, param.high_open, +1.0),
    ):
        if bound is None:
            continue
        value = param.kind(bound)
        if param.odd and value % 2 != 1:
            value += 1
        if is_open:
            with pytest.raises(InvalidParameterError, match=rf"{param.name}="):
                parameters.check(param.name, value)
        else:
            parameters.check(param.name, value)
        with pytest.raises(InvalidParameterError, match=re.escape(param.expected)):
            parameters.check(param.name, param.kind(bound + outside))


def test_fit_and_detection_parameters_take_their_defaults_from_the_definitions():
    fit = [f.name for f in dataclasses.fields(FitParameters)]
    assert tuple(fit) == parameters.FIT_NAMES
    assert dataclasses.asdict(FitParameters()) == {n: parameters.default(n) for n in fit}
    detection = [f.name for f in dataclasses.fields(DetectionParameters)]
    assert set(detection) == set(parameters.names("detection", in_step=False))
    assert dataclasses.asdict(DetectionParameters()) == {
        n: parameters.default(n) for n in detection
    }
    pars = TweakRegStep(abs_nclip=7, kernel_fwhm=1.5).get_pars()
    absolute = _fit_parameters(pars, "abs_")
    assert (absolute.searchrad, absolute.separation, absolute.nclip) == (6.0, 0.1, 7)
    assert _fit_parameters(pars, "") == FitParameters()
    assert _detection_parameters(pars) == DetectionParameters(kernel_fwhm=1.5)


def test_derived_matching_rules():
    pars = FitParameters(separation=0.1, tolerance=0.7, searchrad=6.0)
    retry = matching.confusion_retry(pars)
    assert (retry.separation, retry.tolerance, retry.searchrad) == (1.4, 0.7, 6.0)
    assert matching.confusion_retry(FitParameters(separation=1.4, tolerance=0.7)) is None
    again = matching.rematch(pars)
    settings = {k: getattr(again, k) for k in ("searchrad", "separation", "tolerance")}
    assert settings == {"searchrad": 0.7, "separation": 0.1, "tolerance": 0.7}
    assert again.use2dhist is False
    # tweakwcs's matcher built from them behaves so (its settings are not public): no
    # offset search, so a catalog moved by 1.5" (beyond the 0.7" radius) matches nothing,
    # while the first matcher (2D histogram over 6") finds every source moved by 3"
    from astropy.table import Table

    matcher = _rematcher(pars.matcher(), pars)
    xy = np.random.default_rng(1).uniform(-100, 100, (50, 2))
    ref = Table({"TPx": xy[:, 0], "TPy": xy[:, 1]})
    matched = {d: len(matcher(ref, Table({"TPx": xy[:, 0] + d, "TPy": xy[:, 1]}),
                              tp_units="arcsec")[0]) for d in (0.5, 1.5)}  # fmt: skip
    assert matched == {0.5: 50, 1.5: 0}
    moved = Table({"TPx": xy[:, 0] + 3.0, "TPy": xy[:, 1]})
    assert len(pars.matcher()(ref, moved, tp_units="arcsec")[0]) == 50
    assert matching.rematch_motion(0.7) == pytest.approx(0.175)
    # a roll of 0.001 rad about the matched sources' centre moves a source 200" away by 0.2"
    roll = 1e-3
    fit = {"matrix": [[np.cos(roll), -np.sin(roll)], [np.sin(roll), np.cos(roll)]],
           "shift": [0.3, -0.2]}  # fmt: skip
    matched = np.array([[-1.0, 0.0], [1.0, 0.0]])
    all_xy = np.vstack([matched, [[200.0, 0.0]]])
    assert _match_again(fit, matched, all_xy, FitParameters(tolerance=0.7))  # 0.2 > 0.175
    assert not _match_again(fit, matched, all_xy, FitParameters(tolerance=0.9))  # 0.2 < 0.225


def test_docs_tables_cover_every_parameter_once_and_notes_name_real_ones():
    text = (DOCS / "parameters.rst").read_text()
    sections = re.findall(r"^\.\. parameters:: (\w+)$", text, flags=re.M)
    assert sections == list(parameters.SECTIONS)
    tabled = [p.name for s in sections for p in STEP if p.section == s]
    assert sorted(tabled) == sorted(PREVIOUS_SPEC)
    # the notes under the tables: each term names parameters of its own section
    for block in re.split(r"^\.\. parameters:: ", text, flags=re.M)[1:]:
        section = block.split("\n", 1)[0]
        for term in re.findall(r"^``\w+``(?:, ``\w+``)*$", block, flags=re.M):
            for name in re.findall(r"``(\w+)``", term):
                assert parameters.get(name).section == section, (name, section)
    # a default written in prose ("``minobj`` (15)") must be the real one
    for page in [*DOCS.glob("*.rst"), DOCS.parent / "README.md"]:
        literal = r"``(\w+)`` \(('[^']*'|[-+\w.]+)\)"
        for name, value in re.findall(literal, page.read_text()):
            if name in ALL and ALL[name].in_step:
                assert value == repr(parameters.default(name)), (page.name, name, value)
    table = parameters.table_rst("relative", derived=matching.DERIVED)
    assert "   * - ``tolerance``\n     - ``0.7``\n     - a number > 0 (arcsec)" in table
    assert "separation = 2 x tolerance" in table
    assert "0.25 x tolerance" in table
    with pytest.raises(ValueError, match="section='nope': expected one of catalogs"):
        parameters.table_rst("nope")


def test_strun_help_shows_each_parameter_with_its_doc_and_default():
    run = subprocess.run(
        [STRUN, "roman_tweakreg", "--help"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    text = " ".join(run.stdout.split())
    for p in STEP:
        assert f"--{p.name} " in text
        assert " ".join(p.doc.split()) in text, p.name
        if p.default not in (None, ""):  # stpipe shows no empty default
            assert f"default={p.default!r}]" in text, p.name


@pytest.mark.parametrize(("name", "value"), [("searchrad", 1e6), ("abs_searchrad", 1e308),
                                             ("searchrad", 176.5)])  # fmt: skip
def test_search_radii_are_bounded_by_the_memory_of_the_offset_search(name, value):
    # issue 28: searchrad=1e6 made numpy ask for 2.35 PiB, abs_searchrad=1e308 overflowed
    pars = TweakRegStep().get_pars()
    pars[name] = value
    with pytest.raises(
        InvalidParameterError,
        match=rf"^{name}={re.escape(repr(value))}: expected a number in \(0, 176\] \(arcsec\): "
        r"the offset search's 2D histogram .* more than 256 MiB beyond 176 arcsec",
    ):
        validate_parameters(pars)
    assert parameters.MAX_SEARCHRAD == 176.0
    assert parameters.offset_search_bytes(176.0) <= parameters.OFFSET_SEARCH_MEMORY
    assert parameters.offset_search_bytes(177.0) > parameters.OFFSET_SEARCH_MEMORY
    pars[name] = 176.0
    validate_parameters(pars)  # the largest accepted


def test_processes_beyond_the_usable_cores_are_capped_and_logged(caplog):
    from roman_tweakreg._parallel import Workers, usable_cores

    with Workers(1000) as workers:
        assert workers.n_workers <= usable_cores() - 1
    step = TweakRegStep(processes=1000)
    with caplog.at_level("INFO", logger="roman_tweakreg"):
        assert len(step.run([])) == 0
    assert f"processes=1000 capped at the {usable_cores()} usable cores" in caplog.text
    assert step.processes == 1000  # the parameter itself is never rewritten
