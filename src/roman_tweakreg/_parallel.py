"""Per-image jobs shared between this process and worker processes, or a caller's executor.

The step's main process must open every model itself (the models it returns live
there), so only work that needs no open file is handed out: reading a catalog and
projecting it into the alignment plane, building a corrected WCS, and writing an
output.  By default the workers are those of a
:class:`concurrent.futures.ProcessPoolExecutor` started by ``multiprocessing``'s
``forkserver`` method: each worker is forked from a server process that started from
nothing and imported the package (it holds no thread, no lock and no file of this
process), so a pool is safe to start in a process with threads (a Jupyter kernel, an
application, a Dask worker's thread pool) and gives the same results as in a plain
process.  The server is started once per process, the first time a pool is; the method
and its preloaded modules are those of the context object passed to the pool
(``multiprocessing``'s default start method is not changed).

A caller's executor.  Inside ``with per_image_executor(executor):`` the jobs go to
``executor`` (any :class:`concurrent.futures.Executor`: a Dask client's
``get_executor()``, a user's ``ProcessPoolExecutor``) instead, and the step starts no
process of its own.  The step never shuts that executor down; leaving the block waits
for the jobs it sent.  Each job carries its context.  A job that runs in another process
sends its log records back with its result (they are collected there from the job's own
thread only, so that other work of that process, such as a Dask worker's other tasks,
logs as before); a job that runs in this process (a thread pool, a Dask worker running
the caller's own task) logs as it runs.  When the executor fails (a dead worker, a
refused job), the job is done here and the rest of that phase's jobs stay here.

Where a process may have no children (a daemonic process, such as a Dask worker
started by a nanny) or the platform has no ``forkserver``, every job runs in this
process, with the same results (unless an executor is given).

A job goes to a worker while fewer than ``depth`` jobs per worker (four by default) are
waiting, and otherwise runs here at once, so the work balances itself: when this
process is slow (opening files) the workers take nearly everything, when it is fast
(models in memory) it does its share.  Until the pool's workers have started (a new
server imports the package first, a second or two), every job runs here.  When the
caller says how many jobs are still to come (``submit(..., left=n)``), the last ones
stay here unless a worker is free, so that this process does not wait idle for the
workers' queue at the end.  Log records a job emits in a worker are sent back and
logged here, so the step's log is the same either way.

Costs in a one-call process (``strun``).  The fork server is waited for by a thread of
its own (a short-lived probe process), and the pool is made only once the server is up:
a call that ends before (a small association, a loaded machine) closes nothing and
waits for nothing, neither at its end nor at the process's exit; the server, still
importing, exits when it sees this process gone.

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

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from collections import Counter
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_all
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from .errors import InvalidParameterError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "START_METHOD",
    "ExecutorUse",
    "Workers",
    "per_image_executor",
    "start_server",
    "usable_cores",
]

log = logging.getLogger(__name__)

_PACKAGE_LOGGER = "roman_tweakreg"
AUTO_MAX = 4  #: processes in all with ``processes=0``
MAX_RESTARTS = 1  #: new pools started after a worker died, per Workers
START_METHOD = "forkserver"  #: safe in a process with threads; the package is preloaded
#: Modules the fork server imports once, so that its workers start in milliseconds: the
#: jobs' modules (catalogs, outputs, plane) and asdf's extensions loaded.
PRELOAD = ["roman_tweakreg._preload"]
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_context: Any = None  # the context of jobs in a worker, set when it starts
#: The process (pid) in which the fork server was seen up: no probe needed there.
_server_seen_in: int | None = None
#: The exit status of a child of the fork server that was asked to run the step while it
#: imported the caller's main script (see :func:`refuse_in_main_import`).
MAIN_IMPORT_EXIT = 86
#: The process (pid) whose main script runs the step when imported: no workers there.
_main_runs_step_in: int | None = None
_said_lock = threading.Lock()
#: The caller's executor of per-image jobs in this context (see per_image_executor).
_EXECUTOR: ContextVar[ExecutorUse | None] = ContextVar("roman_tweakreg_executor", default=None)
HERE = "here"  #: the key of :attr:`ExecutorUse.jobs` for jobs the step's process ran


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ExecutorUse:
    """An executor given to the step's per-image jobs (see :func:`per_image_executor`).

    Attributes
    ----------
    executor : concurrent.futures.Executor
        The executor; never shut down by the step.
    workers : int
        Jobs it runs at once: the step keeps at most four per worker waiting there
        and runs the others itself.
    jobs : collections.Counter
        Per-image jobs run so far in the block, by place: ``"here"`` for those the
        step's process ran itself, otherwise the Dask worker's address or
        ``host:pid`` of the process that ran them.
    """

    def __init__(self, executor: Executor, workers: int):
        self.executor = executor
        self.workers = workers
        self.jobs: Counter = Counter()
        self._lock = threading.Lock()

    def count(self, place: str, n: int = 1) -> None:
        """Count ``n`` jobs run at ``place``."""
        with self._lock:
            self.jobs[place] += n


@contextmanager
def per_image_executor(executor: Executor, workers: int | None = None) -> Iterator[ExecutorUse]:
    """Send the step's per-image jobs to ``executor`` within the block.

    Inside ``with per_image_executor(executor):`` every
    :class:`~roman_tweakreg.TweakRegStep` run in this context (this thread, or a task
    copying its context) sends its per-image jobs (reading and projecting catalogs,
    building corrected WCSs, writing outputs) to ``executor`` instead of starting
    processes of its own; the ``processes`` parameter is then not used.  The step also
    runs jobs itself while ``executor`` is busy, with the same results, files,
    statuses and log lines as without it.

    Parameters
    ----------
    executor : concurrent.futures.Executor
        For example ``client.get_executor(pure=False)`` of a ``distributed.Client``
        (from inside a Dask task, that of ``distributed.worker_client()``), or a
        ``ProcessPoolExecutor``.  Its jobs are module-level functions of the package
        with picklable arguments (the models to save among them).  The step never
        shuts it down.
    workers : int, optional
        Jobs ``executor`` runs at once (default: the usable cores of this process).

    Yields
    ------
    ExecutorUse
        Counts the jobs run, by place (:attr:`ExecutorUse.jobs`).

    Raises
    ------
    InvalidParameterError
        When ``executor`` is not a ``concurrent.futures.Executor`` or ``workers`` is
        not a positive integer.

    .. warning:: Leaving a step's phase waits for the jobs it sent to ``executor``;
       a job that runs in another process changes, while it runs, the level of the
       ``roman_tweakreg`` logger there (to that of the caller) and routes that
       logger's records of the job's own thread to the caller.
    """
    if not isinstance(executor, Executor):
        raise InvalidParameterError(
            f"executor: expected a concurrent.futures.Executor, got {type(executor).__name__}"
        )
    if workers is None:
        workers = usable_cores()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidParameterError(f"workers: expected a positive integer, got {workers!r}")
    use = ExecutorUse(executor, workers)
    token = _EXECUTOR.set(use)
    try:
        yield use
    finally:
        _EXECUTOR.reset(token)


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


def _portable(record: logging.LogRecord) -> logging.LogRecord:
    """``record`` made picklable whatever its arguments (its message formatted)."""
    record.msg, record.args = record.getMessage(), None
    record.exc_info = record.exc_text = None
    return record


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(_portable(record))


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


def _place() -> str:
    """Where a job of a caller's executor runs: a Dask worker's address, or host:pid."""
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        try:
            return distributed.get_worker().address
        except ValueError:  # not in a Dask worker
            pass
    return f"{socket.gethostname()}:{os.getpid()}"


class _Job:
    """``fn(context, *args)`` as one object for a caller's executor: older Dask releases
    (2024.8, the lowest this package allows) read a tuple whose first item is callable,
    anywhere in a call's arguments, as a task of their own, which ``(fn, arglist)`` of a
    batched job is."""

    __slots__ = ("args", "context", "fn")

    def __init__(self, fn: Callable, context, args: tuple):
        self.fn, self.context, self.args = fn, context, args


def _foreign_job(job: _Job, caller: int, level: int):
    """Run ``job`` for a caller's executor (a job of :class:`Workers`).

    Returns whether it returned, its value or error, its log records (from another
    process than ``caller``'s; in the caller's process they are logged as they come)
    and where it ran.
    """
    fn, context, args = job.fn, job.context, job.args
    place = _place()
    if os.getpid() == caller:
        try:
            return True, fn(context, *args), [], place
        except Exception as err:
            return False, err, [], place
    with _CAPTURE.records(level) as records:
        try:
            return True, fn(context, *args), records, place
        except Exception as err:
            return False, err, records, place


class _Capture:
    """The log records of jobs run in this process for a caller elsewhere, per thread.

    While at least one such job runs, the package logger's handlers are replaced by one
    that keeps the records of those jobs' threads and passes every other record on as
    before (to the logger's own handlers, then its parents' when it propagated); its
    level is lowered to the lowest the callers asked for, and records of other threads
    below the level of before are dropped, as they were.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.threads: dict[int, tuple[list, int]] = {}  # thread -> (records, level)
        self.before: tuple | None = None  # handlers, propagate, level, effective level

    @contextmanager
    def records(self, level: int) -> Iterator[list]:
        logger = logging.getLogger(_PACKAGE_LOGGER)
        kept: list[logging.LogRecord] = []
        me = threading.get_ident()
        with self.lock:
            if not self.threads:
                self.before = (
                    logger.handlers, logger.propagate, logger.level, logger.getEffectiveLevel()
                )
                logger.handlers, logger.propagate = [_Route(self)], False
            self.threads[me] = (kept, level)
            logger.setLevel(min(lvl for _, lvl in self.threads.values()))
        try:
            yield kept
        finally:
            with self.lock:
                del self.threads[me]
                if self.threads:
                    logger.setLevel(min(lvl for _, lvl in self.threads.values()))
                else:
                    handlers, propagate, own_level, _ = self.before
                    logger.handlers, logger.propagate = handlers, propagate
                    logger.setLevel(own_level)
                    self.before = None

    def route(self, record: logging.LogRecord) -> None:
        mine = self.threads.get(record.thread)
        before = self.before
        if mine is not None:
            if record.levelno >= mine[1]:
                mine[0].append(_portable(record))
            return
        if before is None:
            return
        handlers, propagate, _, effective = before
        if record.levelno < effective and not _own_level(record.name):
            return  # not created without the capture
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
        parent = logging.getLogger(_PACKAGE_LOGGER).parent
        if propagate and parent is not None:
            parent.handle(record)


def _own_level(name: str) -> bool:
    """Whether a logger below the package's, from ``name`` up, has a level of its own."""
    logger = logging.getLogger(name)
    while logger is not None and logger.name != _PACKAGE_LOGGER:
        if logger.level:
            return True
        logger = logger.parent
    return False


class _Route(logging.Handler):
    def __init__(self, capture: _Capture):
        super().__init__(logging.NOTSET)
        self.capture = capture

    def emit(self, record):
        self.capture.route(record)


_CAPTURE = _Capture()


def _ready() -> int:
    return os.getpid()


def refuse_in_main_import() -> None:
    """End this process at once (status :data:`MAIN_IMPORT_EXIT`) when it is a child of
    the step's fork server that is importing the caller's main script.

    Python's ``forkserver`` and ``spawn`` children import the main script of the
    process that started them (as ``__mp_main__``) before they run anything, so a
    script that calls the step at its top level, with no ``if __name__ == "__main__":``
    guard, would call it again in every worker.  Such a child stops here, before the
    step does anything; the caller sees its status (:func:`_probe_server`), runs every
    job itself and says why, once.  A worker that has started (its jobs' context set)
    or any other process is never stopped.
    """
    if (
        _context is None
        and "__mp_main__" in sys.modules  # the main script, run by multiprocessing
        and "roman_tweakreg._preload" in sys.modules  # forked by the step's server
    ):
        os._exit(MAIN_IMPORT_EXIT)


class MainScriptRunsStep(RuntimeError):
    """The caller's main script runs the step when imported: no worker can start."""


def _cannot_start() -> str:
    """Why no worker process can be started here ('' when they can)."""
    if _main_runs_step_in == os.getpid():
        return "the main script calls the step when imported (no __main__ guard)"
    if START_METHOD not in multiprocessing.get_all_start_methods():
        return f"this platform has no {START_METHOD!r} start method"
    if multiprocessing.current_process().daemon:
        return "this is a daemonic process (e.g. a Dask worker), which may have no children"
    return ""


def _processes_wanted(processes: int) -> int:
    """Processes in all for the ``processes`` parameter (see :class:`Workers`)."""
    if processes > 0:
        return min(processes, usable_cores())  # more would only compete for the cores
    if sys.platform.startswith("linux"):
        return min(usable_cores(), AUTO_MAX)
    return 1  # elsewhere a worker's start costs more than it saves


def start_server(processes: int) -> None:
    """Start this process's fork server now, in the background, if the step's
    :class:`Workers` (``processes``) will want it and it is not up yet.

    The server imports the package before it forks a worker (a second or two of CPU),
    so a call that starts it as it begins (before opening its first model) has its
    workers sooner.  Nothing is waited for: a thread waits for a probe process.
    """
    if (
        _EXECUTOR.get() is not None
        or _processes_wanted(processes) < 2
        or _server_seen_in == os.getpid()
        or _cannot_start()
    ):
        return
    threading.Thread(target=_start_quietly, name="roman_tweakreg-server", daemon=True).start()


def _start_quietly() -> None:
    """:func:`_probe_server` in a thread of its own (its one fault is told as a warning)."""
    with contextlib.suppress(MainScriptRunsStep):
        _probe_server()


def _probe_server() -> None:
    """Start a probe process from the fork server: returns once the server is up."""
    global _server_seen_in  # a fact about this process's fork server
    context = multiprocessing.get_context(START_METHOD)
    context.set_forkserver_preload(PRELOAD)  # used when the server starts
    probe = context.Process(target=_probe, daemon=True, name="roman_tweakreg-probe")
    probe.start()  # returns once the server (importing the package) has forked it
    probe.join()
    if probe.exitcode == MAIN_IMPORT_EXIT:
        _main_script_runs_step()
    _server_seen_in = os.getpid()


def _main_script_runs_step() -> None:
    """The probe stopped as it imported the main script: say so once, and raise."""
    global _main_runs_step_in  # a fact about this process's main script
    main = getattr(sys.modules.get("__main__"), "__file__", None) or "the main script"
    with _said_lock:
        if _main_runs_step_in != os.getpid():
            _main_runs_step_in = os.getpid()
            log.warning(
                "Per-image work stays in this process: %s calls the step when it is "
                "imported, and worker processes import it (Python's multiprocessing "
                "does); put the call under 'if __name__ == \"__main__\":' to share "
                "the work with worker processes, or pass processes=1",
                main,
            )
    raise MainScriptRunsStep(f"{main} calls the step when imported")


class Workers:
    """Run ``fn(context, *args)`` jobs here or in worker processes (see the module docstring).

    Parameters
    ----------
    processes : int
        Processes in all, this one included, at most the usable cores
        (:func:`usable_cores`): 1 runs every job here; 0 means one per
        usable core, at most ``AUTO_MAX`` (the main process opening models is what
        limits the speed; more workers only share the corrected WCSs further), on
        Linux; elsewhere 0 means 1.  Not used inside :func:`per_image_executor`:
        the jobs then go to its executor.
    context : object
        Passed to every job as its first argument (sent to each worker once, when it
        starts, or with each job to a caller's executor; it must be picklable).
    depth : int
        Jobs waiting (running included) per worker before a job runs here instead.
        Four keeps the workers busy while this process is slow between jobs (opening
        a model); two is enough when this process runs jobs of the same size as theirs.
    """

    def __init__(self, processes: int, context=None, depth: int = 4):
        self.context = context
        self.depth = max(1, depth)
        self.n_workers = 0
        self.restarts = 0  #: pools replaced after a worker died
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._warm: _Warm | None = None
        self._waiting: list[Future] = []
        self._foreign: list[Future] = []  # sent to the caller's executor, maybe not done
        self._use = _EXECUTOR.get()  #: the caller's executor, None: processes of our own
        self._tally = self._use  # counts the jobs, also after the executor failed
        if self._use is not None:
            self.n_workers = self._use.workers
            log.debug("Per-image work shared with the caller's executor")
            return
        wanted = _processes_wanted(processes)
        if wanted > 1:
            self._start(wanted - 1)

    def _start(self, n_workers: int) -> None:
        reason = _cannot_start()
        if reason:
            log.debug("Per-image work stays in this process: %s", reason)
            return
        self.n_workers = n_workers
        # Starting a worker waits for the fork server, which imports the package first
        # when it is new: a thread waits for it and then makes the pool; this one goes
        # on (its jobs run here meanwhile).
        self._warm = warm = _Warm(self, n_workers)
        warm.thread.start()
        log.debug("Per-image work shared with %d worker process(es)", self.n_workers)

    def _make_pool(self, warm: _Warm, n_workers: int) -> ProcessPoolExecutor | None:
        """The pool of ``warm`` (the server is up); None when closed meanwhile."""
        with self._lock:
            if self._warm is not warm:
                return None
            context = multiprocessing.get_context(START_METHOD)
            self._pool = ProcessPoolExecutor(
                n_workers, mp_context=context, initializer=_init_worker, initargs=(self.context,)
            )
            return self._pool

    def ready(self) -> bool:
        """Whether the workers have started (each has done a first job), or an executor
        was given."""
        if self._use is not None:
            return True
        warm = self._warm
        if warm is None or not warm.done.is_set():
            return False
        if isinstance(warm.error, MainScriptRunsStep):  # no worker can start: all here
            self._warm, self.n_workers = None, 0
            return False
        if warm.error is not None:  # a worker died as it started
            self._replace(self._pool, warm.error)
            return False
        return self._pool is not None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the workers have started (for tests and benchmarks); whether they have."""
        while (warm := self._warm) is not None:
            if not warm.done.wait(timeout):
                return False
            if self.ready():
                return True
            if self._warm is warm:  # closed meanwhile: no pool
                return False
        return self._use is not None

    def _replace(self, broken: ProcessPoolExecutor | None, err: BaseException) -> None:
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

    def _give_up(self, use: ExecutorUse, err: BaseException) -> None:
        """The caller's executor failed: its job and all later ones run here."""
        if self._use is use:
            self._use, self.n_workers = None, 0
            log.warning(
                "The executor of per-image work failed (%s: %s); its jobs and all "
                "others of this phase run here",
                type(err).__name__,
                err,
            )

    def _send(self, fn: Callable, args: tuple, n_jobs: int = 1) -> _Relay | None:
        """Start ``fn(context, *args)`` (``n_jobs`` jobs) in a worker; None when there are
        no workers."""
        use = self._use
        if use is not None:
            level = logging.getLogger(_PACKAGE_LOGGER).getEffectiveLevel()
            try:
                remote = use.executor.submit(
                    _foreign_job, _Job(fn, self.context, args), os.getpid(), level
                )
            except Exception as err:  # shut down, cannot pickle...: here from now on
                self._give_up(use, err)
                return None
            self._foreign = [f for f in self._foreign if not f.done()] + [remote]
            return _Relay(
                remote,
                fallback=lambda: self._run_here(fn, args),
                on_broken=lambda e: self._give_up(use, e),
                broken=(Exception,),  # the job's own errors come back as values
                count=lambda place: use.count(place, n_jobs),
            )
        while self._pool is not None:
            pool = self._pool
            try:
                remote = pool.submit(_in_worker, fn, args)
            except BrokenProcessPool as err:  # a worker died since the last job
                self._replace(pool, err)
                continue
            except RuntimeError:  # shut down meanwhile (closed by another thread)
                return None
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
            return [self._here(fn, args) for args in arglist]
        parts = min(self.n_workers + 1, len(arglist))
        shares = [arglist[k::parts] for k in range(parts)]
        remote = []
        for share in shares[1:]:
            relay = self._send(_each, (fn, share), n_jobs=len(share))
            if relay is not None:
                self._waiting.append(relay.remote)
            remote.append(relay or self._run_here(_each, (fn, share)))
        here = [self._here(fn, args) for args in shares[0]]
        results = [here] + [r.result() for r in remote]
        out = [None] * len(arglist)
        for k, part in enumerate(results):
            out[k::parts] = part
        return out

    def _here(self, fn, args):
        if self._tally is not None:
            self._tally.count(HERE, len(args[1]) if fn is _each else 1)
        return fn(self.context, *args)

    def _run_here(self, fn, args) -> Future:
        try:
            result = self._here(fn, args)
        except Exception as err:
            # made elsewhere: the error's traceback holds this frame, which must not hold
            # the future holding the error (a reference cycle keeps the caller's objects,
            # open files included, until a garbage collection)
            return _failed(err)
        future: Future = Future()
        future.set_result(result)
        return future

    def _stop(self) -> None:
        with self._lock:
            pool, warm, self._pool, self._warm = self._pool, self._warm, None, None
            self.n_workers = 0
        if pool is None:  # none made yet: the warm thread, if waiting for the server,
            return  # makes none and ends by itself; nothing to wait for
        try:
            pool.shutdown(wait=True, cancel_futures=True)
            warm.thread.join()
        except BaseException:  # an interrupt meanwhile: the workers still end first
            pool.shutdown(wait=True)
            warm.thread.join()
            raise

    def close(self) -> None:
        """Stop the workers (running jobs end; waiting ones are dropped).

        With a caller's executor (never shut down here): wait for the jobs sent to it,
        so that none runs on (writing an output) after the step has said what exists.
        """
        foreign, self._foreign, self._waiting = self._foreign, [], []
        if foreign:
            wait_all(foreign)
        self._stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _probe() -> None:
    """A first process of the fork server: it is up once this one starts."""


class _Warm:
    """Start the workers of ``owner`` in a thread (``thread``, started by the owner once
    this is its ``_warm``): wait for the fork server (a probe process), make the pool,
    and have each worker do a first job; ``done`` is set then (``error``: why one
    could not)."""

    def __init__(self, owner: Workers, n_workers: int):
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(owner, n_workers), name="roman_tweakreg-workers", daemon=True
        )

    def _run(self, owner: Workers, n_workers: int) -> None:
        try:
            if _server_seen_in != os.getpid():
                _probe_server()
            pool = owner._make_pool(self, n_workers)
            if pool is not None:
                for future in [pool.submit(_ready) for _ in range(n_workers)]:
                    future.result()
                log.debug("%d worker process(es) up", n_workers)
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

    When the worker died (an exception of ``broken`` from the worker's future), the
    job is done here (``fallback``) and ``on_broken`` is told, so that the pool is
    replaced or the executor given up.  ``count``: told where the job ran.
    """

    def __init__(
        self,
        remote: Future,
        fallback: Callable[[], Future],
        on_broken: Callable,
        broken: tuple = (BrokenProcessPool,),
        count: Callable | None = None,
    ):
        self.remote, self._fallback, self._on_broken = remote, fallback, on_broken
        self._broken, self._count = broken, count
        self._outcome: tuple | None = None

    def result(self):
        if self._outcome is None:
            try:
                ok, value, records, *place = self.remote.result()
            except self._broken as err:  # a worker died (killed, out of memory)
                self._on_broken(err)
                here = self._fallback()
                ok, value, records, place = here.exception() is None, None, [], []
                value = here.result() if ok else here.exception()
            for record in records:
                logger = logging.getLogger(record.name)
                if logger.isEnabledFor(record.levelno):  # as if logged here
                    logger.handle(record)
            if place and self._count is not None:
                self._count(place[0])
            self._outcome = (ok, value)
        ok, value = self._outcome
        if not ok:
            raise value
        return value


def _each(context, fn, arglist):
    return [fn(context, *args) for args in arglist]
