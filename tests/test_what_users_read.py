"""What a user reads (issue 25): report table and JSON, log lines, help, errors, parameter file."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from conftest import make_data
from roman_tweakreg import TweakRegStep, report
from roman_tweakreg.cli import main
from roman_tweakreg.matching import FitResult
from roman_tweakreg.step import result_line
from roman_tweakreg.testing import simulate

BIN = Path(sys.executable).parent
PARAMETER_FILE = files("roman_tweakreg") / "data" / "romancal-1.1.0-tweakreg.asdf"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """2 exposures x 2 detectors, aligned from files with romancal 1.1.0's parameter file
    (``general`` geometry), saved by 2 processes; the step's log records."""
    root = tmp_path_factory.mktemp("users")
    exposures, stars = make_data(detectors=("WFI01", "WFI02"))
    asn = simulate.write_dataset(exposures, stars, root / "in")
    ref = root / "in" / "gaia.ecsv"  # Gaia-like, at 2016.0 with proper motions
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    keep = Keep(logging.INFO)
    logger = logging.getLogger("roman_tweakreg")
    logger.addHandler(keep)
    try:
        TweakRegStep.call(
            str(asn), config_file=str(PARAMETER_FILE),
            abs_refcat=str(ref),  # the file's GAIADR3_S3 is on the network
            output_dir=str(root / "out"), save_results=True, processes=2,
        )  # fmt: skip
    finally:
        logger.removeHandler(keep)
    return root, records


def _messages(records, level=logging.INFO):
    return [r.getMessage() for r in records if r.levelno == level]


def test_romancal_parameter_file_runs_without_a_warning(saved):
    _, records = saved
    assert len(records) > 20
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    # it holds romancal 1.1.0's parameters only: no use_custom_catalogs (romancal has none)
    step = TweakRegStep.from_config_file(str(PARAMETER_FILE))
    assert step.use_custom_catalogs is False
    assert (step.minobj, step.fitgeometry, step.abs_separation) == (10, "general", 1.0)


def test_fit_lines_name_the_geometry_scale_and_skew(saved):
    _, records = saved
    info = _messages(records)
    relative = [m for m in info if m.startswith("Relative fit (general), group ")]
    absolute = [m for m in info if m.startswith("Absolute fit (general) to gaia.ecsv, ")]
    assert len(relative) == 1, info
    assert len(absolute) == 1, info  # one fit moved both groups: one line
    for line in relative + absolute:
        match = re.search(r"scale \((\d\.\d{9}), (\d\.\d{9})\), skew (-?\d\.\d{6}) deg", line)
        assert match, line
        assert all(abs(float(v) - 1.0) < 1e-4 for v in match.groups()[:2]), line
        assert abs(float(match.group(3))) < 0.01, line
    assert "groups 0000101001001001001_0001, 0000101001001001001_0002 (4 images)" in absolute[0]


def test_the_run_ends_with_its_result_and_files_are_logged_in_order(saved):
    root, records = saved
    info = _messages(records)
    assert re.fullmatch(r"4/4 COMPLETE, absolute rms \d+\.\d\d mas to gaia\.ecsv", info[-1])
    rms = float(info[-1].split()[4])
    absolute = next(m for m in info if m.startswith("Absolute fit"))
    assert f"rms {rms:.2f} mas" in absolute
    saved_lines = [m.removeprefix("Saved model in ") for m in info if m.startswith("Saved model")]
    expected = []
    for exposure in ("0001", "0002"):
        for detector in ("wfi01", "wfi02"):
            stem = root / "out" / f"r0000101001001001001_{exposure}_{detector}_cal"
            expected += [f"{stem}_tweakregstep.asdf", f"{stem}_wcs.asdf"]
    assert saved_lines == expected  # library order, though 2 processes wrote them


def test_result_line_counts_whatever_statuses_occur():
    shared = {"rmse": 0.003, "shift": [0.1, 0.2]}
    absolute = {
        "g1": FitResult("SUCCESS", fit=shared, nmatches=300, refcat="gaia.ecsv"),
        "g2": FitResult("SUCCESS", fit={**shared, "rmse": 0.004}, nmatches=100,
                        refcat="gaia.ecsv"),
    }  # fmt: skip
    statuses = ["COMPLETE"] * 30 + ["INCOMPLETE"] * 4 + ["SKIPPED"] * 2
    rms = np.sqrt((300 * 3.0**2 + 100 * 4.0**2) / 400)
    assert result_line(statuses, absolute, "x") == (
        f"30/36 COMPLETE, 4 INCOMPLETE, 2 SKIPPED, absolute rms {rms:.2f} mas to gaia.ecsv"
    )
    assert result_line(["COMPLETE"] * 36, absolute, "x").startswith("36/36 COMPLETE, ")
    skipped = {"g1": FitResult("SKIPPED", "no stars in the cone", refcat="GAIADR3")}
    assert result_line(["COMPLETE"] * 4, skipped, "GAIADR3") == (
        "4/4 COMPLETE, absolute fit to GAIADR3 SKIPPED: no stars in the cone"
    )
    assert result_line(["SKIPPED"] * 2, {}, "GAIADR3") == "0/2 COMPLETE, 2 SKIPPED"


def test_report_table_fits_120_columns_with_a_legend(saved, capsys):
    root, _ = saved
    assert main(["report", str(root / "out")]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= report.TABLE_WIDTH, max(lines, key=len)
    for column in ("chance", "signif. [sigma]", "rms/noise", "matched", "rel. matches"):
        assert any(line.startswith(f"  {column}  ") for line in lines), column
    # the relative part: the reference group's matches are '-', not 0
    entries = report.read_results(root / "out")
    ref = next(e for e in entries if e["relative"]["status"] == "REFERENCE")
    short = ref["group_id"].removeprefix("0000101001001001001_")
    reference = next(line for line in lines if " REFERENCE " in line)
    assert reference.split()[:4] == [short, "2", "REFERENCE", "-"], reference
    # one absolute row for the two groups moved by one fit, with all their pairs
    (absolute,) = [r for r in report.group_rows(entries) if r["phase"] == "absolute"]
    row = next(line for line in lines if line.startswith("0001+0002 "))
    assert row.split()[:4] == ["0001+0002", "4", "SUCCESS", str(absolute["nmatches"])]
    assert absolute["nmatches"] == sum(e["absolute"]["nmatches"] for e in entries[::2])
    assert "Groups are shown without the common beginning '0000101001001001001_'." in text
    # image rows: '-' for the reference group's relative matches
    image = next(line for line in lines if line.startswith(ref["file"]))
    assert image.split()[-2:] == ["-", str(ref["absolute"]["image_nmatches"])], image
    other = next(e for e in entries if e["relative"]["status"] == "SUCCESS")
    image = next(line for line in lines if line.startswith(other["file"]))
    assert image.split()[-2] == str(other["relative"]["image_nmatches"]), image


def test_one_json_layout_for_format_json_and_json_file(saved, tmp_path, capsys):
    root, _ = saved
    path = tmp_path / "report.json"
    assert main(["report", str(root / "out"), "--format", "json", "--json", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(path.read_text())
    assert printed == written
    assert written["schema"] == report.REPORT_SCHEMA == "roman_tweakreg.report/2"
    assert set(written) == {k.name for k in report.REPORT_KEYS["report"]}
    # made from files, which do not record parameters and timings: said, not left empty
    assert (written["made_from"], written["parameters"], written["timings"]) == (
        "files", None, None
    )
    assert written["statuses"]["cal_step"] == {"COMPLETE": 4}
    assert sorted((f["phase"], f["status"]) for f in written["fits"]) == [
        ("absolute", "SUCCESS"), ("relative", "REFERENCE"), ("relative", "SUCCESS")
    ]
    # the step's own report: the same layout, with parameters and timings
    with TweakRegStep.call(
        str(root / "in" / "asn.json"), config_file=str(PARAMETER_FILE),
        abs_refcat=str(root / "in" / "gaia.ecsv"), report=str(tmp_path / "run.json"),
    ) as _:  # fmt: skip
        pass
    run = json.loads((tmp_path / "run.json").read_text())
    assert set(run) == set(written)
    assert run["made_from"] == "run"
    assert run["parameters"]["abs_refcat"] == str(root / "in" / "gaia.ecsv")
    assert run["timings"]["total"] > 0
    assert [(f["group"], f["nmatches"]) for f in run["fits"]] == [
        (f["group"], f["nmatches"]) for f in written["fits"]
    ]  # the same data aligned the same way


def test_strun_invalid_parameter_is_one_line_without_traceback(tmp_path):
    run = subprocess.run(
        [str(BIN / "strun"), "roman_tweakreg", "asn.json", "--fitgeometry=affine"],
        capture_output=True, text=True, check=False, timeout=120, cwd=tmp_path, env=_env(),
    )  # fmt: skip
    out = (run.stdout + run.stderr).strip().splitlines()
    assert run.returncode == 1
    assert "Traceback" not in run.stdout + run.stderr
    # our ERROR log line (stpipe 1.x sets up logging first), or the message stpipe
    # 0.11, the lowest the pins allow, prints itself: once, and the last line
    message = "fitgeometry='affine': expected one of shift, rshift, rscale, general"
    assert [line for line in out if line.endswith(message)] == out[-1:], out
    assert len(out) <= 2, out  # stpipe's "instance created" line, then ours


def test_strun_help_reads_well_with_units(tmp_path):
    run = subprocess.run(
        [str(BIN / "strun"), "roman_tweakreg", "--help"],
        capture_output=True, text=True, check=True, timeout=120, cwd=tmp_path, env=_env(),
    )  # fmt: skip
    text = " ".join(run.stdout.split())
    assert "----------" not in text
    assert "Attributes" not in text
    for name, default in (("searchrad", "2.0"), ("separation", "1.0"), ("tolerance", "0.7"),
                          ("abs_searchrad", "6.0"), ("kernel_fwhm", "2.0")):  # fmt: skip
        unit = "pixels" if name == "kernel_fwhm" else "arcsec"
        assert re.search(rf"--{name} [^-]*\({unit}\) \[default={default}\]", text), name


@pytest.mark.skipif(importlib.util.find_spec("romancal") is not None, reason="romancal is here")
def test_strun_elp_without_romancal_says_what_is_missing(tmp_path):
    run = subprocess.run(
        [str(BIN / "strun"), "roman_tweakreg_elp", "x_uncal.asdf"],
        capture_output=True, text=True, check=False, timeout=120, cwd=tmp_path, env=_env(),
    )  # fmt: skip
    out = (run.stdout + run.stderr).strip().splitlines()
    assert run.returncode == 1
    assert len(out) == 1, out
    assert "romancal is not installed: pip install 'romancal==1.1.0'" in out[0]


def test_command_help_lists_each_command_once_and_plot_describes(capsys):
    with pytest.raises(SystemExit, match="0"):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("example", "report", "plot", "asn", "batch"):
        assert len(re.findall(rf"^\s+{command}\s", text, re.MULTILINE)) == 1, command
    with pytest.raises(SystemExit, match="0"):
        main(["plot", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Write residual figures of aligned output files (focal_plane.png" in text


def test_plots_say_what_they_count(saved, tmp_path):
    """Figures from files: each panel counts the pairs of its own sources and quotes the
    step's fit of the same kind; histogram ranges follow the data; outliers are counted."""
    from roman_tweakreg import plots

    root, _ = saved
    images = plots.load_images(root / "out", [root / "in"])
    residuals = plots.compute_residuals(images, None, match_radius=0.5)
    groups = list(dict.fromkeys(i.group_id for i in images))
    first, second = ([i for i in images if i.group_id == g] for g in groups)
    paired = sum(r.after.shape[0] for r in residuals)
    n_sources = sum(i.ra.size for i in second)
    text = plots._sky_counts(images, groups[1], paired, n_sources, residuals, 0.5, False)
    if second[0].relative_status == "REFERENCE":
        assert "the relative fit's reference" in text, text
    else:  # without a catalog: the relative fit's matches, not the absolute one's
        relative = sum(i.relative_nmatches for i in second)
        assert text.endswith(f"the step's relative fit: {relative} matches"), text
        assert relative != sum(i.fit_nmatches for i in second)
    assert text.startswith(f"{paired} of {n_sources} sources paired within 0.5″, "
                           f"{n_sources - paired} not")  # fmt: skip
    first_text = plots._sky_counts(images, groups[0], 0, 0, [], 0.5, False)
    if first[0].relative_status == "REFERENCE":
        assert first_text.startswith("the others' reference"), first_text
    else:
        assert first_text == "the first group: the others are paired with it"
    note = plots._unmatched_note(images, residuals, 0.5)
    assert note.startswith(f"{paired} of {n_sources} sources paired within 0.5″, "
                           f"{n_sources - paired} unmatched")  # fmt: skip
    # a narrow "before" distribution far from 0 gets a range of its own, not one bin
    rng = np.random.default_rng(1)
    lo, hi = plots._robust_range(rng.normal(-709.0, 3.0, 15000))
    assert -730 < lo < -715
    assert -703 < hi < -690
    written = plots.make_plots(root / "out", inputs=[root / "in"], out_dir=tmp_path)
    assert [p.name for p in written] == ["focal_plane.png", "residual_histograms.png",
                                         "matched_sky.png"]  # fmt: skip
