"""Per-image jobs shared between this process and forked worker processes.

The step's main process must open every model itself (the models it returns live
there), so only work that needs no model is handed out: reading a catalog and
projecting it into the alignment plane, and building a corrected WCS.  Workers are
forked (they inherit the imported modules and the alignment plane, so starting one
costs milliseconds, not the seconds a fresh interpreter needs); where ``fork`` does
not exist, or other threads are running (forking them is unsafe), everything runs in
this process.

A job goes to a worker while fewer than ``depth`` jobs per worker (four by default) are
waiting, and otherwise runs here at once, so the work balances itself: when this
process is slow (opening files) the workers take nearly everything, when it is fast
(models in memory) it does its share.  When the caller says how many jobs are still
to come (``submit(..., left=n)``), the last ones stay here unless a worker is free,
so that this process does not wait idle for the workers' queue at the end (saving
36 images: 1.1 s of 5.7 s with four waiting).  Log records a job emits in a worker are
sent back and logged here, so the step's log is the same either way.

Faults.  A worker that dies (killed, out of memory) takes no job with it: the jobs it
had are done again in this process and the broken pool is replaced by a new one (once
per :class:`Workers`; after a second death every job runs here).  Workers never outlive
this process: on Linux the kernel kills them when it dies (``PR_SET_PDEATHSIG``), and
everywhere each worker watches a pipe whose only writer is this process and exits when
it reads end-of-file.  Workers ignore SIGINT: an interrupt is this process's to
handle, and it then stops them.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Workers", "gc_frozen", "gc_refreeze", "usable_cores"]

log = logging.getLogger(__name__)

_PACKAGE_LOGGER = "roman_tweakreg"
AUTO_MAX = 4  #: processes in all with ``processes=0``
MAX_RESTARTS = 1  #: new pools started after a worker died, per Workers
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_context: Any = None  # the context of jobs in a worker, set when it starts


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Freeze:
    """The garbage collector's freeze held by this package: reference-counted, thread-safe.

    ``gc.unfreeze`` unfreezes every frozen object, whoever froze it, and there is no way
    to unfreeze only some.  So the package freezes only when nothing is frozen when its
    first hold begins (``gc.get_freeze_count() == 0``), and unfreezes when its last hold
    ends: the count is 0 again, as it was.  When objects are already frozen (Python
    3.12.1 starts with 375 frozen objects; an application may freeze its own before
    forking), it leaves the collector alone: the process's state is unchanged, at the
    cost of the collector's passes over every object.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._holds = 0
        self._ours = False  # whether the objects frozen now are ours to unfreeze

    @contextmanager
    def held(self):
        with self._lock:
            if self._holds == 0:
                self._ours = gc.get_freeze_count() == 0
                if self._ours:
                    gc.freeze()
            self._holds += 1
        try:
            yield
        finally:
            with self._lock:
                self._holds -= 1
                if self._holds == 0 and self._ours:
                    gc.unfreeze()
                    self._ours = False

    def refreeze(self) -> None:
        """Freeze the objects made since the hold began too, when the freeze is ours."""
        with self._lock:
            if self._holds and self._ours:
                gc.freeze()


_FREEZE = _Freeze()


@contextmanager
def gc_frozen():
    """Keep the objects that exist now out of the garbage collector's passes meanwhile.

    Python's full collections walk every object alive; during a step that is the
    whole of astropy, gwcs and asdf plus the models, about 0.1 s a pass, several
    times a run.  Frozen objects are still freed by reference counting; cyclic
    garbage among them is collected after the block.  Blocks nest and may run in
    several threads at once; the objects are unfrozen when the last one ends.  When
    objects were frozen before the first block began (by the interpreter or the
    application), nothing is frozen or unfrozen: ``gc.get_freeze_count()`` after the
    block is always what it was before.
    """
    with _FREEZE.held():
        yield


def gc_refreeze() -> None:
    """Inside :func:`gc_frozen`, keep the objects made since it began out of the passes too.

    For a loop that builds long-lived objects one after another (the step opening
    each model): without it, every full pass walks all the models opened so far, a
    quarter of the time of opening 540 of them.  Cyclic garbage made before the call
    is kept too, until the outermost block ends (about 10 MB at 540 models).  Does
    nothing outside a block, or when the freeze is not the package's.
    """
    _FREEZE.refreeze()


def _init_worker(context, parent: int, watch_read: int, watch_write: int) -> None:
    """Set up a forked worker: its jobs' context, and its death with the parent."""
    global _context  # the state of one worker process
    _context = context
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles interrupts
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler inherited from the parent
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no usable libc: the pipe watch remains
            pass
    os.close(watch_write)  # the parent's copy is then the only writer
    if os.getppid() != parent:  # the parent died before the death signal was set
        os._exit(1)
    threading.Thread(target=_exit_at_eof, args=(watch_read,), daemon=True).start()


def _exit_at_eof(fd: int) -> None:
    """End the worker when the pipe's writer, the parent, is gone."""
    try:
        while os.read(fd, 1):
            pass
    finally:
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
    propagate, handlers = logger.propagate, logger.handlers
    logger.handlers, logger.propagate = [handler], False
    try:
        return True, fn(_context, *args), handler.records
    except Exception as err:
        return False, err, handler.records
    finally:
        logger.handlers, logger.propagate = handlers, propagate


class Workers:
    """Run ``fn(context, *args)`` jobs here or in forked workers (see the module docstring).

    Parameters
    ----------
    processes : int
        Processes in all, this one included, at most the usable cores
        (:func:`usable_cores`): 1 runs every job here; 0 means one per
        usable core, at most ``AUTO_MAX`` (the main process opening models is what
        limits the speed; more workers only share the corrected WCSs further), on
        Linux; elsewhere 0 means 1.
    context : object
        Passed to every job as its first argument (inherited by the workers, not sent).
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
        else:  # macOS has fork but its system libraries may not survive one
            wanted = 1
        self.n_workers = 0
        self.restarts = 0  #: pools replaced after a worker died
        self._pool: ProcessPoolExecutor | None = None
        self._watch_write = -1  # the parent's end of the workers' pipe watch
        self._waiting: list[Future] = []
        if wanted > 1:
            self._start(wanted - 1)

    def _start(self, n_workers: int) -> None:
        reason = _cannot_fork()
        if reason:
            log.debug("Per-image work stays in this process: %s", reason)
            return
        watch_read, self._watch_write = os.pipe()
        self.n_workers = n_workers
        self._pool = pool = ProcessPoolExecutor(
            n_workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_init_worker,
            initargs=(self.context, os.getpid(), watch_read, self._watch_write),
        )
        # fork now, with every object out of the collector's sight: a collection in a
        # worker would otherwise write to (and so copy) every inherited page.  Inside an
        # enclosing gc_frozen, the objects made since it began are frozen too.
        try:
            with _FREEZE.held():
                _FREEZE.refreeze()
                pool.submit(int).result()
        except BrokenProcessPool as err:
            self._replace(pool, err)
        except BaseException:  # an interrupt: no pool left behind
            self._stop()
            raise
        finally:
            os.close(watch_read)  # the workers have their copies
        if self._pool is pool:
            log.debug("Per-image work shared with %d forked worker(s)", self.n_workers)

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
        if self._pool is not None and len(self._waiting) < limit:
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
        if self._pool is None or len(arglist) < 2:
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
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self.n_workers = 0
        fd, self._watch_write = self._watch_write, -1
        if fd >= 0:
            os.close(fd)  # a worker still alive reads end-of-file and exits

    def close(self) -> None:
        """Stop the workers (waiting for none of their jobs)."""
        self._stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
                logging.getLogger(record.name).handle(record)
            self._outcome = (ok, value)
        ok, value = self._outcome
        if not ok:
            raise value
        return value


def _each(context, fn, arglist):
    return [fn(context, *args) for args in arglist]


def _cannot_fork() -> str:
    if "fork" not in multiprocessing.get_all_start_methods():
        return "this platform has no 'fork'"
    if threading.active_count() > 1:
        return f"{threading.active_count() - 1} other thread(s) are running"
    return ""
