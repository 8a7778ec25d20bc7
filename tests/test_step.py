"""TweakRegStep as users run it: in Python, on files, through strun."""

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import roman_datamodels.datamodels as rdm
from astropy.table import Table

from conftest import make_data, models_of, refcat_at, truths_of
from roman_tweakreg import InvalidParameterError, MissingCatalogError, TweakRegStep
from roman_tweakreg.library import ModelLibrary
from roman_tweakreg.testing import simulate

STRUN = str(Path(sys.executable).parent / "strun")


def errors_mas(library, truths):
    out = []
    with library:
        for i, model in enumerate(library):
            out.append(simulate.wcs_difference_mas(model.meta.wcs, truths[i]))
            library.shelve(model, i, modify=False)
    return np.array(out)


def metas(library):
    out = []
    with library:
        for i, model in enumerate(library):
            out.append(
                (
                    model.meta.cal_step.tweakreg,
                    dict(model.meta.wcs_fit_results),
                    model.meta.wcs.name,
                    model.meta.wcs.available_frames,
                )
            )
            library.shelve(model, i, modify=False)
    return out


@pytest.fixture(scope="module")
def refcat_file(tmp_path_factory, two_exposures):
    _, stars = two_exposures
    path = tmp_path_factory.mktemp("ref") / "gaia_2028.ecsv"
    refcat_at(stars, 2028.0).write(path, format="ascii.ecsv")
    return path


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory, two_exposures):
    exposures, stars = make_data()
    folder = tmp_path_factory.mktemp("data")
    asn = simulate.write_dataset(exposures, stars, folder)
    refcat_at(stars, 2028.0).write(folder / "gaia_2028.ecsv", format="ascii.ecsv")
    return asn, exposures


def test_relative_and_absolute_in_memory(refcat_file):
    exposures, _ = make_data()
    result = TweakRegStep.call(models_of(exposures), abs_refcat=str(refcat_file))
    assert isinstance(result, ModelLibrary)
    assert errors_mas(result, truths_of(exposures)).max() < 1.0
    own = {}
    for status, fit, name, frames in metas(result):
        assert status == "COMPLETE"
        assert name == "FIT-LVL2-gaia_2028.ecsv"
        assert frames == ["detector", "v2v3", "v2v3corr", "world"]
        assert fit["status"] == "SUCCESS"
        # the group's own pairs within the shared absolute fit (~2,900 of each exposure)
        assert 2500 < fit["nmatches"] == fit["quality"]["nmatches"] < 3200
        assert fit["quality"]["significance"] > 30
        assert fit["quality"]["rmse_over_noise"] < 1.5
        assert fit["quality"]["matched_fraction"] > 0.9
        own[fit["group_id"]] = (fit["nmatches"], fit["rmse"])
        assert fit["fitgeom"] == "rshift"
        for key in (
            "matrix",
            "shift",
            "center",
            "proper_rot",
            "proper",
            "rot",
            "<rot>",
            "scale",
            "<scale>",
            "skew",
            "rmse",
            "mae",
        ):
            assert key in fit
        assert fit["relative"]["status"] in ("REFERENCE", "SUCCESS")
        assert fit["rmse"] < 0.01  # arcsec: 0.02 px centroid noise
    assert len(set(own.values())) == 2  # each group shows its own figures
    assert sum(n for n, _ in own.values()) > 5500


def test_relative_only_when_gaia_service_unavailable(caplog):
    exposures, _ = make_data()
    result = TweakRegStep.call(models_of(exposures), abs_refcat_retries=0)  # no service here
    outcome = metas(result)
    # aligned to each other only: a partial result, not COMPLETE (issue 27)
    assert [o[0] for o in outcome] == ["INCOMPLETE"] * 6
    assert all(o[1]["status"] == "INCOMPLETE" for o in outcome)
    assert all(o[1]["reason"].startswith("aligned to the other exposures only") for o in outcome)
    assert all(o[1]["absolute"]["status"] == "SKIPPED" for o in outcome)
    assert all(o[2] == "FIT-LVL2-RELATIVE" for o in outcome[3:])
    assert "Absolute alignment skipped, relative alignment kept" in caplog.text
    # exposure 1 was the reference: untouched, relative status REFERENCE
    statuses = sorted(o[1]["relative"]["status"] for o in outcome)
    assert statuses == ["REFERENCE"] * 3 + ["SUCCESS"] * 3
    # relative alignment alone: exposure 2's stars now land where exposure 1 puts them
    ref = [m for m in models_of(exposures)][:3]
    with result:
        moved = [result.borrow(i) for i in range(3, 6)]
        for m_ref, m in zip(ref, moved, strict=False):
            ids = np.intersect1d(
                m_ref.meta["tweakreg_catalog"]["objID"], m.meta["tweakreg_catalog"]["objID"]
            )
            a = _sky_of(m_ref, ids)
            b = _sky_of(m, ids)
            offset = np.hypot((a[0] - b[0]) * np.cos(np.deg2rad(a[1])), a[1] - b[1]) * 3.6e6
            assert np.median(offset) < 5  # mas, centroid noise of two catalogs
        for i, m in zip(range(3, 6), moved, strict=False):
            result.shelve(m, i, modify=False)


def _sky_of(model, ids):
    cat = model.meta["tweakreg_catalog"]
    sel = np.isin(cat["objID"], ids)
    order = np.argsort(np.asarray(cat["objID"])[sel])
    ra, dec = model.meta.wcs(np.asarray(cat["x"])[sel][order], np.asarray(cat["y"])[sel][order])
    return ra, dec


def test_single_image_with_its_own_reference(tmp_path):
    exposures, stars = make_data(1, detectors=("WFI07",), seed=9)
    path = tmp_path / "ref.ecsv"
    refcat_at(stars, 2028.0).write(path)
    result = TweakRegStep.call(exposures[0].models[0], abs_refcat=str(path))
    status, fit, _name, _ = metas(result)[0]
    assert status == "COMPLETE"
    assert fit["relative"]["status"] == "SKIPPED"
    assert errors_mas(result, truths_of(exposures)).max() < 1.0


def test_all_defaults_run_without_a_crash():
    exposures, _ = make_data(1, detectors=("WFI01",))
    # abs_separation 0.1" < abs_tolerance 0.7" by default; GAIADR3 unreachable offline
    result = TweakRegStep.call(exposures[0].models[0])
    status, fit, _, frames = metas(result)[0]
    assert status == "SKIPPED"
    assert "catalog service http://127.0.0.1:9" in fit["reason"]
    assert "connection refused" in fit["reason"]
    assert "v2v3corr" not in frames


@pytest.mark.parametrize(
    ("pars", "message"),
    [
        ({"minobj": 0}, "minobj=0: expected an integer >= 1"),
        ({"searchrad": -1.0}, r"searchrad=-1.0: expected a number in \(0, 176\]"),
        ({"abs_tolerance": 9.0}, "abs_tolerance=9.0 is larger than abs_searchrad=6.0"),
        ({"sigma": 0.0}, "sigma=0.0: expected a number > 0"),
        ({"vo_timeout": 0.0}, "vo_timeout=0.0: expected a number of seconds > 0"),
    ],
)
def test_invalid_parameters_are_rejected(pars, message):
    exposures, _ = make_data(1, detectors=("WFI01",))
    with pytest.raises(InvalidParameterError, match=message):
        TweakRegStep.call(exposures[0].models[0], **pars)


@pytest.mark.parametrize("name", ["fitgeometry", "abs_fitgeometry"])
def test_invalid_fitgeometry_lists_the_accepted_values(name):
    exposures, _ = make_data(1, detectors=("WFI01",))
    with pytest.raises(
        InvalidParameterError,
        match=rf"^{name}='affine': expected one of shift, rshift, rscale, general$",
    ):
        TweakRegStep.call(exposures[0].models[0], **{name: "affine"})


def test_missing_catalog_file_names_image_and_paths(tmp_path):
    exposures, _ = make_data(1, detectors=("WFI01",))
    model = exposures[0].models[0]
    model.meta["tweakreg_catalog"] = "nowhere_cat.ecsv"
    with pytest.raises(
        MissingCatalogError,
        match=r"wfi01_cal.asdf: catalog named by "
        r"meta.tweakreg_catalog does not exist; tried .*nowhere_cat.ecsv",
    ):
        TweakRegStep.call(model)


def test_image_without_catalog_gets_a_detected_one(tmp_path):
    from roman_tweakreg.detection import catalog_filename

    exposures, _ = make_data(1, detectors=("WFI01",), data_shape=(256, 256))
    model = exposures[0].models[0]
    del model.meta["tweakreg_catalog"]
    rng = np.random.default_rng(1)
    model.data[:] = rng.normal(10.0, 1.0, model.data.shape).astype("f4")
    yy, xx = np.mgrid[:256, :256]
    for x0, y0 in rng.uniform(20, 236, (30, 2)):
        model.data += (500 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 0.85**2))).astype(
            "f4"
        )
    model.err[:] = 1.0
    model.dq[:] = 0
    result = TweakRegStep.call(
        model, catalog_path=str(tmp_path), abs_refcat="", abs_refcat_retries=0
    )
    with result:
        out = result.borrow(0)
        path = out.meta["tweakreg_catalog"]
        result.shelve(out, 0, modify=False)
    assert path == str(catalog_filename(model.meta.filename, tmp_path, "ascii.ecsv"))
    from astropy.table import Table

    assert 25 <= len(Table.read(path)) <= 30


def test_non_imaging_exposure_is_skipped(refcat_file, caplog):
    exposures, _ = make_data()
    models = models_of(exposures)
    models[0].meta.exposure.type = "WFI_SPECTRAL"
    models[1].meta.wcsinfo.v2_ref = 1e6  # an imaging exposure that cannot be aligned: a warning
    with caplog.at_level(logging.INFO, logger="roman_tweakreg"):
        result = TweakRegStep.call(models, abs_refcat=str(refcat_file))
    outcome = metas(result)
    assert outcome[0][0] == "SKIPPED"
    assert "not an imaging exposure" in outcome[0][1]["reason"]
    skipped = {r.getMessage().split(":")[0]: r.levelname for r in caplog.records
               if ": skipped, " in r.getMessage()}  # fmt: skip
    # a spectral exposure in the association is expected (INFO); a broken image is not
    assert skipped == {
        models[0].meta.filename: "INFO",
        models[1].meta.filename: "WARNING",
    }
    assert outcome[1][0] == "SKIPPED"
    assert [o[0] for o in outcome[2:]] == ["COMPLETE"] * 4


def test_image_whose_wcs_has_no_v2v3_frame_is_skipped_with_the_reason(refcat_file, caplog):
    from gwcs import WCS

    exposures, _ = make_data()
    models = models_of(exposures)
    wcs = models[1].meta.wcs
    models[1].meta.wcs = WCS(
        [(wcs.input_frame, wcs.forward_transform), (wcs.output_frame, None)], name="flat"
    )
    result = TweakRegStep.call(models, abs_refcat=str(refcat_file))
    outcome = metas(result)
    assert outcome[1][0] == "SKIPPED"
    assert "no 'v2v3' frame" in outcome[1][1]["reason"]
    assert outcome[1][3] == ["detector", "world"]  # left as it was
    assert [o[0] for i, o in enumerate(outcome) if i != 1] == ["COMPLETE"] * 5
    assert f"{models[1].meta.filename}: skipped, its WCS has no 'v2v3' frame" in caplog.text


def test_association_on_disk_outputs_and_inputs_untouched(on_disk, tmp_path):
    asn, exposures = on_disk
    folder = asn.parent
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.asdf")}
    out = tmp_path / "out"
    TweakRegStep.call(
        str(asn), abs_refcat=str(folder / "gaia_2028.ecsv"), output_dir=str(out), save_results=True
    )
    assert {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.asdf")
    } == digests
    outputs = sorted(out.glob("*_tweakregstep.asdf"))
    assert len(outputs) == 6
    truths = truths_of(exposures)
    for path, truth in zip(outputs, truths, strict=False):
        with rdm.open(path) as model:
            assert "v2v3corr" in model.meta.wcs.available_frames
            assert model.meta.cal_step.tweakreg == "COMPLETE"
            assert model.meta.wcsinfo.s_region.startswith("POLYGON ICRS")
            assert simulate.wcs_difference_mas(model.meta.wcs, truth) < 1.0
    assert not list(out.glob(".tweakreg-*"))
    # romancal's WCS product beside each output
    products = sorted(out.glob("*_wcs.asdf"))
    assert [p.name.replace("_wcs.", "_tweakregstep.") for p in products] == [
        p.name for p in outputs
    ]
    for path, truth in zip(products, truths, strict=True):
        with rdm.open(path) as product:
            assert isinstance(product, rdm.WfiWcsModel)
            assert simulate.wcs_difference_mas(product.wcs_l2, truth) < 1.0
            assert product.meta.wcs_fit_results["n_detector"] == 6


def test_strun_alias_and_parameter_file(on_disk, tmp_path):
    asn, exposures = on_disk
    folder = asn.parent
    params = tmp_path / "pars.asdf"
    TweakRegStep(abs_refcat=str(folder / "gaia_2028.ecsv"), abs_fitgeometry="rscale").export_config(
        params
    )
    run = subprocess.run(
        [STRUN, str(params), str(asn), f"--output_dir={tmp_path / 'a'}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = sorted((tmp_path / "a").glob("*_tweakregstep.asdf"))
    assert len(outputs) == 6
    with rdm.open(outputs[0]) as model:
        assert model.meta.wcs_fit_results["fitgeom"] == "rscale"
        assert simulate.wcs_difference_mas(model.meta.wcs, truths_of(exposures)[0]) < 1.0
    run = subprocess.run(
        [
            STRUN,
            "roman_tweakreg",
            str(asn),
            f"--abs_refcat={folder / 'gaia_2028.ecsv'}",
            f"--output_dir={tmp_path / 'b'}",
            "--fitgeometry=general",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with rdm.open(sorted((tmp_path / "b").glob("*_tweakregstep.asdf"))[-1]) as model:
        assert model.meta.wcs_fit_results["relative"]["fitgeom"] == "general"
        assert simulate.wcs_difference_mas(model.meta.wcs, truths_of(exposures)[-1]) < 1.0


def test_romancal_defaults_parameter_file():
    from importlib.resources import files

    path = files("roman_tweakreg") / "data" / "romancal-1.1.0-tweakreg.asdf"
    step = TweakRegStep.from_config_file(str(path))
    assert (step.minobj, step.abs_minobj, step.fitgeometry, step.abs_fitgeometry) == (
        10,
        10,
        "general",
        "general",
    )
    assert (step.abs_separation, step.abs_refcat, step.vo_timeout) == (1.0, "GAIADR3_S3", 1200.0)
    # romancal 1.1.0 has no use_custom_catalogs: the file leaves ours (it warned when True)
    assert step.use_custom_catalogs is False


def test_strun_with_class_path_and_bad_parameter(on_disk, tmp_path):
    asn, _ = on_disk
    run = subprocess.run(
        [STRUN, "roman_tweakreg.TweakRegStep", str(asn), "--minobj=-3", f"--output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert run.returncode != 0
    assert "minobj=-3: expected an integer >= 1" in run.stderr + run.stdout


@pytest.mark.parametrize(
    ("xcol", "ycol"), [("xcentroid", "ycentroid"), ("x_centroid", "y_centroid"), ("x_psf", "y_psf")]
)
def test_catalog_column_variants_and_bad_rows(refcat_file, xcol, ycol):
    exposures, _ = make_data()
    models = models_of(exposures)
    for m in models:
        cat = m.meta["tweakreg_catalog"]
        cat.rename_columns(["x", "y"], [xcol, ycol])
        cat[xcol][:3] = np.nan
        cat[ycol][3:5] = 5000.0  # outside the 4088 x 4088 bounding box
    result = TweakRegStep.call(models, abs_refcat=str(refcat_file))
    assert errors_mas(result, truths_of(exposures)).max() < 1.0


def test_romancal_layout_source_catalog_name(on_disk, tmp_path):
    asn, _ = on_disk
    with rdm.open(sorted(asn.parent.glob("*_cal.asdf"))[0]) as model:
        assert "tweakreg_catalog" not in model.meta
        assert model.meta.source_catalog.tweakreg_catalog_name.endswith("_cat.ecsv")


def test_on_disk_library_input(on_disk, tmp_path):
    asn, exposures = on_disk
    library = ModelLibrary(asn, on_disk=True, temp_directory=tmp_path / "tmp")
    result = TweakRegStep.call(library, abs_refcat=str(asn.parent / "gaia_2028.ecsv"))
    assert result is library
    assert errors_mas(result, truths_of(exposures)).max() < 1.0
    assert len(list((tmp_path / "tmp").iterdir())) == 6  # models were shelved to disk


def test_on_disk_parameter(on_disk):
    asn, _exposures = on_disk
    result = TweakRegStep.call(
        str(asn), abs_refcat=str(asn.parent / "gaia_2028.ecsv"), on_disk=True
    )
    assert [m[0] for m in metas(result)] == ["COMPLETE"] * 6


def test_report_parameter_writes_json(refcat_file, tmp_path):
    import json

    exposures, _ = make_data()
    TweakRegStep.call(
        models_of(exposures),
        abs_refcat=str(refcat_file),
        output_dir=str(tmp_path),
        report="fit_report.json",
    )
    report = json.loads((tmp_path / "fit_report.json").read_text())
    assert len(report["images"]) == 6
    assert {i["status"] for i in report["images"]} == {"COMPLETE"}
    assert set(report["timings"]) >= {"catalogs", "relative", "absolute", "update", "total"}
    assert report["parameters"]["fitgeometry"] == "rshift"


def test_never_asks_crds(monkeypatch, refcat_file):
    from stpipe import crds_client

    def forbidden(*args, **kwargs):
        raise AssertionError("CRDS was asked")

    monkeypatch.setattr(crds_client, "get_reference_file", forbidden)
    monkeypatch.setattr(crds_client, "check_reference_open", forbidden)
    exposures, _ = make_data(1, detectors=("WFI01",))
    # .call goes through stpipe's build_config, where a step would fetch CRDS parameters
    result = TweakRegStep.call(exposures[0].models[0], abs_refcat=str(refcat_file))
    assert metas(result)[0][0] == "COMPLETE"


def test_running_again_on_aligned_outputs(refcat_file):
    exposures, _ = make_data()
    first = TweakRegStep.call(models_of(exposures), abs_refcat=str(refcat_file))
    with first:
        models = [first.borrow(i) for i in range(len(first))]
        for i, m in enumerate(models):
            first.shelve(m, i, modify=False)
    second = TweakRegStep.call(models, abs_refcat=str(refcat_file))
    assert errors_mas(second, truths_of(exposures)).max() < 1.0
    for status, fit, _, frames in metas(second):
        assert status == "COMPLETE"
        assert frames == ["detector", "v2v3", "v2v3corr", "world"]
        assert abs(fit["shift"][0]) < 0.002  # arcsec: nothing left to correct


def test_file_and_list_of_files_inputs(on_disk, tmp_path):
    asn, exposures = on_disk
    files = sorted(asn.parent.glob("*_cal.asdf"))
    refcat = str(asn.parent / "gaia_2028.ecsv")
    result = TweakRegStep.call([str(f) for f in files], abs_refcat=refcat)
    assert errors_mas(result, truths_of(exposures)).max() < 1.0
    assert len({o[1]["group_id"] for o in metas(result)}) == 2  # groups from the file metadata
    single = TweakRegStep.call(
        str(files[0]), abs_refcat=refcat, output_dir=str(tmp_path), save_results=True
    )
    assert metas(single)[0][0] == "COMPLETE"
    assert (tmp_path / files[0].name.replace("_cal.asdf", "_cal_tweakregstep.asdf")).is_file()


def test_outputs_have_ordinary_permissions(refcat_file, tmp_path):
    """Outputs are written through a temporary file, yet readable like any new file."""
    import os

    exposures, _ = make_data(1, detectors=("WFI01",))
    out = tmp_path / "out"
    TweakRegStep.call(
        exposures[0].models[0],
        abs_refcat=str(refcat_file),
        output_dir=str(out),
        save_results=True,
        report="report.json",
        save_abs_catalog=True,
    )
    umask = os.umask(0)
    os.umask(umask)
    written = sorted(out.iterdir())
    assert [p.name for p in written] == [
        "fit_gaia_2028_ref.ecsv",
        "r0000101001001001001_0001_wfi01_cal_tweakregstep.asdf",
        "r0000101001001001001_0001_wfi01_cal_wcs.asdf",
        "report.json",
    ]
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_worker_processes_give_the_same_alignment(on_disk, caplog):
    """processes=2 (a worker process reads catalogs and builds WCSs) == processes=1, exactly."""
    import logging

    asn, exposures = on_disk
    caplog.set_level(logging.DEBUG, logger="roman_tweakreg")
    runs = {}
    for processes in (1, 2):
        caplog.clear()
        result = TweakRegStep.call(
            str(asn), abs_refcat=str(asn.parent / "gaia_2028.ecsv"), processes=processes
        )
        shared = "Per-image work shared with 1 worker process(es)" in caplog.text
        assert shared == (processes == 2)
        assert caplog.text.count("Catalog 6 of 6") == 1
        runs[processes] = (metas(result), result)
    (one, lib1), (two, lib2) = runs[1], runs[2]
    assert [m[0] for m in two] == ["COMPLETE"] * 6
    for a, b in zip(one, two, strict=True):
        assert a[1]["nmatches"] == b[1]["nmatches"]
        assert a[1]["shift"] == b[1]["shift"]
        assert a[3] == b[3] == ["detector", "v2v3", "v2v3corr", "world"]
    wcs1 = [m.meta.wcs for m in _models(lib1)]
    wcs2 = [m.meta.wcs for m in _models(lib2)]
    assert max(simulate.wcs_difference_mas(a, b) for a, b in zip(wcs1, wcs2, strict=True)) < 1e-9
    assert errors_mas(lib2, truths_of(exposures)).max() < 1.0


def _models(library):
    out = []
    with library:
        for i, model in enumerate(library):
            out.append(model)
            library.shelve(model, i, modify=False)
    return out


def test_missing_inputs_name_the_file(on_disk, tmp_path):
    """A file, an association or an association member that does not exist: a
    FileNotFoundError (MissingInputError) naming it, before anything is aligned."""
    import json

    from roman_tweakreg import MissingInputError

    asn, _ = on_disk
    with pytest.raises(FileNotFoundError, match=r"nothere_cal\.asdf: input file does not exist"):
        TweakRegStep.call(str(tmp_path / "nothere_cal.asdf"))
    with pytest.raises(MissingInputError, match=r"noasn\.json: association file does not exist"):
        TweakRegStep.call(str(tmp_path / "noasn.json"))
    broken = json.loads(asn.read_text())
    broken["products"][0]["members"][1]["expname"] = "gone_cal.asdf"
    broken_asn = asn.parent / "broken_asn.json"  # beside the members it names
    broken_asn.write_text(json.dumps(broken))
    try:
        with pytest.raises(
            MissingInputError, match=r"gone_cal\.asdf: association member file does not exist"
        ):
            TweakRegStep.call(str(broken_asn))
    finally:
        broken_asn.unlink()


def test_update_source_catalog_coordinates(tmp_path):
    import astropy.units as u
    import pyarrow.parquet as pq

    from roman_tweakreg._io import read_parquet

    exposures, stars = make_data(detectors=("WFI01",))
    refcat = tmp_path / "gaia_2028.ecsv"
    refcat_at(stars, 2028.0).write(refcat)
    models = models_of(exposures)
    rng = np.random.default_rng(17)
    for m in models:
        cat = m.meta["tweakreg_catalog"]
        table = Table({"label": np.asarray(cat["objID"]), "x_psf": cat["x"], "y_psf": cat["y"]})
        table["x_centroid"] = table["x_psf"] + rng.normal(0, 0.05, len(table))
        table["y_centroid"] = table["y_psf"] + rng.normal(0, 0.05, len(table))
        for name in ("ra_psf", "dec_psf", "ra_centroid", "dec_centroid"):
            table[name] = np.zeros(len(table)) * u.deg
        path = tmp_path / m.meta.filename.replace("_cal.asdf", "_cat.parquet")
        table.write(path)
        del m.meta["tweakreg_catalog"]
        m.meta["source_catalog"] = {"tweakreg_catalog_name": str(path)}
    paths = sorted(tmp_path.glob("*_cat.parquet"))
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    schemas = [pq.read_schema(p) for p in paths]
    TweakRegStep.call(models, abs_refcat=str(refcat))
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths] == digests  # not asked
    result = TweakRegStep.call(
        models, abs_refcat=str(refcat), update_source_catalog_coordinates=True
    )
    assert errors_mas(result, truths_of(exposures)).max() < 1.0
    for model, path, schema in zip(models, paths, schemas, strict=True):
        assert model.meta.cal_step.tweakreg == "COMPLETE"
        table = read_parquet(path)
        ra, dec = model.meta.wcs(table["x_psf"], table["y_psf"])
        np.testing.assert_array_equal(table["ra_psf"], ra)
        np.testing.assert_array_equal(table["dec_psf"], dec)
        ra, dec = model.meta.wcs(table["x_centroid"], table["y_centroid"])
        np.testing.assert_array_equal(table["ra_centroid"], ra)
        assert pq.read_schema(path).equals(schema, check_metadata=True)


@pytest.mark.parametrize(("ra", "dec"), [(10.0, 89.9), (10.0, -89.9), (359.995, -30.0)])
def test_poles_and_ra_zero_are_aligned_to_1_mas(ra, dec, tmp_path):
    # issue 28: the simulator's pointing errors near the poles were 4-13"; the field at
    # RA 359.995 is dithered across RA 0/360
    exposures, stars = make_data(ra=ra, dec=dec, detectors=("WFI01", "WFI10"), density=20000.0)
    ras = [m.meta.wcsinfo.ra_ref for m in models_of(exposures)]
    refcat_at(stars, 2028.0).write(tmp_path / "ref.ecsv")
    result = TweakRegStep.call(models_of(exposures), abs_refcat=str(tmp_path / "ref.ecsv"))
    assert [m[0] for m in metas(result)] == ["COMPLETE"] * 4
    assert [m[1]["absolute"]["status"] for m in metas(result)] == ["SUCCESS"] * 4
    assert errors_mas(result, truths_of(exposures)).max() < 1.0
    if ra > 359:
        assert (min(ras) < 1.0, max(ras) > 359.0) == (True, True)  # both sides of RA 0
