"""Process faults: workers killed mid-run, the step's process killed, interrupts, litter.

Real processes are killed (``os.kill`` with SIGKILL / SIGTERM / SIGINT); nothing is mocked
but the moment of the kill.
"""

import gc
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import asdf
import numpy as np
import pytest

from conftest import child_pids, make_data, refcat_at
from roman_tweakreg import TweakRegStep, _io, align, catalogs, outputs, plane
from roman_tweakreg.errors import MissingInputError
from roman_tweakreg.library import open_library
from roman_tweakreg.testing import simulate

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux processes")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    exposures, stars = make_data()
    folder = tmp_path_factory.mktemp("faults")
    asn = simulate.write_dataset(exposures, stars, folder)
    refcat = folder / "gaia_2028.ecsv"
    refcat_at(stars, 2028.0).write(refcat, format="ascii.ecsv")
    return asn, refcat


def _run(dataset, **pars):
    asn, refcat = dataset
    return TweakRegStep.call(str(asn), abs_refcat=str(refcat), **pars)


def _outcome(library):
    """Statuses, fit results and WCSs of a returned library (its models then closed)."""
    out, models = [], []
    with library:
        for i, model in enumerate(library):
            fit = dict(model.meta.wcs_fit_results)
            out.append((model.meta.cal_step.tweakreg, fit, model.meta.wcs))
            models.append(model)
            library.shelve(model, i, modify=False)
    for model in models:
        model.close()
    return out


@pytest.fixture(scope="module")
def one_process(dataset):
    return _outcome(_run(dataset, processes=1))


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _wait_dead(pids, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(_dead(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


KILLED: list[int] = []


def _wait_for_workers(timeout: float = 10.0) -> list[int]:
    """The pids of this process's worker processes, once there are (``timeout`` s at
    most), and a moment for them to take their first job (the pool is made when the fork
    server is up, a new server importing the package first)."""
    pids = _worker_pids(timeout)
    time.sleep(0.3)
    return pids


def _worker_pids(timeout: float) -> list[int]:
    """The pids of this process's worker processes, once there are (``timeout`` s at
    most; [] when none came)."""
    deadline = time.monotonic() + timeout
    while not (
        pids := [
            p.pid for p in multiprocessing.active_children() if p.name != "roman_tweakreg-probe"
        ]  # the probe that waits for the fork server is no worker
    ):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return pids


def _kill_workers():
    """SIGKILL every worker process of this one; wait until they are dead.

    Workers start in the background while the first jobs run here: wait (10 s at most)
    for them to be up, so that there is a worker to kill.
    """
    pids = _worker_pids(10.0)
    assert pids, "no worker to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert _wait_dead(pids)
    KILLED.extend(pids)


def _in_a_worker() -> bool:
    """Whether this runs in a worker process (which imports this module anew)."""
    return multiprocessing.parent_process() is not None


def _sky_part_killing_its_worker(ref, sky, wcsinfo, matrix, shift):
    if _in_a_worker():
        os.kill(os.getpid(), signal.SIGKILL)
    return _ORIGINAL["corrected_sky_part"](ref, sky, wcsinfo, matrix, shift)


def _read_killing_its_worker(ref, *args):
    if _in_a_worker():
        os.kill(os.getpid(), signal.SIGKILL)
    return _ORIGINAL["read_and_project"](ref, *args)


_ORIGINAL = {
    "corrected_sky_part": plane.corrected_sky_part,
    "read_and_project": catalogs.read_and_project,
}


def _kill_at(point, monkeypatch):
    if point == "catalogs":  # after two images were handed out, jobs in flight
        plan_catalogs = catalogs.plan_catalogs

        def killing_plan(*args, on_planned, **kwargs):
            handed = []

            def hand_out(planned):
                on_planned(planned)  # its reading goes to the workers
                handed.append(planned)
                if len(handed) == 2:
                    _kill_workers()

            return plan_catalogs(*args, on_planned=hand_out, **kwargs)

        monkeypatch.setattr(catalogs, "plan_catalogs", killing_plan)
    elif point == "catalogs, every worker":  # each worker dies in its first job
        monkeypatch.setattr(catalogs, "read_and_project", _read_killing_its_worker)
        plan_catalogs = catalogs.plan_catalogs

        def plan_once_workers_are_up(*args, on_planned, **kwargs):
            handed = []

            def hand_out(planned):
                if len(handed) == 1:  # the catalogs' pool exists from the first image on
                    _wait_for_workers()
                on_planned(planned)
                handed.append(planned)

            return plan_catalogs(*args, on_planned=hand_out, **kwargs)

        monkeypatch.setattr(catalogs, "plan_catalogs", plan_once_workers_are_up)
    elif point == "between phases":
        prepare = TweakRegStep._prepare

        def prepare_then_kill(self, *args):
            out = prepare(self, *args)
            _kill_workers()
            return out

        monkeypatch.setattr(TweakRegStep, "_prepare", prepare_then_kill)
    elif point in ("relative", "absolute"):
        name = f"{point}_align"
        original = getattr(align, name)

        def kill_then_align(*args, **kwargs):
            if not KILLED:
                _kill_workers()
            return original(*args, **kwargs)

        monkeypatch.setattr(align, name, kill_then_align)
    elif point == "update":  # the worker dies while building its share of the WCSs
        monkeypatch.setattr(plane, "corrected_sky_part", _sky_part_killing_its_worker)


@pytest.mark.parametrize(
    "point",
    ["catalogs", "catalogs, every worker", "relative", "between phases", "update"],
)
def test_a_killed_worker_loses_nothing(dataset, one_process, point, monkeypatch, caplog):
    """A worker SIGKILLed at any point of the run: same statuses, fits and WCSs as
    processes=1 (to 1e-6 mas), no BrokenProcessPool, the death logged."""
    from roman_tweakreg._parallel import usable_cores

    if usable_cores() < 2:  # processes is capped at the usable cores: no worker to kill
        pytest.skip("needs 2 usable cores")
    workers = min(3, usable_cores()) - 1  # processes=3 is capped at the usable cores
    KILLED.clear()
    _kill_at(point, monkeypatch)
    caplog.set_level(logging.WARNING, logger="roman_tweakreg")
    killed = _outcome(_run(dataset, processes=3))
    assert "A worker process stopped" in caplog.text
    if point == "catalogs, every worker":
        # the first death starts a new pool; whether one of its workers takes a job (and
        # dies too: then all run here) before the phase ends depends on when it is up,
        # as jobs run here until workers are
        handled = ("new worker(s) started", "its jobs and all others run here")
        assert any(words in caplog.text for words in handled), caplog.text
    elif point == "update":  # the worker killed itself in its job
        assert f"its jobs are done again and {workers} new worker(s) started" in caplog.text
    else:
        assert KILLED
    assert [o[0] for o in one_process] == [o[0] for o in killed] == ["COMPLETE"] * 6
    for (_, fit1, wcs1), (_, fit2, wcs2) in zip(one_process, killed, strict=True):
        assert fit1["nmatches"] == fit2["nmatches"]
        assert fit1["shift"] == fit2["shift"]
        assert simulate.wcs_difference_mas(wcs1, wcs2) < 1e-6
    assert not multiprocessing.active_children()  # every worker ended with the step


_STEP_FOREVER = """
import sys
import roman_tweakreg._parallel as parallel
from roman_tweakreg import TweakRegStep
if sys.argv[3] == "pipe-only":
    parallel.ctypes = None  # no PR_SET_PDEATHSIG: only the pipe watch remains
print("started", flush=True)
while True:
    TweakRegStep.call(sys.argv[1], abs_refcat=sys.argv[2], processes=2)
"""


@pytest.mark.parametrize(
    ("signum", "watch"),
    [(signal.SIGKILL, "all"), (signal.SIGTERM, "pipe-only")],
)
def test_workers_end_with_the_step_s_process(dataset, signum, watch):
    """The step's process killed while its worker lives: within seconds no worker
    (and no fork server) is left and a reader of the process's stdout/stderr pipes
    gets EOF."""
    asn, refcat = dataset
    proc = subprocess.Popen(
        [sys.executable, "-c", _STEP_FOREVER, str(asn), str(refcat), watch],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline() == b"started\n"
        # the fork server (a child) and a worker forked by it (a grandchild)
        end, children, workers = time.monotonic() + 60, [], []
        while not workers and time.monotonic() < end:
            children = child_pids(proc.pid)
            workers = [w for c in children for w in child_pids(c)]
            time.sleep(0.01)
        assert workers, "the step never started a worker"
        children += workers
        os.kill(proc.pid, signum)
        t0 = time.monotonic()
        proc.communicate(timeout=10)  # EOF on both pipes: no worker holds them
        assert _wait_dead(children, timeout=5)
        assert time.monotonic() - t0 < 5
        assert proc.returncode == -signum
    finally:
        proc.kill()
        for pid in child_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)


def _state():
    """Process-global state a step call might leave changed."""
    loggers = {
        name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled)
        for name, lg in logging.root.manager.loggerDict.items()
        if name.startswith("roman_tweakreg") and isinstance(lg, logging.Logger)
    }
    return {
        "gc": (gc.isenabled(), gc.get_threshold()),
        "asdf": repr(asdf.get_config()),  # every setting
        "loggers": loggers,
        "root": (logging.root.level, list(logging.root.handlers)),
        "signals": (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)),
        "children": multiprocessing.active_children(),
    }


def _assert_same(before, after):
    loggers = after.pop("loggers")
    new = {k: v for k, v in loggers.items() if k not in before["loggers"]}
    assert all(v == (logging.NOTSET, [], True, False) for v in new.values()), new  # untouched
    after["loggers"] = {k: v for k, v in loggers.items() if k in before["loggers"]}
    assert after == before


@pytest.mark.parametrize("frozen_before", [False, True])
def test_no_process_state_left_changed(dataset, tmp_path, frozen_before, monkeypatch):
    """gc freeze, asdf settings, the package's loggers and signal handlers are as they
    were after a call, also after an error; the step never freezes or unfreezes the
    garbage collector's objects, whether objects were frozen before the call or not."""
    ours = frozen_before and gc.get_freeze_count() == 0
    if ours:
        gc.freeze()
    calls = []

    def spy(name):
        real = getattr(gc, name)
        return lambda: (calls.append(name), real())

    for name in ("freeze", "unfreeze"):
        monkeypatch.setattr(gc, name, spy(name))
    try:
        count = gc.get_freeze_count()
        before = _state()
        _run(dataset, processes=2)
        _assert_same(before, _state())
        (tmp_path / "asn.json").write_text(
            '{"products": [{"members": [{"expname": "gone_cal.asdf"}]}]}'
        )
        with pytest.raises(MissingInputError, match=r"gone_cal\.asdf"):
            _run((tmp_path / "asn.json", dataset[1]), processes=2)
        _assert_same(before, _state())
        assert calls == []
        if count:  # frozen objects may be freed meanwhile, never unfrozen
            assert gc.get_freeze_count() > 0
        else:
            assert gc.get_freeze_count() == 0
    finally:
        monkeypatch.undo()
        if ours:
            gc.unfreeze()


# -- temporaries ------------------------------------------------------------------


def _leave_temporaries(folder: Path, out: Path) -> int:
    """Run a process that makes the package's temporaries and is SIGKILLed meanwhile."""
    code = textwrap.dedent(
        f"""
        import os, signal, tempfile
        from pathlib import Path
        from roman_tweakreg._io import write_atomically
        from roman_tweakreg.library import open_library
        lib = open_library({str(out)!r}, on_disk=True)
        print(lib.temp_directory, flush=True)
        def write(p):
            p.write_text("partial")
            os.kill(os.getpid(), signal.SIGKILL)
        write_atomically(Path({str(folder)!r}) / "result.txt", write)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc.stdout.strip()


def test_stale_temporaries_of_killed_runs_are_removed(dataset, tmp_path, caplog):
    """A run SIGKILLed while writing leaves its hidden temporary folder (named after
    its host and pid) and its on_disk model folder (under the system temporary
    folder, not the current one); the next run removes both at once (their owner no
    longer runs: no grace period), and leaves those of running processes and other
    hosts alone."""
    caplog.set_level(logging.INFO, logger="roman_tweakreg")
    asn, _ = dataset
    cwd_before = set(os.listdir())
    models_dir = Path(_leave_temporaries(tmp_path, asn))
    assert set(os.listdir()) == cwd_before  # nothing in the current folder
    assert models_dir.parent == Path(tempfile.gettempdir())
    assert _io.TEMP_TAG in models_dir.name
    assert models_dir.is_dir()
    left = [p for p in tmp_path.iterdir() if _io.TEMP_TAG in p.name]
    assert len(left) == 1
    assert left[0].name.startswith(".result.txt.")
    assert (left[0] / "result.txt").read_text() == "partial"
    assert not (tmp_path / "result.txt").exists()

    alive = tmp_path / f".x{_io.temp_prefix()}abc"  # this process: running
    alive.mkdir()
    other = tmp_path / f".y.{_io.TEMP_TAG}.otherhost.1.abc"
    other.mkdir()
    t = time.monotonic()
    assert _io.remove_stale_temporaries(tmp_path, once=False) == left  # at once
    assert time.monotonic() - t < 1
    assert alive.exists()
    assert other.exists()
    assert "of host otherhost left in place" in caplog.text
    assert models_dir in _io.remove_stale_temporaries(tempfile.gettempdir(), once=False)
    assert not models_dir.exists()


def test_on_disk_library_folder_removed_with_the_library(dataset):
    library = open_library(str(dataset[0]), on_disk=True)
    folder = Path(library.temp_directory)
    assert folder.parent == Path(tempfile.gettempdir())
    assert _io.TEMP_TAG in folder.name
    assert f".{os.getpid()}." in folder.name
    with library:
        model = library.borrow(0)
        library.shelve(model, 0)
    assert any(folder.iterdir())
    del library, model
    gc.collect()
    assert not folder.exists()


def test_temporaries_removed_after_errors_and_interrupts(tmp_path):
    for exc in (OSError("disk full"), KeyboardInterrupt()):

        def write(p, exc=exc):
            p.write_text("x")
            raise exc

        with pytest.raises(type(exc)):
            _io.write_atomically(tmp_path / "out.txt", write)
        assert list(tmp_path.iterdir()) == []


# -- interrupts ---------------------------------------------------------------------


def test_cli_sigterm_raises_an_interrupt_meanwhile_only():
    from roman_tweakreg.cli import _terminate_as_interrupt

    def terminated():
        with _terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted at once

    previous = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        terminated()
    assert time.monotonic() - t0 < 4
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_interrupt_one_line_cleanup_and_status(tmp_path, signum):
    """``roman-tweakreg example`` interrupted (Ctrl-C) or stopped (SIGTERM, as batch
    systems stop jobs) while the step runs: one line on stderr, no traceback, status
    128 + signal, no temporaries and no worker left."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "roman_tweakreg.cli",
            "example",
            "--out",
            str(tmp_path),
            "--detectors",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell starts background jobs with SIGINT ignored, which Python then keeps
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("Simulated 2 exposures"), line
        end, children = time.monotonic() + 60, []
        while not children and time.monotonic() < end and proc.poll() is None:
            children = child_pids(proc.pid)
            time.sleep(0.01)
        assert children, "the step never forked a worker"
        os.kill(proc.pid, signum)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum
    lines = [s for s in err.splitlines() if s.strip()]
    assert "Traceback" not in err, err
    assert lines[-1] == f"roman-tweakreg example: interrupted ({signal.Signals(signum).name})"
    assert "Traceback" not in err
    assert _wait_dead(children, timeout=5)
    assert [p for p in tmp_path.rglob("*") if _io.TEMP_TAG in p.name] == []
    assert np.all([_dead(c) for c in children])


# -- SIGTERM under strun: no handler, the process dies where it is ---------------------------------
_SAVE_RUN = """
import sys
from roman_tweakreg import TweakRegStep
TweakRegStep.call(sys.argv[1], abs_refcat=sys.argv[2], output_dir=sys.argv[3],
                  save_results=True, processes=1)
"""


def _moment_reached(out: Path, moment: str) -> bool:
    names = [p.name for p in out.iterdir()] if out.is_dir() else []
    models = [n for n in names if n.endswith("_tweakregstep.asdf")]
    if moment == "first_temporary":
        return any(_io.TEMP_TAG in n for n in names)
    if moment == "product_before_model":  # a product written, its model not yet
        return any(n.replace("_wcs.asdf", "_tweakregstep.asdf") not in models
                   for n in names if n.endswith("_wcs.asdf"))
    if moment == "one_model":
        return len(models) >= 1
    if moment == "five_files":
        return len([n for n in names if n.endswith(".asdf")]) >= 5
    raise AssertionError(moment)


def _pairs(out: Path) -> tuple[list[str], list[str]]:
    """Models without their product, and products without their model, in ``out``."""
    names = {p.name for p in out.iterdir()}
    models = {n.removesuffix("_tweakregstep.asdf") for n in names
              if n.endswith("_tweakregstep.asdf")}
    products = {n.removesuffix("_wcs.asdf") for n in names if n.endswith("_wcs.asdf")}
    return sorted(models - products), sorted(products - models)


@pytest.fixture(scope="module")
def one_exposure(tmp_path_factory):
    """One exposure of three detectors on disk: six outputs to save."""
    exposures, stars = make_data(1)
    folder = tmp_path_factory.mktemp("sigterm")
    asn = simulate.write_dataset(exposures, stars, folder)
    refcat = folder / "gaia_2028.ecsv"
    refcat_at(stars, 2028.0).write(refcat, format="ascii.ecsv")
    return asn, refcat


@pytest.mark.parametrize("moment", ["first_temporary", "product_before_model", "five_files"])
def test_sigterm_while_saving_leaves_no_model_without_its_product(one_exposure, tmp_path,
                                                                  moment):
    """The step's process (as strun runs it: no SIGTERM handler) killed by SIGTERM while
    saving: no model exists without its _wcs.asdf product (the product is written first);
    what is left is whole pairs, at most one product whose model was next, and hidden
    temporaries; the next run removes those temporaries at once (the first thing it does
    in its output folder, :func:`~roman_tweakreg.outputs.check_writable`, before any
    work) and saves every pair."""
    asn, refcat = one_exposure
    out = tmp_path / "out"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_RUN, str(asn), str(refcat), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        end = time.monotonic() + 120
        while not _moment_reached(out, moment) and proc.poll() is None:
            assert time.monotonic() < end, "the moment never came"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGTERM  # killed while saving, not finished
    lonely_models, lonely_products = _pairs(out)
    assert lonely_models == []
    assert len(lonely_products) <= 1
    left = [p for p in out.iterdir() if not p.name.endswith((".asdf",))]
    assert all(p.name.startswith(".") and _io.TEMP_TAG in p.name for p in left), left
    if moment == "first_temporary":
        assert left, "killed while a temporary existed, yet none is left"
    for name in (n for n in os.listdir(out) if n.endswith("_tweakregstep.asdf")):
        with asdf.open(out / name) as af:  # whole files only
            assert af["roman"]["meta"]["cal_step"]["tweakreg"] == "COMPLETE"

    if moment != "five_files":  # the next run's first look at its output folder
        outputs.check_writable(out, "output_dir")
        assert [n for n in os.listdir(out) if _io.TEMP_TAG in n] == []
        return
    TweakRegStep.call(str(asn), abs_refcat=str(refcat), output_dir=str(out), save_results=True,
                      processes=1)
    names = sorted(os.listdir(out))
    assert [n for n in names if _io.TEMP_TAG in n] == []  # removed at once, not after 600 s
    assert _pairs(out) == ([], [])
    assert len([n for n in names if n.endswith("_tweakregstep.asdf")]) == 3
