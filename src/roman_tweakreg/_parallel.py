"""Per-image jobs shared between this process and forked worker processes.

The step's main process must open every model itself (the models it returns live
there), so only work that needs no model is handed out: reading a catalog and
projecting it into the alignment plane, and building a corrected WCS.  Workers are
forked (they inherit the imported modules and the alignment plane, so starting one
costs milliseconds, not the seconds a fresh interpreter needs); where ``fork`` does
not exist, or other threads are running (forking them is unsafe), everything runs in
this process.

A job goes to a worker while fewer than four jobs per worker are waiting, and otherwise
runs here at once, so the work balances itself: when this process is slow (opening
files) the workers take nearly everything, when it is fast (models in memory) it
does its share.  Log records a job emits in a worker are sent back and logged here,
so the step's log is the same either way.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Workers", "gc_frozen", "usable_cores"]

log = logging.getLogger(__name__)

_PACKAGE_LOGGER = "roman_tweakreg"
AUTO_MAX = 4  #: processes in all with ``processes=0``
_context: Any = None  # the context of jobs in a worker, set when it starts


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def gc_frozen():
    """Keep the objects that exist now out of the garbage collector's passes meanwhile.

    Python's full collections walk every object alive; during a step that is the
    whole of astropy, gwcs and asdf plus the models, about 0.1 s a pass, several
    times a run.  Frozen objects are still freed by reference counting; cyclic
    garbage among them is collected after the block.  Does nothing inside an
    enclosing freeze (``gc.unfreeze`` would undo it).
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _set_context(context) -> None:
    global _context  # the state of one worker process
    _context = context


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
        Processes in all, this one included: 1 runs every job here; 0 means one per
        usable core, at most ``AUTO_MAX`` (the main process opening models is what
        limits the speed; more workers only share the corrected WCSs further), on
        Linux; elsewhere 0 means 1.
    context : object
        Passed to every job as its first argument (inherited by the workers, not sent).
    """

    def __init__(self, processes: int, context=None):
        self.context = context
        if processes > 0:
            wanted = processes
        elif sys.platform.startswith("linux"):
            wanted = min(usable_cores(), AUTO_MAX)
        else:  # macOS has fork but its system libraries may not survive one
            wanted = 1
        self.n_workers = 0
        self._pool = None
        self._waiting: list[Future] = []
        if wanted > 1:
            reason = _cannot_fork()
            if reason:
                log.debug("Per-image work stays in this process: %s", reason)
            else:
                self.n_workers = wanted - 1
                self._pool = ProcessPoolExecutor(
                    self.n_workers,
                    mp_context=multiprocessing.get_context("fork"),
                    initializer=_set_context,
                    initargs=(context,),
                )
                # fork now, with every object out of the collector's sight: a collection
                # in a worker would otherwise write to (and so copy) every inherited page.
                # Inside an enclosing freeze (gc_frozen) the objects stay frozen after.
                enclosed = gc.get_freeze_count() > 0
                gc.freeze()
                try:
                    self._pool.submit(int).result()
                finally:
                    if not enclosed:
                        gc.unfreeze()
                log.debug("Per-image work shared with %d forked worker(s)", self.n_workers)

    def submit(self, fn: Callable, *args) -> Future:
        """Start ``fn(context, *args)``; return a Future of its result."""
        self._waiting = [f for f in self._waiting if not f.done()]
        if self._pool is not None and len(self._waiting) < 4 * self.n_workers:
            remote = self._pool.submit(_in_worker, fn, args)
            self._waiting.append(remote)
            return _Relay(remote, lambda: self._run_here(fn, args))
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
            _Relay(
                self._pool.submit(_in_worker, _each, (fn, share)),
                lambda s=share: self._run_here(_each, (fn, s)),
            )
            for share in shares[1:]
        ]
        here = _each(self.context, fn, shares[0])
        results = [here] + [r.result() for r in remote]
        out = [None] * len(arglist)
        for k, part in enumerate(results):
            out[k::parts] = part
        return out

    def _run_here(self, fn, args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(self.context, *args))
        except Exception as err:
            future.set_exception(err)
        return future

    def close(self) -> None:
        """Stop the workers (waiting for none of their jobs)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Relay:
    """The result of a job run in a worker, its log records logged here once."""

    def __init__(self, remote: Future, fallback: Callable[[], Future]):
        self._remote, self._fallback, self._outcome = remote, fallback, None

    def result(self):
        if self._outcome is None:
            try:
                ok, value, records = self._remote.result()
            except BrokenProcessPool as err:  # a worker died (killed, out of memory)
                log.warning("A worker process stopped (%s); doing its job here", err)
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
