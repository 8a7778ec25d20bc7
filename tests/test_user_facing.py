"""What the step tells its user: log lines, report, output names, several inputs, messages."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import roman_datamodels.datamodels as rdm

from conftest import make_data, models_of, refcat_at
from roman_tweakreg import (
    InvalidParameterError,
    MissingCatalogError,
    TweakRegStep,
    fit_results_table,
    report,
)
from roman_tweakreg.library import load_association, write_association
from roman_tweakreg.results import plain
from roman_tweakreg.testing import simulate

DOCS = Path(__file__).resolve().parent.parent / "docs"
STRUN = str(Path(sys.executable).parent / "strun")


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """Two exposures x 3 detectors aligned in memory, with the step's log records."""
    exposures, stars = make_data()
    path = tmp_path_factory.mktemp("ref") / "gaia_2028.ecsv"
    refcat_at(stars, 2028.0).write(path, format="ascii.ecsv")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    keep = Keep(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("roman_tweakreg", "tweakwcs")]
    tweakwcs_loggers = [
        lg for n, lg in logging.Logger.manager.loggerDict.items()
        if n.startswith("tweakwcs") and isinstance(lg, logging.Logger)
    ]  # fmt: skip
    before = {lg.name: (list(lg.filters), lg.level) for lg in tweakwcs_loggers}
    for lg in loggers:
        lg.addHandler(keep)
    try:
        result = TweakRegStep.call(models_of(exposures), abs_refcat=str(path))
    finally:
        for lg in loggers:
            lg.removeHandler(keep)
    after = {lg.name: (list(lg.filters), lg.level) for lg in tweakwcs_loggers}
    return result, records, path, (before, after)


def test_one_info_line_per_fit_and_for_the_reference_catalog(aligned):
    result, records, path, _ = aligned
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    fits = [m for m in info if re.match(r"(Relative|Absolute) fit", m)]
    table = fit_results_table(result)
    rel = table[table["relative_status"] == "SUCCESS"][0]
    number = r"(-?\d+\.\d+)"
    pattern = (
        rf"Relative fit \(rshift\), group {rel['group_id']} \(3 images\): "
        rf"{rel['relative_nmatches']} matches, shift \({number} ± {number}, {number} ± "
        rf"{number}\) mas, rotation {number} ± {number} deg, rms {number} mas, "
        rf"mae {number} mas: SUCCESS$"
    )
    (found,) = [m for m in (re.match(pattern, f) for f in fits) if m]
    expected = [rel[f"relative_{k}"] for k in ("shift_x", "shift_x_sigma", "shift_y",
                "shift_y_sigma", "rotation", "rotation_sigma", "rmse", "mae")]  # fmt: skip
    expected[5] /= 3600.0  # the log gives the rotation's uncertainty in degrees, the table arcsec
    for text, value in zip(found.groups(), expected, strict=True):  # the table is rounded
        decimals = len(text.split(".")[1])
        assert float(text) == pytest.approx(value, abs=0.6 * 10.0**-decimals), (text, value)
    assert sum("reference of the others" in m for m in fits) == 1, fits
    # one line for the one absolute fit that moved both groups (a rigid set), with its
    # pairs: each group's own (in wcs_fit_results) add up to them
    (line,) = [m for m in fits if m.startswith("Absolute fit (rshift) to gaia_2028.ecsv, ")]
    groups = list(dict.fromkeys(table["group_id"]))
    assert f"groups {groups[0]}, {groups[1]} (6 images)" in line, line
    own = [table[table["group_id"] == g][0] for g in groups]
    assert f": {sum(r['absolute_nmatches'] for r in own)} matches, " in line, line
    rms = float(re.search(r"rms (\d+\.\d+) mas", line).group(1))
    assert min(r["absolute_rmse"] for r in own) - 0.01 <= rms
    assert rms <= max(r["absolute_rmse"] for r in own) + 0.01
    assert len(fits) == 3
    # the run ends with its result: images by status, the absolute rms and catalogue
    last = [r.getMessage() for r in records if r.name.startswith("roman_tweakreg")
            and r.levelno == logging.INFO][-1]  # fmt: skip
    assert re.fullmatch(r"6/6 COMPLETE, absolute rms (\d+\.\d\d) mas to gaia_2028\.ecsv", last)
    assert abs(float(last.split()[4]) - rms) <= 0.01, (last, line)
    (refcat_line,) = [m for m in info if m.startswith("Reference catalog ")]
    assert re.match(
        rf"Reference catalog gaia_2028.ecsv \({re.escape(str(path))}, epoch unknown\): "
        r"\d+ stars in the cone of 0.\d+ deg around \(.+\), obtained in \d+.\d\d s$",
        refcat_line,
    ), refcat_line
    n_stars = int(refcat_line.split(": ")[1].split()[0])
    assert n_stars >= max(table["absolute_nmatches"])


def test_tweakwcs_lines_are_tweakwcs_s_own_and_logging_state_untouched(aligned):
    """The step changes no logger of another library: tweakwcs's records keep the
    level tweakwcs gives them, and its loggers' filters and levels are as before."""
    _, records, _, (before, after) = aligned
    tweakwcs = [r for r in records if r.name.startswith("tweakwcs")]
    matching = [r for r in tweakwcs if "Matching sources" in r.getMessage()]
    assert matching
    assert {r.levelname for r in matching} == {"INFO"}  # as tweakwcs logs them
    assert before == after  # no filter added, levels unchanged
    assert all(not filters for filters, _ in after.values())


def test_fit_results_table_agrees_with_wcs_fit_results(aligned):
    result, *_ = aligned
    table = fit_results_table(result)
    assert len(table) == 6
    assert table["shift_x"].unit == "mas"
    assert table["rotation"].unit == "deg"
    with result:
        for i in range(len(result)):
            model = result.borrow(i)
            fit = model.meta.wcs_fit_results
            row = table[i]
            assert row["status"] == model.meta.cal_step.tweakreg == "COMPLETE"
            assert row["nmatches"] == fit["nmatches"] == fit["absolute"]["nmatches"]
            assert row["rmse"] == round(1000 * fit["rmse"], 3)  # rounded to 0.001 mas
            assert row["shift_x"] == round(1000 * fit["shift"][0], 3)
            assert row["rotation"] == round(fit["<rot>"], 8)  # to 1e-8 deg
            assert row["relative_nmatches"] == fit["relative"].get("nmatches", 0)
            assert row["n_sources"] == fit["n_sources"] == len(model.meta["tweakreg_catalog"])
            result.shelve(model, i, modify=False)


def test_report_rows_per_group_and_phase_agree_with_wcs_fit_results(aligned, tmp_path):
    result, *_ = aligned
    entries = report.build_report(result, parameters={})["images"]
    rows = report.group_rows(entries)
    assert sorted((r["phase"], r["status"]) for r in rows) == [
        ("absolute", "SUCCESS"),  # one absolute fit moved both groups: one row
        ("relative", "REFERENCE"),
        ("relative", "SUCCESS"),
    ]
    table = fit_results_table(result)
    (absolute,) = [r for r in rows if r["phase"] == "absolute"]
    groups = absolute["group"].split("+")
    assert sorted(groups) == sorted(set(table["group_id"]))
    assert absolute["n_images"] == len(table) == 6
    mine = [table[table["group_id"] == g] for g in groups]  # one correction, pooled figures
    assert absolute["nmatches"] == sum(m["absolute_nmatches"][0] for m in mine) > 200
    pooled = np.sqrt(sum(m["absolute_nmatches"][0] * m["absolute_rmse"][0] ** 2 for m in mine)
                     / absolute["nmatches"])  # fmt: skip
    assert absolute["rmse_mas"] == pytest.approx(pooled, abs=0.001)
    for m in mine:
        assert absolute["shift_x_mas"] == pytest.approx(m["absolute_shift_x"][0], abs=0.001)
    assert absolute["significance"] is None or absolute["significance"] >= 5
    reference = next(r for r in rows if r["status"] == "REFERENCE")
    assert reference["nmatches"] is None  # not fitted: '-' in the table
    moved = next(r for r in rows if r["phase"] == "relative" and r["status"] == "SUCCESS")
    mine = table[table["group_id"] == moved["group"]]
    assert moved["nmatches"] == mine["relative_nmatches"][0] > 100
    assert moved["shift_y_mas"] == pytest.approx(mine["relative_shift_y"][0], abs=0.0005)
    # the three views: table, CSV and JSON carry the same numbers
    text = report.format_report(entries, "table")
    assert f"{absolute['nmatches']}" in text
    assert f"{absolute['shift_x_mas']:+.2f}" in text
    assert text.count("_cal.asdf") == 6
    parsed = list(csv.DictReader(io.StringIO(report.format_report(entries, "csv"))))
    assert [r["kind"] for r in parsed] == ["fit"] * 3 + ["image"] * 6
    row = next(r for r in parsed if r["group"] == absolute["group"] and r["phase"] == "absolute")
    assert int(row["nmatches"]) == absolute["nmatches"]
    assert float(row["rmse_mas"]) == pytest.approx(absolute["rmse_mas"])
    as_json = json.loads(report.format_report(entries, "json"))
    assert as_json["fits"] == rows
    assert set(as_json) == {k.name for k in report.REPORT_KEYS["report"]}  # the one layout
    assert [set(f) for f in as_json["fits"]] == [{f.name for f in report.GROUP_FIELDS}] * 3
    with pytest.raises(ValueError, match="format='xml': expected table, csv or json"):
        report.format_report(entries, "xml")


def test_docs_report_tables_are_made_from_the_declarations():
    text = (DOCS / "report.rst").read_text()
    assert ".. report-fields:: fits" in text
    assert ".. report-fields:: images" in text
    for kind, fields in (("fits", report.GROUP_FIELDS), ("images", report.IMAGE_FIELDS)):
        rst = report.fields_rst(kind)
        for field in fields:
            assert f"* - ``{field.title}``\n     - {field.doc}" in rst, field.name
    with pytest.raises(ValueError, match="kind='x': expected fits or images"):
        report.fields_rst("x")


def test_output_file_names_outputs_as_stpipe_does(tmp_path):
    exposures, stars = make_data(detectors=("WFI01", "WFI02"))
    ref = tmp_path / "ref.ecsv"
    refcat_at(stars, 2028.0).write(ref, format="ascii.ecsv")
    TweakRegStep.call(
        models_of(exposures), abs_refcat=str(ref), output_file="aligned.asdf",
        output_dir=str(tmp_path / "many"),
    )  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "many").iterdir())
    assert names == sorted(
        [f"aligned_{i}_tweakregstep.asdf" for i in range(4)]
        + [f"aligned_{i}_wcs.asdf" for i in range(4)]  # romancal's WCS products
    )
    with rdm.open(tmp_path / "many" / "aligned_3_tweakregstep.asdf") as model:
        assert model.meta.cal_step.tweakreg == "COMPLETE"
        assert model.meta.wcs_fit_results["group_id"] == "0000101001001001001_0002"
    one = make_data(1, detectors=("WFI01",))[0][0].models[0]
    TweakRegStep.call(
        one, abs_refcat=str(ref), output_file="single.asdf", output_dir=str(tmp_path / "one")
    )
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "single_tweakregstep.asdf",
        "single_wcs.asdf",
    ]


def test_several_inputs_aligned_together_or_refused_with_the_association_hint(tmp_path):
    exposures, stars = make_data(detectors=("WFI01", "WFI02"))
    asn = simulate.write_dataset(exposures, stars, tmp_path / "in")
    refcat_at(stars, 2028.0).write(tmp_path / "ref.ecsv", format="ascii.ecsv")
    files = sorted(str(p) for p in (tmp_path / "in").glob("*_cal.asdf"))
    result = TweakRegStep(abs_refcat=str(tmp_path / "ref.ecsv")).run(files[0], files[2], files[3])
    table = fit_results_table(result)
    assert list(table["status"]) == ["COMPLETE"] * 3
    assert len(set(table["group_id"])) == 2
    with pytest.raises(
        InvalidParameterError,
        match=r"among them the association .*asn.json.*roman-tweakreg asn FILE\.\.\. -o asn.json",
    ):
        TweakRegStep().run(files[0], str(asn))


def test_in_memory_model_relative_catalog_hint(tmp_path):
    exposures, stars = make_data(1, detectors=("WFI01",))
    simulate.write_dataset(exposures, stars, tmp_path / "elsewhere")
    model = rdm.open(next((tmp_path / "elsewhere").glob("*_cal.asdf")))
    with pytest.raises(
        MissingCatalogError,
        match=r"does not exist; tried .*_cat.ecsv\. .*in-memory model, whose folder is not known.*"
        r"model.meta.source_catalog.tweakreg_catalog_name = str\(folder / name\)",
    ):
        TweakRegStep.call(model)


def test_asn_command_writes_an_association_the_step_reads(tmp_path):
    from roman_tweakreg.cli import main

    exposures, stars = make_data(1, detectors=("WFI01", "WFI02"))
    simulate.write_dataset(exposures, stars, tmp_path / "data")
    files = sorted((tmp_path / "data").glob("*_cal.asdf"))
    out = tmp_path / "asns" / "mine.json"
    assert main(["asn", *map(str, files), "-o", str(out)]) == 0
    asn = load_association(out)
    assert asn["products"][0]["name"] == "mine"
    assert [m["expname"] for m in asn["products"][0]["members"]] == [
        f"../data/{f.name}" for f in files
    ]
    assert main(["asn", str(files[0]), "-o", str(out)]) == 1  # exists: refused
    assert write_association(files[:1], out, overwrite=True) == out
    assert len(load_association(out)["products"][0]["members"]) == 1
    with pytest.raises(FileNotFoundError, match=r"nothing\.asdf: input file does not exist"):
        write_association([tmp_path / "nothing.asdf"], tmp_path / "x.json")


def _documented(section: str) -> list[str]:
    """The message templates (first ``literal`` of each entry) of a troubleshooting section."""
    text = (DOCS / "troubleshooting.rst").read_text()
    body = text.split("\n" + section, 1)[1].split("\n", 2)[2]  # after the title's underline
    body = body.split("\n~~~", 1)[0]  # up to the next title
    entries = [line for line in body.splitlines() if line.startswith("``")]
    return [t for line in entries for t in re.findall(r"``(.+?)``", line)]


def _as_regex(template: str) -> str:
    parts = re.split(r"(\.\.\.|<[^>]+>)", template)
    body = "".join(".+" if p == "..." or p.startswith("<") else re.escape(p) for p in parts)
    return ".*" + body + ".*"  # a template may show the start or the end of a message


@pytest.mark.parametrize(
    "pars",
    [
        {"minobj": 0},
        {"abs_searchrad": -1.0},
        {"nclip": -1},
        {"fitgeometry": "rotation"},
        {"abs_fitgeometry": "affine"},
        {"tolerance": 3.0},
        {"kernel_fwhm": -1.0},
    ],
)
def test_parameter_messages_are_those_the_docs_promise(pars):
    templates = _documented("Parameters (")
    assert len(templates) >= 4, templates
    one = make_data(1, detectors=("WFI01",))[0][0].models[0]
    with pytest.raises(ValueError, match=r"\w+=") as info:
        TweakRegStep.call(one, **pars)
    message = str(info.value)
    assert any(re.fullmatch(_as_regex(t), message) for t in templates), (message, templates)


def test_strun_bad_fitgeometry_lists_the_values(tmp_path):
    exposures, stars = make_data(1, detectors=("WFI01",))
    asn = simulate.write_dataset(exposures, stars, tmp_path)
    run = subprocess.run(
        [STRUN, "roman_tweakreg.TweakRegStep", str(asn), "--fitgeometry=rotation"],
        capture_output=True, text=True, check=False, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode != 0
    assert "fitgeometry='rotation': expected one of shift, rshift, rscale, general" in (
        run.stderr + run.stdout
    )


def test_command_line_conventions(tmp_path, capsys):
    from roman_tweakreg import __version__
    from roman_tweakreg.cli import main

    exe = [sys.executable, "-m", "roman_tweakreg"]
    version = subprocess.run([*exe, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"roman-tweakreg {__version__}"
    with pytest.raises(SystemExit, match="0"):
        main(["--help"])
    helptext = capsys.readouterr().out
    assert "``" not in helptext
    assert ":func:" not in helptext
    for command in ("example", "report", "plot", "asn", "-q, --quiet", "--version"):
        assert command in helptext
    for value in ("19", "0", "two"):
        with pytest.raises(SystemExit, match="2"):
            main(["example", "--detectors", value, "--out", str(tmp_path / "x")])
        assert (
            f"--detectors: '{value}': expected a whole number from 1 to 18"
            in capsys.readouterr().err
        )
    assert not (tmp_path / "x").exists()


def test_example_refuses_a_foreign_folder_and_replaces_its_own(tmp_path, capsys):
    from roman_tweakreg.example import MARKER, run_example

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    with pytest.raises(InvalidParameterError, match="foreign: folder is not empty and was not"):
        run_example(foreign, n_detectors=1)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    with pytest.raises(InvalidParameterError, match=r"n_detectors=0: expected .* 1 to 18"):
        run_example(tmp_path / "ex", n_detectors=0)
    ex = tmp_path / "ex"
    ex.mkdir()
    (ex / MARKER).write_text("{}")
    (ex / "outputs").mkdir()
    stale = ex / "outputs" / "r0000101001001001001_0001_wfi18_cal_tweakregstep.asdf"
    stale.write_text("stale")
    (ex / "notes.txt").write_text("kept")
    assert run_example(ex, n_detectors=1, verbosity=-1) == 0
    assert sorted(p.name for p in (ex / "outputs").glob("*_tweakregstep.asdf")) == [
        "r0000101001001001001_0001_wfi01_cal_tweakregstep.asdf",
        "r0000101001001001001_0002_wfi01_cal_tweakregstep.asdf",
    ]
    assert (ex / "notes.txt").read_text() == "kept"
    assert not list(ex.glob(".partial-*"))
    stdout = capsys.readouterr().out
    assert "Simulated" not in stdout  # -q: results only
    assert "Largest residual against the true WCS" in stdout
    rows = [line.split() for line in stdout.splitlines() if line.strip().startswith(("1 ", "2 "))]
    assert len(rows) == 2
    assert all(float(r[3]) < 1.0 and r[5] == "COMPLETE" for r in rows)
    assert np.all([int(r[4]) > 100 for r in rows])


def test_saved_outputs_keep_the_pixels_and_validate(tmp_path):
    """Outputs (arrays written as binary blocks) validate when read and keep the pixels."""
    exposures, stars = make_data(detectors=("WFI01", "WFI02"))
    asn = simulate.write_dataset(exposures, stars, tmp_path / "in")
    refcat_at(stars, 2028.0).write(tmp_path / "ref.ecsv", format="ascii.ecsv")
    rng = np.random.default_rng(5)
    pixels = {}
    for path in (tmp_path / "in").glob("*_cal.asdf"):  # arrays large enough for ASDF blocks
        with rdm.open(path) as model:
            model.data = rng.random((40, 40), dtype=np.float32)
            pixels[path.name] = model.data.copy()
            model.save(tmp_path / path.name)
        (tmp_path / path.name).replace(path)
    result = TweakRegStep.call(str(asn), abs_refcat=str(tmp_path / "ref.ecsv"))
    paths = TweakRegStep(output_dir=str(tmp_path / "out")).save_model(result, force=True)
    assert len(paths) == 4
    assert len(list((tmp_path / "out").glob("*_wcs.asdf"))) == 4
    for path in paths:
        name = Path(path).name
        with rdm.open(path) as model:
            model.validate()
            assert model.meta.filename == name
            np.testing.assert_array_equal(model.data, pixels[name.replace("_tweakregstep", "")])
            assert model.meta.cal_step.tweakreg == "COMPLETE"


def _walk_keys(value, table: str, out: dict) -> None:
    """Every key written, by the schema table it belongs to."""
    for key, sub in value.items():
        out.setdefault(table, set()).add(key)
        if table == "wcs_fit_results.top" and key in ("relative", "absolute"):
            _walk_keys(sub, "wcs_fit_results.fit", out)
        elif key == "quality" and isinstance(sub, dict):
            _walk_keys(sub, "wcs_fit_results.quality", out)


def test_each_image_has_its_own_match_counts_summing_to_its_group(aligned):
    from roman_tweakreg.quality import Quality

    result, *_ = aligned
    fits = []
    with result:
        for i in range(len(result)):
            model = result.borrow(i)
            fits.append(plain(model.meta.wcs_fit_results))
            result.shelve(model, i, modify=False)
    counts = {}
    for fit in fits:
        for phase in ("relative", "absolute"):
            counts.setdefault((fit["group_id"], phase), []).append(fit[phase]["image_nmatches"])
            assert fit["image_nmatches"] == fit["absolute"]["image_nmatches"]  # the final fit
    for (group, phase), own in counts.items():
        fit = next(f[phase] for f in fits if f["group_id"] == group)
        assert len(own) == 3
        if fit["status"] == "REFERENCE":
            assert own == [0, 0, 0]
            assert fit["nmatches"] == 0
            continue
        assert fit["status"] == "SUCCESS"
        assert sum(own) == fit["nmatches"] == fit["quality"]["nmatches"]
        sources = [f["n_sources"] for f in fits if f["group_id"] == group]
        if phase == "absolute":  # noise-free stars: each source pairs with its star
            assert own == sources
        else:  # to the other exposure: the overlap of two dithered pointings only
            assert all(0.8 * n < m < n for m, n in zip(own, sources, strict=True)), own
    # the report's image rows and fit rows, and the table, say the same
    entries = report.build_report(result, parameters={})["images"]
    rows = report.image_rows(entries)
    table = fit_results_table(result)
    fit_rows = report.group_rows(entries)
    for fit, row, line in zip(fits, rows, table, strict=True):
        assert row["absolute_nmatches"] == fit["absolute"]["image_nmatches"]
        if fit["relative"]["status"] == "REFERENCE":  # not fitted: '-', not 0
            assert row["relative_nmatches"] is None
        else:
            assert row["relative_nmatches"] == fit["relative"]["image_nmatches"]
        assert line["absolute_image_nmatches"] == row["absolute_nmatches"]
    for fit_row in fit_rows:
        if fit_row["status"] == "REFERENCE":
            continue
        mine = [r for r in rows if r["group"] in fit_row["group"].split("+")]
        assert fit_row["nmatches"] == sum(r[f"{fit_row['phase']}_nmatches"] for r in mine)
    text = report.format_report(entries, "table")
    assert "  abs. matches  " in text  # in the legend; the heading is on two lines
    assert "  rel. matches  " in text
    # every key written is declared (and so documented), every declared key written
    written: dict = {}
    for fit in fits:
        _walk_keys(fit, "wcs_fit_results.top", written)
    from roman_tweakreg.results import SCHEMA

    top = {k.name for k in SCHEMA["wcs_fit_results.top"]} | {
        k.name for k in SCHEMA["wcs_fit_results.fit"]
    }
    assert written["wcs_fit_results.top"] == top
    for name in ("wcs_fit_results.fit", "wcs_fit_results.quality"):
        assert written[name] == {k.name for k in SCHEMA[name]}, name
    assert set(Quality.__dataclass_fields__) | {"rmse_over_noise"} == {
        k.name for k in SCHEMA["wcs_fit_results.quality"]
    }


def test_every_report_key_is_declared_and_documented(aligned, tmp_path):
    result, *_ = aligned
    built = report.build_report(
        result, parameters={"a": 1}, timings={"total": 1.0}, outputs=[None] * 6
    )
    built = json.loads(json.dumps(plain(built, nan_as_none=True)))
    declared = {name: {k.name for k in keys} for name, keys in report.REPORT_KEYS.items()}
    assert set(built) == declared["report"]
    assert set(built["outputs"]) == declared["report.outputs"]
    for group in built["groups"]:
        assert set(group) == declared["report.group"]
        for phase in ("relative", "absolute"):
            assert set(group[phase]) == declared["report.fit"]
    for image in built["images"]:
        assert set(image) == declared["report.image"] - {"path"}  # only read from files
        for phase in ("relative", "absolute"):
            assert set(image[phase]) == declared["report.fit"]
    docs = (DOCS / "report.rst").read_text() + (DOCS / "outputs.rst").read_text()
    from roman_tweakreg.results import SCHEMA

    for name in [*SCHEMA, *report.REPORT_KEYS]:
        assert f".. schema-keys:: {name}\n" in docs, name
        rst = report.schema_rst(name)
        keys = {**SCHEMA, **report.REPORT_KEYS}[name]
        assert all(f"* - ``{k.name}``\n     - {k.doc}" in rst for k in keys), name
    with pytest.raises(ValueError, match=r"name='x': expected one of wcs_fit_results\.fit"):
        report.schema_rst("x")
