"""The ``roman-tweakreg`` command end to end: example, report and plot (2 detectors, ~40 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXE = Path(sys.executable).parent / "roman-tweakreg"
N_DETECTORS = 2
N_FILES = 2 * N_DETECTORS  # two exposures


def run(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(EXE), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        f"roman-tweakreg {' '.join(map(str, args))} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


def example_rows(stdout: str) -> list[dict]:
    """Parse the per-detector table printed by ``roman-tweakreg example``."""
    lines = stdout.splitlines()
    start = next(
        i
        for i, line in enumerate(lines)
        if line.split()[:2] == ["exposure", "detector"] and "after [mas]" in line
    )
    assert set(lines[start + 1]) == {"-"}, lines[start + 1]
    rows = []
    for line in lines[start + 2 :]:
        fields = line.split()
        if len(fields) != 6 or not fields[0].isdigit():
            break
        rows.append(
            {
                "exposure": int(fields[0]),
                "detector": fields[1],
                "before": float(fields[2]),
                "after": float(fields[3]),
                "nmatches": int(fields[4]),
                "status": fields[5],
            }
        )
    return rows


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "example"
    proc = run("example", "--out", out, "--detectors", N_DETECTORS)
    return out, proc.stdout


def test_example_aligns_below_one_mas(example):
    _, stdout = example
    rows = example_rows(stdout)
    assert len(rows) == N_FILES, stdout
    for row in rows:
        assert row["status"] == "COMPLETE", row
        assert row["before"] > 10.0, row  # a real pointing error was injected...
        assert row["after"] < 1.0, f"residual against the true WCS is {row['after']} mas: {row}"


def test_report_lists_every_output(example):
    out, _ = example
    outputs = sorted((out / "outputs").glob("*_cal_tweakregstep.asdf"))
    assert len(outputs) == N_FILES
    stdout = run("report", out / "outputs", "--json", out / "report.json").stdout
    rows = [line for line in stdout.splitlines() if line.startswith("r0")]
    assert len(rows) == N_FILES, stdout
    for path in outputs:
        line = next(r for r in rows if r.split()[0] == path.name)
        assert line.split()[2] == "COMPLETE", line
        assert "FIT-LVL2-gaia.ecsv" in line, line
    report = json.loads((out / "report.json").read_text())
    assert [img["file"] for img in report["images"]] == [p.name for p in outputs]
    assert report["statuses"]["cal_step"] == {"COMPLETE": N_FILES}
    for img in report["images"]:
        assert img["absolute"]["status"] == "SUCCESS"
        assert 0 < img["rmse_mas"] < 10  # centroid noise 0.02 px = 2.2 mas per axis
        assert img["nmatches"] > 100
        assert len(img["shift_arcsec"]) == 2
    assert len(report["groups"]) == 2


def test_report_reads_an_association(example, capsys):
    from roman_tweakreg.cli import main

    out, _ = example
    asn = out / "inputs" / f"{out.name}_asn.json"  # named after the example's folder
    assert main(["report", str(asn)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = json.loads(asn.read_text())["products"][0]["members"]
    for member in names:
        k = next(i for i, r in enumerate(lines) if r.startswith(member["expname"]))
        assert "INCOMPLETE" in lines[k], lines[k]
        assert "tweakreg has not run" in lines[k + 1], lines[k + 1]  # the reason, under it


def test_example_says_where_its_files_are_in_few_lines(example):
    out, stdout = example
    before_table = stdout.split("exposure detector")[0].splitlines()
    assert len(before_table) <= 12, before_table
    assert ".partial-" not in stdout  # the temporary folder is never named
    assert f"strun roman_tweakreg {out}/inputs/{out.name}_asn.json" in stdout
    assert f"--output_dir={out}/outputs" in stdout
    assert f"Outputs: {out}/outputs ({N_FILES} *_tweakregstep.asdf" in stdout
    assert any(
        line.strip().startswith(f"{N_FILES}/{N_FILES} COMPLETE, absolute rms ")
        and line.endswith(" mas to gaia.ecsv")
        for line in before_table
    ), before_table
    assert sum(line.strip().startswith("Absolute fit (rshift) to gaia.ecsv, groups ")
               for line in before_table) == 1  # fmt: skip


def _assert_figure(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.is_file(), path
    assert path.stat().st_size > 10_000, f"{path}: {path.stat().st_size} bytes"
    pixels = mpimg.imread(path)[..., :3]
    assert pixels.std() > 0.05, f"{path} looks blank (pixel std {pixels.std():.3f})"


@pytest.mark.parametrize("refcat", [True, False], ids=["refcat", "groups"])
def test_plot_writes_figures(example, refcat):
    out, _ = example
    figures = out / ("plots_refcat" if refcat else "plots_groups")
    args = ["plot", out / "outputs", "--out", figures]
    if refcat:
        args += ["--refcat", out / "inputs" / "gaia.ecsv"]
    stdout = run(*args).stdout
    printed = [Path(line) for line in stdout.splitlines() if line.endswith(".png")]
    assert sorted(p.name for p in printed) == [
        "focal_plane.png",
        "matched_sky.png",
        "residual_histograms.png",
    ]
    for path in printed:
        _assert_figure(path)


def test_plots_leave_the_callers_backend_alone(example, tmp_path):
    """make_plots draws through the Agg canvas without switching matplotlib's backend."""
    import matplotlib

    from roman_tweakreg import plots

    out, _ = example
    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        written = plots.make_plots(out / "outputs", out_dir=tmp_path, max_vectors=200)
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    assert sorted(p.name for p in written) == [
        "focal_plane.png",
        "matched_sky.png",
        "residual_histograms.png",
    ]
    for path in written:
        _assert_figure(path)


def test_residuals_match_the_fit(example):
    """The plot module's residuals (reference carried to each epoch) agree with the fit RMS."""
    from roman_tweakreg import plots

    out, _ = example
    images = plots.load_images(out / "outputs")
    assert all(i.input_path is not None for i in images)  # found in the sibling inputs/
    from roman_tweakreg.refcat import read_local_catalog

    ra0, dec0 = images[0].ra.mean(), images[0].dec.mean()
    reference = read_local_catalog(out / "inputs" / "gaia.ecsv", ra0, dec0, 1.0)
    residuals = plots.compute_residuals(images, reference)
    after = np.concatenate([r.after for r in residuals])
    before = np.concatenate([r.before for r in residuals])
    assert after.shape[0] > 1000
    assert np.sqrt(np.mean(after**2)) < 4.0  # mas per axis; 2.2 mas of centroid noise
    assert np.sqrt(np.mean(before**2)) > 50.0
    # the plot's per-image counts of the fit are the report's: own matches, summing to
    # each group's; its own nearest-neighbour pairs come within 1 % of them
    from roman_tweakreg import report

    entries = {e["file"]: e for e in report.read_results(out / "outputs")}
    rows = report.image_rows(list(entries.values()))
    by_file = {r.file: r for r in residuals}
    for image in images:
        own = entries[image.file]["absolute"]["image_nmatches"]
        assert image.fit_nmatches == own > 100
        assert abs(by_file[image.file].after.shape[0] - own) <= 0.01 * own
    for fit in report.group_rows(list(entries.values())):
        if fit["phase"] == "absolute":
            mine = [r for r in rows if r["group"] in fit["group"].split("+")]
            assert fit["nmatches"] == sum(r["absolute_nmatches"] for r in mine)


def test_cli_errors_name_the_file(tmp_path, capsys):
    from roman_tweakreg.cli import main

    missing = tmp_path / "missing_cal_tweakregstep.asdf"
    assert main(["report", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err


def test_plot_projection_is_gnomonic_east_and_north():
    from roman_tweakreg.plots import _tangent

    one_arcmin = np.rad2deg(np.tan(np.deg2rad(1 / 60))) * 3600  # gnomonic, arcsec
    xi, eta = _tangent([10 + 1 / 60, 10.0], [0.0, 1 / 60], 10.0, 0.0)
    np.testing.assert_allclose(xi, [one_arcmin, 0.0], atol=1e-9)
    np.testing.assert_allclose(eta, [0.0, one_arcmin], atol=1e-9)
