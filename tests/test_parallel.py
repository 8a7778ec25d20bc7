"""Per-image jobs in forked workers: shared out, in order, logs and errors brought back."""

import gc
import logging
import os
import threading

import pytest

from roman_tweakreg._parallel import Workers, gc_frozen, gc_refreeze
from roman_tweakreg.errors import CatalogError

PARENT = os.getpid()


def _job(context, x):
    logging.getLogger("roman_tweakreg.test_job").warning("job %d in %s", x, os.getpid())
    if x == 3:
        raise CatalogError(f"catalog {x} is bad")
    return os.getpid(), context * x


def _dies_in_worker(context, x):
    if os.getpid() != PARENT:
        os._exit(3)
    return context + x


@pytest.fixture
def no_other_threads():
    assert threading.active_count() == 1, threading.enumerate()  # forking needs it


def test_map_shares_out_in_order(no_other_threads):
    with Workers(2, context=10) as workers:
        assert workers.n_workers == 1
        out = workers.map(_job, [(x,) for x in (1, 2, 4, 5, 6, 7)])
    assert [value for _, value in out] == [10, 20, 40, 50, 60, 70]
    pids = {pid for pid, _ in out}
    assert PARENT in pids
    assert len(pids) == 2  # one share computed here, one in the worker


def test_submit_brings_back_logs_and_errors(no_other_threads, caplog):
    caplog.set_level(logging.INFO, logger="roman_tweakreg")
    with Workers(2, context=2) as workers:
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
        jobs = [workers.submit(_dies_in_worker, x) for x in range(3)]
        assert [j.result() for j in jobs] == [100, 101, 102]
    assert "A worker process stopped" in caplog.text


def test_one_process_or_other_threads_mean_no_fork(no_other_threads):
    assert Workers(1, context=1).n_workers == 0
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        workers = Workers(2, context=5)
        assert workers.n_workers == 0
        assert [v for _, v in workers.map(_job, [(1,), (2,)])] == [5, 10]
    finally:
        stop.set()
        thread.join()


def test_gc_frozen_restores_and_nests(monkeypatch):
    """Nested and concurrent blocks: frozen while any runs, restored after the last; on
    an interpreter that starts with frozen objects (3.12.1) nothing is frozen or
    unfrozen."""
    calls = []
    for name in ("freeze", "unfreeze"):
        real = getattr(gc, name)
        monkeypatch.setattr(gc, name, lambda real=real, name=name: (calls.append(name), real()))
    before = gc.get_freeze_count()
    inside, leave = threading.Event(), threading.Event()

    def other_thread():
        with gc_frozen():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other_thread)
    thread.start()
    inside.wait(10)
    with gc_frozen():
        with gc_frozen():
            pass
        leave.set()
        thread.join()  # the other thread's block ended first
        if before == 0:
            assert gc.get_freeze_count() > 0  # still frozen: this block runs
    if before == 0:
        assert calls == ["freeze", "unfreeze"]
        assert gc.get_freeze_count() == 0
    else:
        assert calls == []
        assert gc.get_freeze_count() == before


def test_gc_refreeze_freezes_what_the_block_made_and_the_block_end_restores():
    """Objects made inside a block are frozen by gc_refreeze; after the block nothing is
    frozen that was not before; outside a block gc_refreeze changes nothing."""
    before = gc.get_freeze_count()
    gc_refreeze()
    assert gc.get_freeze_count() == before
    with gc_frozen():
        frozen = gc.get_freeze_count()
        made = [[k] for k in range(1000)]  # 1001 lists: objects the collector tracks
        gc_refreeze()
        if before == 0:
            assert gc.get_freeze_count() >= frozen + 1001
        else:  # the interpreter's own freeze (3.12.1): not the package's to extend
            assert gc.get_freeze_count() == before
    assert gc.get_freeze_count() == before
    assert len(made) == 1000


def test_a_broken_pool_is_replaced_then_given_up(no_other_threads, caplog):
    """Each worker death: the jobs redone here; one new pool, then no more workers."""
    with Workers(2, context=100) as workers:
        first = workers.submit(_dies_in_worker, 1)
        assert first.result() == 101
        assert workers.restarts == 1
        assert workers.n_workers == 1  # a new pool
        assert workers.map(_dies_in_worker, [(2,), (3,)]) == [102, 103]
        assert workers.n_workers == 0  # given up after the second death
        assert workers.submit(_job, 5).result() == (PARENT, 500)
    assert "1 new worker(s) started" in caplog.text
    assert "its jobs and all others run here" in caplog.text


def test_automatic_processes_fork_only_on_linux(no_other_threads, monkeypatch):
    import roman_tweakreg._parallel as parallel

    monkeypatch.setattr(parallel, "usable_cores", lambda: 8)
    with Workers(0) as workers:
        assert workers.n_workers == parallel.AUTO_MAX - 1 == 3
    monkeypatch.setattr(parallel.sys, "platform", "darwin")
    assert Workers(0).n_workers == 0
    with Workers(2) as workers:  # asked for explicitly
        assert workers.n_workers == 1
