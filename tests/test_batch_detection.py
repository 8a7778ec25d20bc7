"""The batch's source detection: one Dask task per image without a catalog, on a real
LocalCluster of 2 worker processes (the ``client`` fixture of test_batch); the catalog
plan the association's task makes (opening it once)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from astropy.table import Table
from roman_datamodels import datamodels as rdm

import test_batch
from roman_tweakreg import TweakRegStep
from roman_tweakreg.batch import MANIFEST_NAME, align_associations
from roman_tweakreg.detection import catalog_filename
from roman_tweakreg.testing.pixels import write_pixel_association
from test_batch import assert_same_outputs

client = test_batch.client  # the LocalCluster of 2 worker processes, one for this module

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    """2 exposures x 2 detectors of 256 x 256 pixels; the first image has its own catalog."""
    root = tmp_path_factory.mktemp("pixels")
    return write_pixel_association(root / "px", shape=(256, 256), keep_catalog=1)


def _names(asn):
    return [m["expname"] for m in json.loads(asn.read_text())["products"][0]["members"]]


def _tasks(stream, prefix):
    return [t for t in stream.data if t["key"].startswith(prefix)]


def _start(task):
    return min(s["start"] for s in task["startstops"] if s["action"] == "compute")


def _stop(task):
    return max(s["stop"] for s in task["startstops"] if s["action"] == "compute")


def test_each_image_without_catalog_is_a_task_and_results_equal_the_step_alone(
    pixels, client, tmp_path
):
    out = tmp_path / "out"
    gaia = str(pixels.parent / "gaia.ecsv")
    with distributed.get_task_stream(client) as stream:
        table = align_associations([pixels], out, client=client, abs_refcat=gaia, progress=False)
    row = table[0]
    assert (row["status"], row["n_images"], row["n_complete"]) == ("COMPLETE", 4, 4)
    assert row["abs_nmatches"] >= 60
    assert 0 < row["abs_rms"] < 5.0  # mas
    # three detection tasks (the image with a catalog has none), submitted by the
    # association's task (which plans) and done before it ends, spread over both workers
    detect = _tasks(stream, "detect-px-")
    (align,) = _tasks(stream, "tweakreg-px-")
    assert len(detect) == 3
    assert _start(align) <= min(_start(t) for t in detect)
    assert max(_stop(t) for t in detect) <= _stop(align)
    assert len({t["worker"] for t in detect}) == 2
    assert 0 < row["detect_seconds"] < 30
    folder = out / "px"
    names = _names(pixels)
    detected = [catalog_filename(n, folder, "ascii.ecsv") for n in names[1:]]
    assert all(c.is_file() for c in detected)
    assert not catalog_filename(names[0], folder, "ascii.ecsv").exists()
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    listed = {o["name"] for o in manifest["outputs"]}
    assert {c.name for c in detected} <= listed
    assert not (folder / "batch_catfile.txt").exists()  # the step is given the plan itself
    # the step alone on the association: the same catalogs and WCSs (1e-6 mas)
    alone = tmp_path / "alone"
    TweakRegStep.call(
        str(pixels), abs_refcat=gaia, output_dir=str(alone), catalog_path=str(alone),
        save_results=True, processes=1,
    )  # fmt: skip
    for name in names[1:]:
        ours = Table.read(catalog_filename(name, folder, "ascii.ecsv"))
        theirs = Table.read(catalog_filename(name, alone, "ascii.ecsv"))
        assert len(ours) >= 60
        np.testing.assert_array_equal(ours["x"], theirs["x"])
        np.testing.assert_array_equal(ours["y"], theirs["y"])
    for b, a in assert_same_outputs(folder, alone):
        with rdm.open(b) as mb, rdm.open(a) as ma:
            used_b, used_a = mb.meta.get("tweakreg_catalog"), ma.meta.get("tweakreg_catalog")
            fit_b, fit_a = mb.meta.wcs_fit_results, ma.meta.wcs_fit_results
            assert mb.meta.cal_step.tweakreg == ma.meta.cal_step.tweakreg == "COMPLETE"
        if used_a is None:  # the image's own catalog: not assigned, as alone
            assert used_b is None
        else:
            assert used_b == str(folder / used_a.rsplit("/", 1)[1])
        for phase in ("relative", "absolute"):  # the same fits: matches and shifts (mas)
            ours, theirs = dict(fit_b.get(phase) or {}), dict(fit_a.get(phase) or {})
            assert ours.get("status") == theirs.get("status")
            assert ours.get("nmatches") == theirs.get("nmatches")
            if "shift" in theirs:
                shift = 1000.0 * (np.asarray(ours["shift"]) - np.asarray(theirs["shift"]))
                assert np.all(np.abs(shift) < 1e-6)
    # resumed: done, nothing detected again
    with distributed.get_task_stream(client) as stream:
        again = align_associations(
            [pixels], out, client=client, resume=True, abs_refcat=gaia, progress=False
        )
    assert list(again["status"]) == ["SKIPPED"]
    assert not _tasks(stream, "detect-")


def test_a_failed_detection_fails_its_association_naming_the_file(pixels, client, tmp_path):
    broken_dir = tmp_path / "broken"
    shutil.copytree(pixels.parent, broken_dir)
    (broken_dir / pixels.name).rename(broken_dir / "broken.json")
    bad = broken_dir / _names(pixels)[2]
    (tmp_path / "new").mkdir()
    with rdm.open(bad) as model:  # an err array of another shape: detection cannot use it
        model.err = np.ones((128, 128), model.err.dtype)
        model.save(tmp_path / "new" / bad.name)
    (tmp_path / "new" / bad.name).replace(bad)
    # the step alone fails on it (not a bad-input error: the batch retries it)
    with pytest.raises(ValueError, match=r"err shape \(128, 128\) differs from data shape"):
        TweakRegStep.call(
            str(broken_dir / "broken.json"), abs_refcat=str(pixels.parent / "gaia.ecsv"),
            catalog_path=str(tmp_path / "alone"), processes=1,
        )  # fmt: skip
    out = tmp_path / "out"
    with distributed.get_task_stream(client) as stream:
        table = align_associations(
            [pixels, broken_dir / "broken.json"], out, client=client, retries=1,
            abs_refcat=str(pixels.parent / "gaia.ecsv"), progress=False,
        )  # fmt: skip
    assert list(table["status"]) == ["COMPLETE", "FAILED"]
    assert table["n_complete"][0] == 4
    error = table["error"][1]
    assert error.startswith(f"detection of {bad} failed: ValueError: err shape (128, 128)")
    assert not (out / "broken" / MANIFEST_NAME).exists()
    # its three detections ran; the step never did (no output), its task not retried
    assert len({t["key"] for t in _tasks(stream, "detect-broken-")}) == 3
    assert not list((out / "broken").glob("*_tweakregstep.asdf"))
    assert len(_tasks(stream, "tweakreg-broken-")) == 1
    assert len(_tasks(stream, "tweakreg-px-")) == 1


def _plan(pixels, folder, pars):
    from roman_tweakreg.batch import AssociationJob, plan_association

    return plan_association(AssociationJob("px", str(pixels), str(folder), pars, "x")).plan


def test_plan_follows_the_steps_catalog_choice_with_a_users_catfile(pixels, tmp_path):
    from roman_tweakreg.batch import RESERVED

    names = _names(pixels)
    own = pixels.parent / (names[0].removesuffix("_cal.asdf") + "_own.ecsv")
    catfile = tmp_path / "cats.txt"  # image 0: its catalog by a relative name; image 1: none
    shutil.copy(own, tmp_path / own.name)
    catfile.write_text(f"{names[0]} {own.name}\n{names[1]}\n")
    pars = TweakRegStep(use_custom_catalogs=True, catfile=str(catfile)).get_pars()
    pars = {k: v for k, v in pars.items() if k not in RESERVED}
    folder = tmp_path / "out"
    plan = _plan(pixels, folder, pars)
    detected = [catalog_filename(n, folder, "ascii.ecsv") for n in names[1:]]
    assert [j.image_file for j in plan.detections] == [str(pixels.parent / n) for n in names[1:]]
    assert [j.catalog_file for j in plan.detections] == detected
    # image 0 reads the catalog its catfile line names; the others what detection writes
    assert [p.image.name for p in plan.images] == names
    assert plan.images[0].detection is None
    assert plan.images[0].source.resolve() == tmp_path / own.name
    assert [p.image.catalog_name for p in plan.images] == [
        str(tmp_path / own.name), *map(str, detected)
    ]
    assert not any(c.exists() for c in detected)  # planning writes nothing
    # without use_custom_catalogs, image 0's own catalog (meta) is used: not assigned
    pars["use_custom_catalogs"] = False
    plan = _plan(pixels, folder, pars)
    assert [j.image for j in plan.detections] == names[1:]
    assert plan.images[0].source.origin.startswith("meta.")
    assert plan.images[0].image.catalog_name == ""
    # every image with a catalog: nothing to detect
    catfile.write_text("".join(f"{n} {tmp_path / own.name}\n" for n in names))
    pars["use_custom_catalogs"] = True
    plan = _plan(pixels, folder, pars)
    assert plan.detections == ()
    assert {p.source.resolve() for p in plan.images} == {tmp_path / own.name}


def test_plan_detects_with_the_steps_epsf(pixels, tmp_path):
    from roman_tweakreg.batch import _step_parameters
    from roman_tweakreg.testing.epsf import write_epsf_file

    epsf = write_epsf_file(tmp_path / "epsf.asdf", (256, 256), detector="WFI01")
    folder = tmp_path / "out"
    for given, used in (
        ({"override_epsf": str(epsf)}, str(epsf)),
        ({"psf_model": str(tmp_path)}, str(tmp_path)),
        ({}, None),
    ):
        pars = _step_parameters(given)  # as align_associations makes them
        jobs = _plan(pixels, folder, pars).detections
        assert len(jobs) == 3
        assert {j.params.psf_model for j in jobs} == {used}
        assert [j.detector for j in jobs] == ["WFI02", "WFI01", "WFI02"]
        assert {j.optical_element for j in jobs} == {"F062"}  # the simulated files


def test_the_batch_opens_each_association_once(pixels, tmp_path, monkeypatch):
    """Planning, detection and alignment of an association open it once: the step reads
    the catalogs as its task planned them (counted in a cluster of this process, whose
    tasks see the counting ``open_library``).  With one thread, an association's task
    waiting for its detections leaves the thread to them, not to another association:
    the last association starts after the first one's detections are done."""
    from roman_tweakreg import library, step

    asns = [pixels]
    for name in ("px2", "px3"):
        asns.append(pixels.parent / f"{name}.json")
        shutil.copy(pixels, asns[-1])
    opened = []
    original = library.open_library

    def counting(init, **kwargs):
        if not isinstance(init, library.AbstractModelLibrary):
            opened.append(str(init))
        return original(init, **kwargs)

    monkeypatch.setattr(library, "open_library", counting)
    monkeypatch.setattr(step, "open_library", counting)
    gaia = str(pixels.parent / "gaia.ecsv")
    with (
        distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                 dashboard_address=":0") as cluster,
        distributed.Client(cluster) as local,
        distributed.get_task_stream(local) as stream,
    ):  # fmt: skip
        table = align_associations(asns, tmp_path / "out", client=local, abs_refcat=gaia,
                                   progress=False)  # fmt: skip
    assert list(table["status"]) == ["COMPLETE"] * 3
    assert list(table["n_complete"]) == [4] * 3
    assert sorted(opened) == sorted(map(str, asns))
    names = [a.stem for a in asns]
    assert [len(_tasks(stream, f"detect-{n}-")) for n in names] == [3, 3, 3]
    starts = sorted((_start(t), t["key"].split("-")[1]) for t in _tasks(stream, "tweakreg-"))
    first, last = starts[0][1], starts[-1][1]
    assert max(_stop(t) for t in _tasks(stream, f"detect-{first}-")) <= starts[-1][0]
    assert first != last
