"""Per-image jobs in worker processes: shared out, in order, logs and errors brought back,
the same with other threads running."""

import logging
import multiprocessing
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import child_pids
from roman_tweakreg._parallel import Workers
from roman_tweakreg.errors import CatalogError

PARENT = os.getpid()  # in a worker (which imports this module anew): its own pid


def _in_a_worker() -> bool:
    return multiprocessing.parent_process() is not None


def _job(context, x):
    logging.getLogger("roman_tweakreg.test_job").warning("job %d in %s", x, os.getpid())
    if x == 3:
        raise CatalogError(f"catalog {x} is bad")
    return os.getpid(), context * x


def _dies_in_worker(context, x):
    if _in_a_worker():
        os._exit(3)
    return context + x


@pytest.fixture(params=["plain", "idle thread"])
def no_other_threads(request):
    """Each test twice: as it is, and with an idle thread running meanwhile (the same
    workers and results: the start method is safe in a process with threads)."""
    if request.param == "plain":
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _warm(workers):
    assert workers.wait_ready(60)
    return workers


def test_map_shares_out_in_order(no_other_threads):
    with Workers(2, context=10) as workers:
        assert _warm(workers).n_workers == 1
        out = workers.map(_job, [(x,) for x in (1, 2, 4, 5, 6, 7)])
    assert [value for _, value in out] == [10, 20, 40, 50, 60, 70]
    pids = {pid for pid, _ in out}
    assert PARENT in pids
    assert len(pids) == 2  # one share computed here, one in the worker


def test_submit_brings_back_logs_and_errors(no_other_threads, caplog):
    caplog.set_level(logging.INFO, logger="roman_tweakreg")
    with Workers(2, context=2) as workers:
        _warm(workers)
        jobs = [workers.submit(_job, x) for x in (1, 2, 3)]
        first = jobs[0].result()
        assert first[0] != PARENT  # the first job went to the worker
        assert first[1] == 2
        assert jobs[1].result()[1] == 4
        with pytest.raises(CatalogError, match="catalog 3 is bad"):
            jobs[2].result()
    logged = [r.getMessage() for r in caplog.records if r.name == "roman_tweakreg.test_job"]
    assert f"job 1 in {first[0]}" in logged
    assert sum(m.startswith("job 3 in") for m in logged) == 1  # logged once, not per result()


def _wait_for(context, path):
    """A job that runs until ``path`` exists (at most 60 s); returns its pid."""
    import time

    end = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.01)
    return os.getpid()


def test_the_last_jobs_stay_here_unless_a_worker_is_free(no_other_threads, tmp_path):
    """``left``: a worker gets a job only while fewer than ``left + 1`` (and ``depth``
    per worker) are waiting, so this process is not left idle waiting for its queue."""
    go = str(tmp_path / "go")
    with Workers(2, context=1, depth=2) as workers:
        _warm(workers)
        busy = workers.submit(_wait_for, go, left=5)  # the worker is free: it takes it
        assert hasattr(busy, "remote")
        queued = workers.submit(_wait_for, go, left=5)  # 1 waiting < min(2, 6)
        assert hasattr(queued, "remote")
        full = workers.submit(_job, 1, left=5)  # 2 waiting: depth reached, runs here
        assert full.result()[0] == PARENT
        (tmp_path / "go").touch()
        assert busy.result() != PARENT
        assert queued.result() != PARENT
    with Workers(2, context=1, depth=4) as workers:
        _warm(workers)
        (tmp_path / "go").unlink()
        busy = workers.submit(_wait_for, go, left=1)  # nothing waiting: the worker's
        assert hasattr(busy, "remote")
        last = workers.submit(_job, 2, left=0)  # the last job: 1 waiting, it stays here
        assert last.result()[0] == PARENT
        second_last = workers.submit(_job, 4, left=1)  # 1 waiting < min(4, 2): worker
        assert hasattr(second_last, "remote")
        (tmp_path / "go").touch()
        assert busy.result() != PARENT
        assert second_last.result()[0] != PARENT


def test_a_dead_worker_s_job_is_done_here(no_other_threads, caplog):
    with Workers(2, context=100) as workers:
        _warm(workers)
        jobs = [workers.submit(_dies_in_worker, x) for x in range(3)]
        assert [j.result() for j in jobs] == [100, 101, 102]
    assert "A worker process stopped" in caplog.text


def test_one_process_means_no_worker_and_jobs_before_the_start_run_here(no_other_threads):
    assert Workers(1, context=1).n_workers == 0
    with Workers(2, context=5) as workers:
        assert workers.n_workers == 1
        if not workers.ready():  # not started yet: the job runs here
            assert workers.submit(_job, 1).result() == (PARENT, 5)
        _warm(workers)
        assert [v for _, v in workers.map(_job, [(1,), (2,)])] == [5, 10]
    assert not multiprocessing.active_children()


def _workers_in_a_daemon(queue):
    with Workers(3, context=7) as workers:
        queue.put((workers.n_workers, workers.map(_job, [(1,), (2,)])))


def test_a_daemonic_process_runs_every_job_itself():
    """A daemonic process (a Dask worker is one) may have no children: all runs there."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_workers_in_a_daemon, args=(queue,), daemon=True)
    process.start()
    n_workers, out = queue.get(timeout=120)
    process.join(30)
    assert n_workers == 0
    assert [v for _, v in out] == [7, 14]
    assert {pid for pid, _ in out} == {process.pid}


def test_a_broken_pool_is_replaced_then_given_up(no_other_threads, caplog):
    """Each worker death: the jobs redone here; one new pool, then no more workers."""
    with Workers(2, context=100) as workers:
        _warm(workers)
        first = workers.submit(_dies_in_worker, 1)
        assert first.result() == 101
        assert workers.restarts == 1
        assert workers.n_workers == 1  # a new pool
        _warm(workers)
        assert workers.map(_dies_in_worker, [(2,), (3,)]) == [102, 103]
        assert workers.n_workers == 0  # given up after the second death
        assert workers.submit(_job, 5).result() == (PARENT, 500)
    assert "1 new worker(s) started" in caplog.text
    assert "its jobs and all others run here" in caplog.text


def test_automatic_processes_only_on_linux(monkeypatch):
    import roman_tweakreg._parallel as parallel

    monkeypatch.setattr(parallel, "usable_cores", lambda: 8)
    with Workers(0) as workers:
        assert workers.n_workers == parallel.AUTO_MAX - 1 == 3
    monkeypatch.setattr(parallel.sys, "platform", "darwin")
    assert Workers(0).n_workers == 0
    with Workers(2) as workers:  # asked for explicitly
        assert workers.n_workers == 1


# -- a caller's executor ------------------------------------------------------------------
def _info_job(context, x):
    logging.getLogger("roman_tweakreg.test_job").info("info %d in %s", x, os.getpid())
    return os.getpid(), context * x


def test_a_caller_s_thread_pool_takes_the_jobs_and_is_not_shut_down(caplog):
    """Jobs run by threads of this process log as they run (once each); the counts say
    where they ran; the executor is the caller's to shut down."""
    from concurrent.futures import ThreadPoolExecutor

    from roman_tweakreg import per_image_executor

    caplog.set_level(logging.INFO, logger="roman_tweakreg")
    with ThreadPoolExecutor(2) as pool:
        with per_image_executor(pool, workers=2) as use, Workers(1, context=3) as workers:
            assert workers.ready()
            assert workers.n_workers == 2  # processes=1 is not used
            assert workers._pool is None  # no process of its own
            jobs = [workers.submit(_info_job, x) for x in (1, 2)]
            assert [j.result() for j in jobs] == [(PARENT, 3), (PARENT, 6)]
            assert [v for _, v in workers.map(_info_job, [(x,) for x in range(5)])] == [
                0, 3, 6, 9, 12,
            ]  # fmt: skip
        assert pool.submit(os.getpid).result() == PARENT  # still usable
    assert sum(use.jobs.values()) == 7
    assert use.jobs["here"] >= 1  # this process computes a share of the map
    assert sum(v for k, v in use.jobs.items() if k != "here") >= 2  # the pool's
    logged = [r.getMessage() for r in caplog.records if r.name == "roman_tweakreg.test_job"]
    assert sorted(logged) == sorted(
        [f"info {x} in {PARENT}" for x in (1, 2)] + [f"info {x} in {PARENT}" for x in range(5)]
    )
    assert Workers(2).n_workers == 1  # outside the block: processes of its own again


def test_a_caller_s_process_pool_brings_back_logs_and_errors(no_other_threads, caplog):
    """In another process a job's INFO records come back (the caller's level, not that
    process's), each logged here once; its error is raised here."""
    from concurrent.futures import ProcessPoolExecutor

    from roman_tweakreg import per_image_executor

    caplog.set_level(logging.INFO, logger="roman_tweakreg")
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        with per_image_executor(pool, workers=1) as use, Workers(2, context=2) as workers:
            first = workers.submit(_info_job, 1)  # nothing waiting: sent
            assert hasattr(first, "remote")
            assert first.result()[1] == 2
            other = first.result()[0]
            assert other != PARENT
            bad = workers.submit(_job, 3)  # 1 waiting < 4: sent too
            with pytest.raises(CatalogError, match="catalog 3 is bad"):
                bad.result()
            with pytest.raises(CatalogError, match="catalog 3 is bad"):
                bad.result()  # raised again, logged once
        assert pool.submit(os.getpid).result() == other  # not shut down
    logged = [r.getMessage() for r in caplog.records if r.name == "roman_tweakreg.test_job"]
    assert logged.count(f"info 1 in {other}") == 1
    assert logged.count(f"job 3 in {other}") == 1
    assert use.jobs == {f"{socket.gethostname()}:{other}": 2}


def test_a_failing_executor_s_jobs_run_here(caplog):
    """A worker of the caller's executor dies: its job is done here, and the following
    ones too; an executor shut down before takes no job."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from roman_tweakreg import per_image_executor

    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        with per_image_executor(pool, workers=1) as use, Workers(2, context=100) as workers:
            jobs = [workers.submit(_dies_in_worker, x) for x in range(3)]
            assert [j.result() for j in jobs] == [100, 101, 102]
            assert workers.submit(_job, 5).result() == (PARENT, 500)
    assert "The executor of per-image work failed (BrokenProcessPool" in caplog.text
    assert use.jobs["here"] >= 3
    closed = ThreadPoolExecutor(1)
    closed.shutdown()
    with per_image_executor(closed) as use, Workers(2, context=1) as workers:
        assert workers.map(_job, [(1,), (2,)]) == [(PARENT, 1), (PARENT, 2)]
        assert workers.submit(_job, 4).result() == (PARENT, 4)
    assert use.jobs == {"here": 3}
    assert "cannot schedule new futures after shutdown" in caplog.text


def test_per_image_executor_checks_its_arguments():
    from concurrent.futures import ThreadPoolExecutor

    from roman_tweakreg import InvalidParameterError, per_image_executor

    with pytest.raises(InvalidParameterError, match=r"executor: expected a concurrent\.futures"):
        with per_image_executor(object()):
            pass
    with ThreadPoolExecutor(1) as pool:
        for workers in (0, -1, 1.5, True):
            with pytest.raises(InvalidParameterError, match="workers: expected a positive"):
                with per_image_executor(pool, workers=workers):
                    pass


def test_records_of_a_foreign_job_s_thread_only_are_kept(caplog):
    """In a process running jobs for a caller elsewhere, the records of the job's thread
    are returned (at the caller's level), another thread's are logged there as before
    (and below its level dropped as before), and the package logger is as it was."""
    from roman_tweakreg._parallel import _foreign_job, _Job

    logger = logging.getLogger("roman_tweakreg")
    caplog.set_level(logging.WARNING, logger="roman_tweakreg")
    before = (logger.level, list(logger.handlers), logger.propagate)
    go, other_done = threading.Event(), threading.Event()

    def other_thread():
        go.wait(30)
        logging.getLogger("roman_tweakreg.other").warning("other thread")
        logging.getLogger("roman_tweakreg.other").info("other info")  # below WARNING
        other_done.set()

    def job(context, x):
        go.set()
        other_done.wait(30)
        logging.getLogger("roman_tweakreg.test_job").info("kept %d", x)
        logging.getLogger("roman_tweakreg.test_job").debug("below the caller's level")
        return x

    thread = threading.Thread(target=other_thread)
    thread.start()
    ok, value, records, place = _foreign_job(_Job(job, None, (7,)), -1, logging.INFO)
    thread.join()
    assert (ok, value) == (True, 7)
    assert [r.getMessage() for r in records] == ["kept 7"]
    assert place == f"{socket.gethostname()}:{PARENT}"
    seen = [r.getMessage() for r in caplog.records]
    assert "other thread" in seen
    assert "other info" not in seen
    assert "kept 7" not in seen  # the caller logs it
    assert (logger.level, list(logger.handlers), logger.propagate) == before


_CLOSED_BEFORE_THE_SERVER = """
import time
from roman_tweakreg._parallel import Workers
with Workers(2, context=1) as workers:
    assert workers.n_workers == 1
    ready = workers.ready()  # the new fork server is still importing the package
    t = time.perf_counter()
print(ready, time.perf_counter() - t, flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork server on Linux")
def test_workers_closed_before_the_server_is_up_wait_for_nothing():
    """In a fresh process, workers closed before the fork server is up make no pool and
    wait for nothing (before, closing waited for the server's import and the workers'
    start); the process then exits and leaves no process behind."""
    import subprocess

    from roman_tweakreg._parallel import usable_cores

    if usable_cores() < 2:
        pytest.skip("needs 2 usable cores")
    with subprocess.Popen(
        [sys.executable, "-c", _CLOSED_BEFORE_THE_SERVER], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            ready, seconds = proc.stdout.readline().split()
            descendants = _descendants(proc.pid)
            assert proc.wait(timeout=60) == 0
        finally:
            proc.kill()
    assert ready == "False"
    assert float(seconds) < 0.5  # closing the workers: nothing to wait for
    deadline = time.monotonic() + 30  # the server ends when it sees its caller gone
    while any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in descendants):
        assert time.monotonic() < deadline, "a process outlived its caller"
        time.sleep(0.05)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        children = child_pids(todo.pop())
        out += children
        todo += children
    return out


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


_UNGUARDED_SCRIPT = """
import sys
print("top level ran", flush=True)
from roman_tweakreg import TweakRegStep
from roman_tweakreg._parallel import Workers
from roman_tweakreg.testing import simulate

step = TweakRegStep(processes=2)  # a worker importing this script stops here
workers = Workers(2)
print("workers up:", workers.wait_ready(120), flush=True)
workers.close()
exposures, stars = simulate.make_dataset(2, detectors=("WFI01", "WFI02"), seed=3)
stars.write("gaia.ecsv")  # the Gaia stand-in, at its 2016 epoch
models = [m for e in exposures for m in e.models]
result = TweakRegStep.call(models, abs_refcat="gaia.ecsv", processes=2)
with result:
    for i in range(len(result)):
        model = result.borrow(i)
        print("status", model.meta.cal_step.tweakreg, flush=True)
        result.shelve(model, i, modify=False)
"""


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else True,
    reason="worker processes need two usable cores (Linux)",
)
def test_a_script_that_runs_the_step_when_imported_gets_one_warning_and_its_result(tmp_path):
    """A script without an ``if __name__ == "__main__":`` guard: each worker process
    imports it (Python's multiprocessing does) and would run the step again; they stop
    before it, and the caller does the work itself and says why once."""
    import subprocess

    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED_SCRIPT)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "workers up: False" in run.stdout
    assert run.stdout.count("top level ran") >= 2  # the probe imported it too
    assert run.stdout.count("status COMPLETE") == 4, run.stdout
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    # the call's step only: the script's first one came before stpipe's logging was set
    # up, and no worker process made one
    assert run.stderr.count("TweakRegStep instance created") == 1
    assert run.stderr.count("Step TweakRegStep running") == 1
    said = [line for line in run.stderr.splitlines() if "Per-image work stays" in line]
    assert len(said) == 1, run.stderr[-3000:]
    assert f"Per-image work stays in this process: {script} calls the step when it is " \
           "imported" in said[0]  # fmt: skip
    assert "WARNING" not in run.stderr  # nothing else went wrong (no worker stopped)
    assert "if __name__ == \"__main__\":" in said[0]
