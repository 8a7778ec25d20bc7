"""Saving outputs in worker processes (``roman_tweakreg.outputs``) and the step's own timings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from roman_datamodels import datamodels as rdm

from conftest import make_data, refcat_at
from roman_tweakreg import OutputError, TweakRegStep
from roman_tweakreg.testing import simulate

OUTPUT = "r0000101001001001001_0001_{}_cal_{}.asdf"
DETECTORS = ("WFI01", "WFI02", "WFI10")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One exposure of three detectors on disk and a reference catalog at its epoch."""
    folder = tmp_path_factory.mktemp("data")
    exposures, stars = make_data(1, detectors=DETECTORS, max_sources=200)
    asn = simulate.write_dataset(exposures, stars[:3000], folder)
    refcat_at(stars, exposures[0].epoch).write(folder / "ref.ecsv")
    return asn, folder / "ref.ecsv", exposures


def _run(dataset, out, **kw):
    asn, ref, _ = dataset
    step = TweakRegStep(abs_refcat=str(ref), output_dir=str(out), save_results=True,
                        report="r.json", **kw)
    result = step.run(str(asn))
    return step, result


def _wcs_of(path):
    with rdm.open(path) as model:
        return model.meta.wcs


def test_outputs_written_by_workers_equal_those_written_here(dataset, tmp_path):
    _run(dataset, tmp_path / "here", processes=1)
    _run(dataset, tmp_path / "forked", processes=3)
    names = sorted(OUTPUT.format(d.lower(), kind) for d in DETECTORS
                   for kind in ("tweakregstep", "wcs"))
    for folder in ("here", "forked"):
        assert sorted(p.name for p in (tmp_path / folder).glob("*.asdf")) == names
        assert not [p for p in (tmp_path / folder).iterdir() if p.name.startswith(".")]
    truths = dataset[2][0].true_wcs
    for det, truth in zip(DETECTORS, truths, strict=True):
        name = OUTPUT.format(det.lower(), "tweakregstep")
        a, b = _wcs_of(tmp_path / "here" / name), _wcs_of(tmp_path / "forked" / name)
        assert simulate.wcs_difference_mas(a, b) < 1e-9
        assert simulate.wcs_difference_mas(b, truth) < 1.0
        with rdm.open(tmp_path / "forked" / OUTPUT.format(det.lower(), "wcs")) as product:
            assert isinstance(product, rdm.WfiWcsModel)
            assert simulate.wcs_difference_mas(product.wcs_l2, b) < 1e-9
    report = json.loads((tmp_path / "forked" / "r.json").read_text())
    assert report["outputs"]["written"] == 3
    assert report["outputs"]["complete"] is True


def test_the_step_records_its_phase_timings_with_the_save(dataset, tmp_path):
    step, _ = _run(dataset, tmp_path, processes=2)
    timings = step.timings
    assert set(timings) == {"catalogs", "absolute", "update", "save", "total"}  # one group
    assert all(v > 0 for v in timings.values())
    assert timings["total"] >= sum(v for k, v in timings.items() if k != "total") - 1e-6
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["timings"] == pytest.approx(timings)


@pytest.fixture(params=["plain", "idle thread"])
def process_kind(request):
    """A plain process, or one with an idle thread running meanwhile."""
    import threading

    if request.param == "plain":
        yield request.param
        return
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        yield request.param
    finally:
        stop.set()
        thread.join()


def test_an_output_failing_in_a_worker_is_reported_with_those_written(
    dataset, tmp_path, process_kind
):
    """A folder in the way of the second output: its error reaches the step, every
    other output is written (in a plain process and with another thread running)."""
    out = tmp_path / "out"
    blocked = out / OUTPUT.format("wfi02", "tweakregstep")
    blocked.mkdir(parents=True)
    with pytest.raises(OutputError, match=(
        r"wfi02_cal_tweakregstep\.asdf: output not written: IsADirectoryError.*; 2 of 3 "
        r"outputs \(each a model with its _wcs\.asdf product\) were written "
        r"\(.*wfi01_cal_tweakregstep\.asdf, .*wfi10_cal_tweakregstep"
        r"\.asdf\); the others do not exist")):
        _run(dataset, out, processes=2)
    assert sorted(p.name for p in out.glob("*.asdf")) == sorted(
        [blocked.name] + [OUTPUT.format(d, k) for d in ("wfi01", "wfi10")
                          for k in ("tweakregstep", "wcs")])
    assert not any(blocked.iterdir())
    report = json.loads((out / "r.json").read_text())
    assert report["outputs"]["written"] == 2
    assert [i["output"] is not None for i in report["images"]] == [True, False, True]
    assert np.isfinite(report["timings"]["save"])


def test_a_product_that_cannot_be_written_counts_its_pair_as_not_written(dataset, tmp_path):
    """A folder in the way of the second image's _wcs.asdf product: that image's model is
    not written either (a model never exists without its product), every other output is
    still attempted (as in workers), and the error and the report count pairs: 2 of 3."""
    out = tmp_path / "out"
    blocked = out / OUTPUT.format("wfi02", "wcs")
    blocked.mkdir(parents=True)
    with pytest.raises(OutputError, match=(
        r"wfi02_cal_wcs\.asdf: output not written: IsADirectoryError.*; 2 of 3 outputs \(each "
        r"a model with its _wcs\.asdf product\) were written \(.*wfi01_cal_tweakregstep\.asdf, "
        r".*wfi10_cal_tweakregstep\.asdf\); the others do not exist")):
        _run(dataset, out, processes=1)
    assert sorted(p.name for p in out.glob("*.asdf")) == sorted(
        [blocked.name] + [OUTPUT.format(d, k) for d in ("wfi01", "wfi10")
                          for k in ("tweakregstep", "wcs")])  # fmt: skip
    report = json.loads((out / "r.json").read_text())
    assert report["outputs"]["written"] == 2
    assert [i["output"] is not None for i in report["images"]] == [True, False, True]


def _yaml_tree(path) -> list[str]:
    """The YAML of an ASDF file, without the lines that differ between two writes."""
    text = path.read_bytes().split(b"\n...\n")[0].decode()
    skip = ("file_date", "date:", "- !core/extension_metadata", "history")
    return [line for line in text.splitlines() if not any(s in line for s in skip)]


def test_the_wcs_product_is_roman_datamodels_own(dataset, tmp_path):
    """``wcs_product`` writes the file ``WfiWcsModel.from_model_with_wcs`` writes, without
    copying the Level 2 WCS, and leaves the model as it was."""
    from roman_tweakreg.outputs import L1_BORDER, save_model, wcs_product

    _, result = _run(dataset, tmp_path / "out", processes=1)
    with result:
        model = result.borrow(0)
        before = model.meta.wcs(100.0, 200.0)
        name, date = model.meta.filename, model.meta.file_date
        ours, theirs = wcs_product(model), rdm.WfiWcsModel.from_model_with_wcs(model)
        assert ours.wcs_l2 is model.meta.wcs
        assert ours.wcs_l1 is not model.meta.wcs
        for folder, product in (("ours", ours), ("theirs", theirs)):
            (tmp_path / folder).mkdir()
            save_model(product, tmp_path / folder / "p_wcs.asdf")
        assert model.meta.wcs(100.0, 200.0) == before
        assert (model.meta.filename, model.meta.file_date) == (name, date)  # not the product's
        assert len(model.meta.wcs.pipeline) == len(theirs.wcs_l2.pipeline)
        result.shelve(model, 0, modify=False)
    a, b = (_yaml_tree(tmp_path / folder / "p_wcs.asdf") for folder in ("ours", "theirs"))
    assert len(a) > 500
    assert a == b  # the same YAML, anchors included: no more objects shared than theirs
    with rdm.open(tmp_path / "ours" / "p_wcs.asdf") as product:
        x, y = 10.0, 20.0
        sky_l1 = product.wcs_l1(x + L1_BORDER, y + L1_BORDER)
        np.testing.assert_allclose(sky_l1, product.wcs_l2(x, y), rtol=0, atol=1e-12)
        l1_box, l2_box = product.wcs_l1.bounding_box, product.wcs_l2.bounding_box
        for (lo1, hi1), (lo2, hi2) in zip(l1_box, l2_box, strict=True):
            assert (lo1, hi1 - hi2) == (lo2, 2 * L1_BORDER)
