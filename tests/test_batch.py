"""The batch: associations as tasks on a real LocalCluster of 2 worker processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
from astropy.table import Table

from conftest import truths_of
from gaia_server import FIELD, stars
from roman_tweakreg import TweakRegStep
from roman_tweakreg.batch import (
    MANIFEST_NAME,
    REFCAT_FOLDER,
    SUMMARY_COLUMNS,
    SUMMARY_NAME,
    WORKER_CONFIG,
    align_associations,
    local_cluster,
    read_inputs,
)
from roman_tweakreg.cli import main
from roman_tweakreg.errors import InvalidParameterError, MissingInputError
from roman_tweakreg.refcat import read_local_catalog
from roman_tweakreg.refcat._plan import SkyCone, is_service_name, plan_regions, sky_cone
from roman_tweakreg.testing import simulate
from test_step_refcat import field_exposures

distributed = pytest.importorskip("distributed")

DETECTORS = ("WFI01", "WFI10")
#: Pointing offsets (deg of RA) of the associations within the test service's field.
OFFSETS = {"a1": -0.06, "a2": 0.06}


def _exposures(seed: int, offset: float):
    return field_exposures(seed, offset, DETECTORS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two associations of 2 exposures x 2 detectors, a broken one, a list file, Gaia 2016."""
    root = tmp_path_factory.mktemp("batch_inputs")
    asns, truths = {}, {}
    for seed, (name, offset) in enumerate(OFFSETS.items()):
        exposures = _exposures(seed + 5, offset)
        asns[name] = simulate.write_dataset(
            exposures, stars(), root / name, asn_name=f"{name}.json"
        )
        truths[name] = truths_of(exposures)
    bad = root / "bad" / "bad.json"
    bad.parent.mkdir()
    members = [{"expname": "r0000101001001001001_0001_wfi01_cal.asdf", "exptype": "science"}]
    bad.write_text(json.dumps({"products": [{"name": "bad", "members": members}]}))
    listing = root / "associations.txt"
    listing.write_text(f"# the batch\n{asns['a1']}\n\na2/a2.json\nbad/bad.json\n")
    gaia = root / "gaia2016.ecsv"
    stars().write(gaia)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    return {
        "asns": asns,
        "truths": truths,
        "bad": bad,
        "list": listing,
        "gaia": gaia,
        "root": root,
        "before": before,
    }


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The batch's LocalCluster of 2 worker processes (1 thread each) for the whole module."""
    env = {
        "ASTROMETRIC_CATALOG_URL": "http://127.0.0.1:9",  # never the real service
        "ROMAN_TWEAKREG_CACHE": str(tmp_path_factory.mktemp("worker_cache")),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }
    with local_cluster(2, env=env) as cluster, distributed.Client(cluster) as c:
        # import the step on both workers now, not in the first timed task
        c.run(lambda: __import__("roman_tweakreg.batch") and None)
        yield c


def wcs_of(path):
    from roman_datamodels import datamodels as rdm

    with rdm.open(path) as model:
        return model.meta.wcs, str(model.meta.cal_step.tweakreg)


def outputs(folder):
    return sorted(folder.glob("*_tweakregstep.asdf"))


def assert_same_outputs(batch_folder, alone_folder, n: int = 4) -> list:
    """The batch's outputs are the step alone's: same names, COMPLETE, WCS to 1e-6 mas."""
    batch_files, alone_files = outputs(batch_folder), outputs(alone_folder)
    assert [p.name for p in batch_files] == [p.name for p in alone_files]
    assert len(batch_files) == n
    for b, a in zip(batch_files, alone_files, strict=True):
        (wb, sb), (wa, sa) = wcs_of(b), wcs_of(a)
        assert sb == sa == "COMPLETE"
        assert simulate.wcs_difference_mas(wb, wa) < 1e-6
    return list(zip(batch_files, alone_files, strict=True))


@pytest.fixture(scope="module")
def first_batch(data, client, tmp_path_factory):
    """The batch over the list file (a1, a2, bad) with a local Gaia file: folder and table."""
    out = tmp_path_factory.mktemp("batch") / "out"
    table = align_associations(
        [data["list"]], out, client=client, abs_refcat=str(data["gaia"]), progress=False
    )
    return out, table


def test_batch_equals_the_step_alone_and_a_bad_association_fails(
    data, client, first_batch, tmp_path
):
    out, table = first_batch
    assert list(table["association"]) == ["a1", "a2", "bad"]
    assert list(table["status"]) == ["COMPLETE", "COMPLETE", "FAILED"]
    assert list(table["n_images"]) == [4, 4, 1]  # the failed one: the images it lists
    assert list(table["n_complete"]) == [4, 4, 0]
    for name, decimals in (("abs_rms", 3), ("seconds", 2)):  # rounded, as documented
        assert np.all(table[name][:2] == np.round(table[name][:2], decimals)), name
    assert np.all(table["abs_nmatches"][:2] >= 15)
    assert np.all((table["abs_rms"][:2] > 0) & (table["abs_rms"][:2] < 10.0))  # mas
    assert "MissingInputError" in table["error"][2]
    assert "r0000101001001001001_0001_wfi01_cal.asdf" in table["error"][2]
    assert "does not exist" in table["error"][2]
    assert np.all(table["seconds"][:2] > 0)
    assert all(w.startswith("tcp://127.0.0.1:") for w in table["worker"][:2])
    # the summary on disk is the table returned, with its columns described
    on_disk = Table.read(out / SUMMARY_NAME)
    assert list(on_disk["status"]) == list(table["status"])
    assert on_disk.colnames == [c[0] for c in SUMMARY_COLUMNS]
    assert str(on_disk["abs_rms"].unit) == "mas"
    # nothing written next to the inputs
    now = {p: p.stat().st_mtime_ns for p in data["root"].rglob("*")}
    assert now == data["before"]
    for name in OFFSETS:
        for path, truth in zip(outputs(out / name), data["truths"][name], strict=True):
            wcs, status = wcs_of(path)
            assert status == "COMPLETE"
            assert simulate.wcs_difference_mas(wcs, truth) < 1.0
        manifest = json.loads((out / name / MANIFEST_NAME).read_text())
        listed = {o["name"] for o in manifest["outputs"]}
        assert {p.name for p in outputs(out / name)} | {  # the step's outputs and WCS products
            p.name for p in (out / name).glob("*_wcs.asdf")
        } <= listed
        assert manifest["summary"]["status"] == "COMPLETE"
    # the result equals the step run on the association alone, to 1e-6 mas
    for name in ["a1"]:
        alone = tmp_path / f"alone_{name}"
        TweakRegStep.call(
            str(data["asns"][name]),
            abs_refcat=str(data["gaia"]),
            output_dir=str(alone),
            save_results=True,
            processes=1,
        )
        assert_same_outputs(out / name, alone)


def test_resume_skips_what_is_done_and_redoes_the_rest(data, client, first_batch, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_batch[0], out)
    first = first_batch[1]
    pars = {"abs_refcat": str(data["gaia"]), "progress": False, "client": client}
    stamps = {p: p.stat().st_mtime_ns for p in (out / "a1").iterdir()}
    # an output of a2 damaged after the fact (same size): a2 is redone, a1 skipped
    damaged = outputs(out / "a2")[0]
    blob = bytearray(damaged.read_bytes())
    blob[-10] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    again = align_associations([data["list"]], out, resume=True, **pars)
    assert list(again["status"]) == ["SKIPPED", "COMPLETE", "FAILED"]
    assert again["n_complete"][0] == 4  # the skipped row keeps what was done
    assert again["abs_rms"][0] == pytest.approx(first["abs_rms"][0])
    assert again["abs_nmatches"][0] == first["abs_nmatches"][0]
    # ... and the run that did it: its status, time and worker
    assert again["done_status"][0] == "COMPLETE"
    assert again["seconds"][0] == pytest.approx(first["seconds"][0], abs=0.2)
    assert again["worker"][0] == first["worker"][0]
    assert {p: p.stat().st_mtime_ns for p in (out / "a1").iterdir()} == stamps
    assert list(Table.read(out / SUMMARY_NAME)["status"]) == list(again["status"])
    # other parameters: redone
    changed = align_associations([data["asns"]["a1"]], out, resume=True, abs_nclip=2, **pars)
    assert list(changed["status"]) == ["COMPLETE"]
    assert {p: p.stat().st_mtime_ns for p in (out / "a1").iterdir()} != stamps


def test_resume_with_nothing_to_do_starts_no_cluster_and_keeps_the_rows(
    data, first_batch, tmp_path, monkeypatch
):
    import roman_tweakreg.batch as batch

    out = tmp_path / "out"
    shutil.copytree(first_batch[0], out)
    first = first_batch[1]

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started with nothing to do")

    monkeypatch.setattr(batch, "local_cluster", no_cluster)
    asns = [data["asns"]["a1"], data["asns"]["a2"]]
    t = time.perf_counter()
    again = align_associations(asns, out, resume=True, abs_refcat=str(data["gaia"]),
                               progress=False)  # fmt: skip
    assert time.perf_counter() - t < 10
    assert list(again["status"]) == ["SKIPPED", "SKIPPED"]
    assert list(again["done_status"]) == ["COMPLETE", "COMPLETE"]
    for column in ("n_images", "n_complete", "abs_nmatches", "worker"):
        assert list(again[column]) == list(first[column][:2]), column
    np.testing.assert_allclose(again["abs_rms"], first["abs_rms"][:2])
    np.testing.assert_allclose(again["seconds"], first["seconds"][:2], atol=0.2)
    on_disk = Table.read(out / SUMMARY_NAME)  # rewritten with the earlier figures kept
    assert list(on_disk["done_status"]) == ["COMPLETE", "COMPLETE"]
    np.testing.assert_allclose(on_disk["seconds"], first["seconds"][:2], atol=0.2)


def test_regions_fetched_once_with_motions_and_a_timeout_retried(
    data, client, gaia_service, tmp_path
):
    gaia_service.faults = ["503"]  # the first region request fails; the task is retried
    out = tmp_path / "out"
    table = align_associations(
        [data["asns"]["a1"], data["asns"]["a2"]],
        out,
        client=client,
        abs_refcat="GAIADR3",
        abs_refcat_url=gaia_service.url,
        abs_refcat_retries=0,
        abs_refcat_cache="off",
        progress=False,
    )
    assert list(table["status"]) == ["COMPLETE", "COMPLETE"]
    assert gaia_service.requests == 2  # one region for both associations, one retry
    assert "EPOCH" not in gaia_service.queries[-1]  # fetched at Gaia's epoch, carried per task
    files = sorted((out / REFCAT_FOLDER).rglob("*.parquet"))
    assert [f.name for f in files] == ["GAIADR3.parquet"]
    region = read_local_catalog(files[0], FIELD[0], FIELD[1], 1.0)
    assert region.has_motions
    assert np.nanmedian(np.asarray(region.table["ref_epoch"], float)) == 2016.0
    for name in OFFSETS:
        for path, truth in zip(outputs(out / name), data["truths"][name], strict=True):
            wcs, status = wcs_of(path)
            assert status == "COMPLETE"
            assert wcs.name == "FIT-LVL2-GAIADR3.parquet"
            assert simulate.wcs_difference_mas(wcs, truth) < 1.0


def test_region_never_obtained_fails_its_associations_with_the_reason(
    data, client, gaia_service, tmp_path
):
    gaia_service.always = "503"
    table = align_associations(
        [data["asns"]["a1"]],
        tmp_path / "out",
        client=client,
        retries=1,
        abs_refcat="GAIADR3",
        abs_refcat_url=gaia_service.url,
        abs_refcat_retries=0,
        abs_refcat_cache="off",
        progress=False,
    )
    assert list(table["status"]) == ["FAILED"]
    assert gaia_service.requests == 2  # one try, one Dask retry
    assert "reference catalog of region r0000 not obtained" in table["error"][0]
    assert "503" in table["error"][0]


def test_cli_batch_with_a_running_scheduler(data, client, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(
        [
            "batch",
            str(data["asns"]["a1"]),
            str(data["bad"]),
            "--output-dir",
            str(out),
            "--scheduler",
            client.scheduler.address,
            "--par",
            f"abs_refcat={data['gaia']}",
            "--par",
            "abs_nclip=2",
        ]
    )
    printed = capsys.readouterr()
    assert status == 1  # an association failed
    assert "Dask dashboard:" in printed.out
    assert "a1: COMPLETE, 4/4 images COMPLETE" in printed.out
    assert "bad: FAILED" in printed.out
    table = Table.read(out / SUMMARY_NAME)
    assert list(table["status"]) == ["COMPLETE", "FAILED"]
    manifest = json.loads((out / "a1" / MANIFEST_NAME).read_text())
    assert manifest["parameters"]["abs_nclip"] == 2
    # a bad parameter is refused before any task
    assert (
        main(
            [
                "batch",
                str(data["asns"]["a1"]),
                "--output-dir",
                str(out),
                "--scheduler",
                client.scheduler.address,
                "--par",
                "minobj=0",
            ]
        )
        == 1
    )
    assert "minobj=0: expected an integer >= 1" in capsys.readouterr().err
    assert (
        main(["batch", str(data["asns"]["a1"]), "--output-dir", str(out), "--par", "minobj"]) == 1
    )
    assert "--par minobj: expected name=value" in capsys.readouterr().err


def test_the_batch_cluster_runs_its_workers_without_the_profiler(client):
    """Dask's statistical profiler (CPU per task, see docs/batch.rst) is off in the workers."""
    import dask

    key = "distributed.worker.profile.enabled"
    assert WORKER_CONFIG == {key: False}
    assert dask.config.get(key) is True  # Dask's default, unchanged in this process
    assert list(client.run(dask.config.get, key).values()) == [False, False]


# -- without a cluster ------------------------------------------------------------------------
def test_inputs_and_parameters_are_checked_before_any_task(data, tmp_path):
    assert read_inputs(data["list"]) == [
        data["asns"]["a1"].resolve(),
        data["asns"]["a2"].resolve(),
        data["bad"].resolve(),
    ]
    with pytest.raises(MissingInputError, match=r"nolist\.txt: association list file does not"):
        read_inputs(tmp_path / "nolist.txt")
    with pytest.raises(InvalidParameterError, match=r"have the same name 'a1'"):
        read_inputs([data["asns"]["a1"], data["list"]])
    with pytest.raises(InvalidParameterError, match=r"save_results: set by the batch"):
        align_associations(data["list"], tmp_path, save_results=False)
    with pytest.raises(InvalidParameterError, match=r"Extra value 'foo'"):
        align_associations(data["list"], tmp_path, foo=1)
    with pytest.raises(InvalidParameterError, match=r"tolerance=3.0 is larger than searchrad"):
        align_associations(data["list"], tmp_path, tolerance=3.0)
    with pytest.raises(InvalidParameterError, match=r"workers=0: expected an integer >= 1"):
        align_associations(data["list"], tmp_path, workers=0)
    assert not (tmp_path / SUMMARY_NAME).exists()


def test_sky_cone_from_headers_and_region_planning(data):
    members = json.loads(data["asns"]["a1"].read_text())["products"][0]["members"]
    cone = sky_cone(data["asns"]["a1"], [m["expname"] for m in members])
    # the simulated headers have no s_region: detector squares around the reference points
    assert cone.ra == pytest.approx(FIELD[0] + OFFSETS["a1"], abs=0.1)
    assert cone.dec == pytest.approx(FIELD[1], abs=0.1)
    assert 0.1 < cone.radius < 0.4
    cones = [
        SkyCone(10.0, 0.0, 0.3),
        SkyCone(10.5, 0.0, 0.3),
        SkyCone(12.0, 0.0, 0.3),
        None,
        SkyCone(10.2, 0.1, 0.3),
    ]
    regions = plan_regions(cones, max_radius=1.0)
    assert [r.members for r in regions] == [[0, 1, 4], [2]]
    assert regions[0].radius == pytest.approx(0.8, abs=1e-6)
    assert regions[1].radius == pytest.approx(0.3)
    # a cone larger than the largest region is a region of its own, which may hold others
    big = plan_regions([SkyCone(0, 0, 2.0), SkyCone(0, 0, 0.1), SkyCone(0, 1.5, 0.1)], 1.0)
    assert [(r.members, r.radius) for r in big] == [([0, 1], 2.0), ([2], 0.1)]
    assert is_service_name("GAIADR3")
    assert is_service_name(" gaiadr2 ")
    assert not is_service_name("GAIADR3,GAIADR2")
    assert not is_service_name(str(data["gaia"]))
    assert not is_service_name("https://example.org/gaia.ecsv")
    assert not is_service_name("missing/gaia.parquet")


def _hammer_cache(root: str, seed: int) -> list:
    """Write and read one cone entry of the catalog cache 30 times (a task)."""
    from roman_tweakreg.refcat import ConeCache

    cache = ConeCache(root)
    body = b"objID,ra,dec\n" + b"".join(b"%d,150.1,2.2\n" % i for i in range(2000))
    seen = []
    for k in range(30):
        if (k + seed) % 2:
            cache.put("http://svc", "GAIADR3", 150.1, 2.2, 0.3, None, body)
        entry = cache.get("http://svc", "GAIADR3", 150.1, 2.2, 0.2, None)
        seen.append(None if entry is None else entry.body == body)
    return seen


def test_catalog_cache_shared_by_worker_processes_writing_at_once(client, tmp_path):
    # 8 tasks on 2 worker processes rewrite and read the same entry: a reader gets either
    # nothing (not yet written) or the whole verified entry, never a partial one
    futures = client.map(_hammer_cache, [str(tmp_path)] * 8, range(8), pure=False)
    seen = [x for result in client.gather(futures) for x in result]
    assert False not in seen
    assert seen.count(True) >= 8 * 30 - 8  # only a task's first read may come before any write
    entries = list(tmp_path.rglob("*.cone"))
    assert len(entries) == 1
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp left


def test_a_killed_worker_task_is_rescheduled_and_completes(data, client, gaia_service, tmp_path):
    # no shared region (a comma list is not planned): the task asks the service itself,
    # which holds the first request for 30 s; the worker running it is killed meanwhile
    gaia_service.faults = ["slow"]
    gaia_service.delay = 30.0
    result = {}

    def run():
        result["table"] = align_associations(
            [data["asns"]["a1"]],
            tmp_path / "out",
            client=client,
            abs_refcat="GAIADR3,GAIADR2",
            abs_refcat_url=gaia_service.url,
            abs_refcat_timeout=60.0,
            abs_refcat_cache="off",
            progress=False,
        )

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while gaia_service.requests < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gaia_service.requests == 1
    busy = [w for w, keys in client.processing().items() if keys]
    assert len(busy) == 1
    pid = client.run(os.getpid, workers=busy)[busy[0]]
    os.kill(pid, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive()
    table = result["table"]
    assert list(table["status"]) == ["COMPLETE"]
    assert table["worker"][0] != busy[0]
    assert gaia_service.requests == 2  # asked again by the rescheduled task
    for path, truth in zip(outputs(tmp_path / "out" / "a1"), data["truths"]["a1"], strict=True):
        assert simulate.wcs_difference_mas(wcs_of(path)[0], truth) < 1.0
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker


def test_docs_list_the_summary_columns():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "batch.rst").read_text()
    table = text.split("The summary\n")[1].split("Faults\n")[0]
    assert re.findall(r"^   \* - ``(\w+)``", table, re.MULTILINE) == [c[0] for c in SUMMARY_COLUMNS]


def test_tasks_run_the_step_in_one_process_unless_asked():
    """The cluster owns the cores: ``processes`` is 1 in a task unless given."""
    from roman_tweakreg.batch import _step_parameters

    assert _step_parameters({})["processes"] == 1
    assert _step_parameters({"processes": 2})["processes"] == 2
    assert _step_parameters({"processes": 0})["processes"] == 0


def test_regions_are_fetched_with_vo_timeout_like_the_step(gaia_service, tmp_path):
    """``vo_timeout`` (romancal's name), when set, is the service timeout of the shared
    region fetches too, as in the step: a slow service is given up after it, not after
    ``abs_refcat_timeout``."""
    from roman_tweakreg.batch import _fetch_region, _region_options, _step_parameters
    from roman_tweakreg.errors import ReferenceCatalogError
    from roman_tweakreg.refcat._plan import Region

    pars = _step_parameters({
        "abs_refcat_timeout": 60.0, "vo_timeout": 0.5, "abs_refcat_retries": 0,
        "abs_refcat_url": gaia_service.url, "abs_refcat_cache": "off",
    })  # fmt: skip
    options = _region_options(pars)
    assert options["timeout"] == 0.5
    assert _region_options(_step_parameters({"abs_refcat_timeout": 7.0}))["timeout"] == 7.0
    gaia_service.faults = ["slow"]
    gaia_service.delay = 10.0
    region = Region("r0000", FIELD[0], FIELD[1], 0.2, [0])
    t0 = time.monotonic()
    with pytest.raises(ReferenceCatalogError, match=r"within the 0\.5 s timeout"):
        _fetch_region(region, "GAIADR3", str(tmp_path / "r.parquet"), 0.0, options)
    assert time.monotonic() - t0 < 5.0  # not the 60 s of abs_refcat_timeout
    assert not (tmp_path / "r.parquet").exists()


def test_per_image_jobs_of_an_association_run_on_the_cluster(first_batch):
    """Each association's task sends the step's per-image jobs (4 catalogs, 4 corrected
    WCSs, 4 saves) to the cluster's executor: the manifest counts where each ran, and
    some ran as tasks of a worker (its address), not in the association's own thread;
    the outputs equal the step alone's (test_batch_equals_the_step_alone...)."""
    out, table = first_batch
    assert list(table["status"][:2]) == ["COMPLETE", "COMPLETE"]
    for name in OFFSETS:
        manifest = json.loads((out / name / MANIFEST_NAME).read_text())
        jobs = manifest["run"]["per_image_jobs"]
        assert sum(jobs.values()) == 12, jobs
        on_workers = {k: v for k, v in jobs.items() if k != "here"}
        assert on_workers, jobs
        assert all(k.startswith("tcp://127.0.0.1:") for k in on_workers), jobs
        assert sum(on_workers.values()) >= 1
