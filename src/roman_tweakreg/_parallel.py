"""Per-image jobs shared between this process and worker processes of a standard pool.

The step's main process must open every model itself (the models it returns live
there), so only work that needs no open file is handed out: reading a catalog and
projecting it into the alignment plane, building a corrected WCS, and writing an
output.  The workers are those of a :class:`concurrent.futures.ProcessPoolExecutor`
started by ``multiprocessing``'s ``forkserver`` method: each worker is forked from a
server process that started from nothing and imported the package (it holds no
thread, no lock and no file of this process), so a pool is safe to start in a process
with threads (a Jupyter kernel, an application, a Dask worker's thread pool) and gives
the same results as in a plain process.  The server is started once per process, the
first time a pool is; the method and its preloaded modules are those of the context
object passed to the pool (``multiprocessing``'s default start method is not changed).

Where a process may have no children (a daemonic process, such as a Dask worker
started by a nanny) or the platform has no ``forkserver``, every job runs in this
process, with the same results.

A job goes to a worker while fewer than ``depth`` jobs per worker (four by default) are
waiting, and otherwise runs here at once, so the work balances itself: when this
process is slow (opening files) the workers take nearly everything, when it is fast
(models in memory) it does its share.  Until the pool's workers have started (a new
server imports the package first, a second or two), every job runs here.  When the
caller says how many jobs are still to come (``submit(..., left=n)``), the last ones
stay here unless a worker is free, so that this process does not wait idle for the
workers' queue at the end.  Log records a job emits in a worker are sent back and
logged here, so the step's log is the same either way.

Faults.  A worker that dies (killed, out of memory) takes no job with it: the jobs it
had are done again in this process and the broken pool is replaced by a new one (once
per :class:`Workers`; after a second death every job runs here), with a log line.
Workers never outlive this process: each watches ``multiprocessing``'s sentinel of
its parent process (this one) and exits when it closes; on Linux the kernel also kills
a worker whose server died (``PR_SET_PDEATHSIG``), and the server exits when this
process does.  Workers ignore SIGINT: an interrupt is this process's to handle, and it
then stops them.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["START_METHOD", "Workers", "usable_cores"]

log = logging.getLogger(__name__)

_PACKAGE_LOGGER = "roman_tweakreg"
AUTO_MAX = 4  #: processes in all with ``processes=0``
MAX_RESTARTS = 1  #: new pools started after a worker died, per Workers
START_METHOD = "forkserver"  #: safe in a process with threads; the package is preloaded
#: Modules the fork server imports once, so that its workers start in milliseconds.
PRELOAD = ["roman_tweakreg.catalogs", "roman_tweakreg.outputs", "roman_tweakreg.plane"]
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_context: Any = None  # the context of jobs in a worker, set when it starts


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _init_worker(context) -> None:
    """Set up a worker: its jobs' context, and its death with this process."""
    global _context  # the state of one worker process
    _context = context
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles interrupts
    if ctypes is not None and sys.platform.startswith("linux"):
        try:  # the fork server's death (it exits with this process) kills the worker
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no usable libc: the sentinel watch remains
            pass
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent) -> None:
    """End the worker when the process that started it is gone."""
    parent.join()  # returns when the parent's sentinel closes: it died or ended
    os._exit(1)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        record.msg, record.args = record.getMessage(), None  # picklable whatever the args
        record.exc_info = record.exc_text = None
        self.records.append(record)


def _in_worker(fn, args):
    """Run ``fn(context, *args)`` in a worker; return its outcome and its log records."""
    logger = logging.getLogger(_PACKAGE_LOGGER)
    handler = _Collect()
    propagate, handlers, level = logger.propagate, logger.handlers, logger.level
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG)  # the worker's own process: every record goes back
    try:
        return True, fn(_context, *args), handler.records
    except Exception as err:
        return False, err, handler.records
    finally:
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)


def _ready() -> int:
    return os.getpid()


def _cannot_start() -> str:
    """Why no worker process can be started here ('' when they can)."""
    if START_METHOD not in multiprocessing.get_all_start_methods():
        return f"this platform has no {START_METHOD!r} start method"
    if multiprocessing.current_process().daemon:
        return "this is a daemonic process (e.g. a Dask worker), which may have no children"
    return ""


class Workers:
    """Run ``fn(context, *args)`` jobs here or in worker processes (see the module docstring).

    Parameters
    ----------
    processes : int
        Processes in all, this one included, at most the usable cores
        (:func:`usable_cores`): 1 runs every job here; 0 means one per
        usable core, at most ``AUTO_MAX`` (the main process opening models is what
        limits the speed; more workers only share the corrected WCSs further), on
        Linux; elsewhere 0 means 1.
    context : object
        Passed to every job as its first argument (sent to each worker once, when it
        starts; it must be picklable).
    depth : int
        Jobs waiting (running included) per worker before a job runs here instead.
        Four keeps the workers busy while this process is slow between jobs (opening
        a model); two is enough when this process runs jobs of the same size as theirs.
    """

    def __init__(self, processes: int, context=None, depth: int = 4):
        self.context = context
        self.depth = max(1, depth)
        if processes > 0:
            wanted = min(processes, usable_cores())  # more would only compete for the cores
        elif sys.platform.startswith("linux"):
            wanted = min(usable_cores(), AUTO_MAX)
        else:  # elsewhere a worker's start costs more than it saves
            wanted = 1
        self.n_workers = 0
        self.restarts = 0  #: pools replaced after a worker died
        self._pool: ProcessPoolExecutor | None = None
        self._warm: _Warm | None = None
        self._waiting: list[Future] = []
        if wanted > 1:
            self._start(wanted - 1)

    def _start(self, n_workers: int) -> None:
        reason = _cannot_start()
        if reason:
            log.debug("Per-image work stays in this process: %s", reason)
            return
        context = multiprocessing.get_context(START_METHOD)
        context.set_forkserver_preload(PRELOAD)  # used when the server starts
        self.n_workers = n_workers
        self._pool = pool = ProcessPoolExecutor(
            n_workers, mp_context=context, initializer=_init_worker, initargs=(self.context,)
        )
        # Starting a worker waits for the fork server, which imports the package first
        # when it is new: a thread of the pool's waits for it, this one goes on (its
        # jobs run here meanwhile).
        self._warm = _Warm(pool, n_workers)
        log.debug("Per-image work shared with %d worker process(es)", self.n_workers)

    def ready(self) -> bool:
        """Whether the workers have started (each has done a first job)."""
        if self._pool is None or not self._warm.done.is_set():
            return False
        if self._warm.error is not None:  # a worker died as it started
            self._replace(self._pool, self._warm.error)
            return False
        return True

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the workers have started (for tests and benchmarks); whether they have."""
        while self._pool is not None:
            if not self._warm.done.wait(timeout):
                return False
            if self.ready():
                return True
        return False

    def _replace(self, broken: ProcessPoolExecutor, err: BaseException) -> None:
        """Replace the pool ``broken`` after a worker died; after MAX_RESTARTS, run here."""
        if broken is not self._pool:  # already replaced
            return
        n_workers = self.n_workers
        self._stop()
        if self.restarts < MAX_RESTARTS:
            self.restarts += 1
            log.warning(
                "A worker process stopped (%s); its jobs are done again and "
                "%d new worker(s) started",
                err,
                n_workers,
            )
            self._start(n_workers)
        else:
            log.warning("A worker process stopped (%s); its jobs and all others run here", err)

    def _send(self, fn: Callable, args: tuple) -> _Relay | None:
        """Start ``fn(context, *args)`` in a worker; None when there are no workers."""
        while self._pool is not None:
            pool = self._pool
            try:
                remote = pool.submit(_in_worker, fn, args)
            except BrokenProcessPool as err:  # a worker died since the last job
                self._replace(pool, err)
                continue
            return _Relay(
                remote,
                fallback=lambda: self._run_here(fn, args),
                on_broken=lambda e, pool=pool: self._replace(pool, e),
            )
        return None

    def submit(self, fn: Callable, *args, left: int | None = None) -> Future | _Relay:
        """Start ``fn(context, *args)``; return a Future of its result.

        ``left``: jobs the caller will still submit after this one, when known.  A
        worker then gets the job only while fewer than ``left + 1`` are waiting (and
        fewer than ``depth`` per worker), so that the workers' queue is empty when this
        process runs out of jobs and all finish at about the same time.
        """
        self._waiting = [f for f in self._waiting if not f.done()]
        limit = self.depth * self.n_workers
        if left is not None:
            limit = min(limit, left + 1)
        if self.ready() and len(self._waiting) < limit:
            relay = self._send(fn, args)
            if relay is not None:
                self._waiting.append(relay.remote)
                return relay
        return self._run_here(fn, args)

    def map(self, fn: Callable, arglist: list[tuple]) -> list:
        """``[fn(context, *args) for args in arglist]``, shared out in equal parts.

        For a batch of jobs ready at once: each worker gets one share in one message,
        this process computes its own share meanwhile.  Raises the first error.
        """
        if not self.ready() or len(arglist) < 2:
            return [fn(self.context, *args) for args in arglist]
        parts = self.n_workers + 1
        shares = [arglist[k::parts] for k in range(parts)]
        remote = [
            self._send(_each, (fn, share)) or self._run_here(_each, (fn, share))
            for share in shares[1:]
        ]
        here = _each(self.context, fn, shares[0])
        results = [here] + [r.result() for r in remote]
        out = [None] * len(arglist)
        for k, part in enumerate(results):
            out[k::parts] = part
        return out

    def _run_here(self, fn, args) -> Future:
        try:
            result = fn(self.context, *args)
        except Exception as err:
            # made elsewhere: the error's traceback holds this frame, which must not hold
            # the future holding the error (a reference cycle keeps the caller's objects,
            # open files included, until a garbage collection)
            return _failed(err)
        future: Future = Future()
        future.set_result(result)
        return future

    def _stop(self) -> None:
        pool, warm, self._pool, self._warm = self._pool, self._warm, None, None
        self.n_workers = 0
        if pool is None:
            return
        try:
            pool.shutdown(wait=True, cancel_futures=True)
            warm.thread.join()
        except BaseException:  # an interrupt meanwhile: the workers still end first
            pool.shutdown(wait=True)
            warm.thread.join()
            raise

    def close(self) -> None:
        """Stop the workers (running jobs end; waiting ones are dropped)."""
        self._stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Warm:
    """Start the workers of ``pool`` in a thread: ``done`` is set once each has done a
    first job (``error``: why one could not)."""

    def __init__(self, pool: ProcessPoolExecutor, n_workers: int):
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(pool, n_workers), name="roman_tweakreg-workers", daemon=True
        )
        self.thread.start()

    def _run(self, pool, n_workers):
        try:
            for future in [pool.submit(_ready) for _ in range(n_workers)]:
                future.result()
        except BaseException as err:  # told to the caller by ready()
            self.error = err
        finally:
            self.done.set()


def _failed(err: BaseException) -> Future:
    """A future that failed with ``err``."""
    future: Future = Future()
    future.set_exception(err)
    return future


class _Relay:
    """The result of a job run in a worker, its log records logged here once.

    When the worker died, the job is done here (``fallback``) and ``on_broken`` is
    told, so that the pool is replaced.
    """

    def __init__(self, remote: Future, fallback: Callable[[], Future], on_broken: Callable):
        self.remote, self._fallback, self._on_broken = remote, fallback, on_broken
        self._outcome: tuple | None = None

    def result(self):
        if self._outcome is None:
            try:
                ok, value, records = self.remote.result()
            except BrokenProcessPool as err:  # a worker died (killed, out of memory)
                self._on_broken(err)
                here = self._fallback()
                ok, value, records = here.exception() is None, None, []
                value = here.result() if ok else here.exception()
            for record in records:
                logger = logging.getLogger(record.name)
                if logger.isEnabledFor(record.levelno):  # as if logged here
                    logger.handle(record)
            self._outcome = (ok, value)
        ok, value = self._outcome
        if not ok:
            raise value
        return value


def _each(context, fn, arglist):
    return [fn(context, *args) for args in arglist]
