"""The spawner: the process that forks every per-run worker.

Forking main for each fired instance costs a copy of main's page tables, which grow with
the number of jobs configured (10,000 jobs: tens of milliseconds a fork, so 1,000 jobs
due in one second took most of a minute to start). The spawner is forked from main once,
early, while main is still small; main hands it the instances fired in each pass of its
loop over a pipe, in one message, each already pickled for its worker.

Workers are forked ahead of need. A cron daemon knows what is due next: main tells the
spawner how many jobs fire within the next ``PREPARE_AHEAD`` seconds, and the spawner
forks that many idle workers in its spare time. An idle worker waits on a pipe of its
own; when an instance fires, the spawner writes the instance to one idle worker and
closes the pipe, and the worker runs that instance and exits. So each fired instance
still gets exactly one process of its own, as the design asks, but a burst of 1,000
instances due in the same second costs 1,000 pipe writes when it comes, not 1,000 forks.
Idle workers beyond what is due are ended after ``IDLE_LINGER`` seconds unused; a
worker that finds its pipe closed with nothing in it simply exits.

An idle worker rehearses before it waits: it goes through the first steps of an instance
(unpickling a request, formatting its log line and history event, appending them to
``/dev/null``) and connects to the Manager. A forked worker shares every page with the
spawner, and each page it first writes (reference counts, allocator pools, interpreter
caches) the kernel copies then. A worker's first steps wrote about 180 such pages, most
of its start's CPU time, and its first Manager call (a connection, an authentication
and a thread in the Manager) 160 more; when 1,000 start at once, those copies and
connections are made while the workers wait, not in the burst. The cost is memory held
early: an idle worker has about 2.4 MB of its own instead of 1.2 MB.

The spawner owns its workers: it reaps them, reports each exit of a worker that had an
instance to main on the scheduler command queue as ``('exited', instance, exit_code)``,
and on SIGTERM (also sent to it if main dies) stops them all, SIGTERM then SIGKILL,
before it exits.
"""

import ctypes
import gc
import logging
import multiprocessing
import os
import pickle
import signal
import time
from collections import deque
from typing import Deque, Dict, NamedTuple, Optional, Set, Tuple

from saltpeter.constants import SHUTDOWN_GRACE

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
REAP_INTERVAL = 0.1          # seconds between looks for exited workers while idle
SPAWNER_PRIORITY_BOOST = 5   # the spawner runs this much less nice than its workers
PREPARE_AHEAD = 10.0         # main counts the jobs due within this many seconds
MIN_IDLE_WORKERS = 2         # always ready: a run-now or a lone due job starts at once
MAX_IDLE_WORKERS = 1000      # never more idle workers than this, whatever is due
IDLE_LINGER = 60.0           # an idle worker not needed for this long is ended
LOWEST_PRIORITY = 19         # niceness of a finished worker while it exits
FORK_RETRY_AFTER = 1.0       # a failed fork of an idle worker is retried this much later


class IdleWorker(NamedTuple):
    pid: int
    pipe: int           # write end: the assignment goes here, then it is closed
    since: float        # monotonic time it became idle


class Spawner:
    """Main's handle on the spawner process."""

    def __init__(self, ctx, run_instance, adopt_instance, rehearse=None):
        self.ctx = ctx
        self.run_instance = run_instance          # callable(ctx, job, instance)
        self.adopt_instance = adopt_instance      # callable(ctx, job, record)
        self.rehearse = rehearse                  # callable(ctx), or None
        self.process: Optional[multiprocessing.Process] = None
        self.requests = None
        self.queued = []
        self.prepared = None

    def start(self) -> None:
        receiver, self.requests = multiprocessing.Pipe(duplex=False)
        self.process = multiprocessing.Process(
            target=_spawner_main, name="spawner",
            args=(self.ctx, receiver, self.run_instance, self.adopt_instance, self.rehearse))
        self.process.start()
        receiver.close()
        self.prepared = None

    def run(self, job, instance: str) -> None:
        """Queue ``instance`` of ``job`` to start; ``start_queued`` sends the queue."""
        self.queued.append(assignment("run", job, instance))

    def start_queued(self) -> None:
        """Send every queued instance in one message: a burst of instances fired in one
        pass of main's loop reaches the workers at once, not spread over the time main
        takes to fire them (while the first workers already compete with it for CPU)."""
        if self.queued:
            batch, self.queued = self.queued, []
            self.requests.send(("assign", batch))
            self.prepared = None      # the spawner counted these off; say what is left

    def adopt(self, job, record: dict) -> None:
        self.requests.send(("assign", [assignment("adopt", job, record)]))

    def prepare(self, due_soon: int) -> None:
        """Tell the spawner that ``due_soon`` jobs fire within ``PREPARE_AHEAD`` s, so
        that it has as many idle workers ready by then (sent only when it changes)."""
        if due_soon == self.prepared:
            return
        try:
            self.requests.send(("prepare", due_soon))
            self.prepared = due_soon
        except (OSError, EOFError) as exc:
            log.warning("cannot tell the spawner what is due soon: %s", exc)

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def stop(self) -> None:
        """Stop the spawner and, through it, every worker; wait until all are gone."""
        if self.process is None:
            return
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(SHUTDOWN_GRACE + 2)
        if self.process.is_alive():
            log.warning("spawner did not stop in time; killing it")
            self.process.kill()
            self.process.join()


class _Pool:
    """The spawner's workers: idle ones waiting for an instance, busy ones running one."""

    def __init__(self, ctx, run_instance, adopt_instance, niceness: int, rehearse=None):
        self.ctx = ctx
        self.targets = {"run": run_instance, "adopt": adopt_instance}
        self.rehearse = rehearse
        self.niceness = niceness
        self.idle: Deque[IdleWorker] = deque()
        self.busy: Dict[int, str] = {}        # pid -> instance
        self.ending: Set[int] = set()         # idle workers told to exit, not reaped yet
        self.wanted_idle = MIN_IDLE_WORKERS
        self.wanted_since = time.monotonic()
        self.no_fork_until = 0.0              # after a failed fork, idle top-ups wait

    def can_top_up(self) -> bool:
        return len(self.idle) < self.wanted_idle and time.monotonic() >= self.no_fork_until

    def want(self, due_soon: int) -> None:
        wanted = min(max(due_soon, MIN_IDLE_WORKERS), MAX_IDLE_WORKERS)
        if wanted != self.wanted_idle:
            self.wanted_idle = wanted
            self.wanted_since = time.monotonic()

    def dispatch(self, instance: str, payload: bytes) -> None:
        """Hand one instance (``payload`` from ``assignment``) to an idle worker, a new
        one if none is ready."""
        # This instance was one of those due soon: no idle worker is forked again for it
        # (main says what is still due after its pass).
        self.wanted_idle = max(self.wanted_idle - 1, MIN_IDLE_WORKERS)
        while True:
            worker = self.idle.popleft() if self.idle else self.fork_idle()
            if worker is None:
                self.ctx.shared.scheduler_commands.put(("exited", instance, -1))
                return
            if _hand_over(worker, payload):
                self.busy[worker.pid] = instance
                return
            self.ending.add(worker.pid)   # it died while idle: reaped later; try the next

    def top_up(self) -> bool:
        """Fork one idle worker if fewer are ready than wanted; True if it did."""
        if not self.can_top_up():
            return False
        worker = self.fork_idle()
        if worker is None:
            self.no_fork_until = time.monotonic() + FORK_RETRY_AFTER
            return False
        self.idle.append(worker)
        return True

    def trim(self) -> None:
        """End idle workers beyond what is wanted once they have lingered unused."""
        now = time.monotonic()
        if now - self.wanted_since < IDLE_LINGER:
            return
        while len(self.idle) > self.wanted_idle and now - self.idle[0].since >= IDLE_LINGER:
            worker = self.idle.popleft()
            _close(worker.pipe)                 # it reads end-of-file and exits
            self.ending.add(worker.pid)

    def fork_idle(self) -> Optional[IdleWorker]:
        try:
            reader, writer = os.pipe()
        except OSError as exc:
            log.error("cannot make a pipe for a worker: %s", exc)
            return None
        try:
            pid = os.fork()
        except OSError as exc:
            log.error("cannot fork a worker: %s", exc)
            _close(reader)
            _close(writer)
            return None
        if pid:
            _close(reader)
            return IdleWorker(pid, writer, time.monotonic())
        _close(writer)
        for other in self.idle:
            _close(other.pipe)      # else an idle worker would keep another's pipe open
        self._worker_main(reader)

    def _worker_main(self, reader: int) -> None:
        """In the new worker: wait for one instance, run it, exit. Never returns."""
        code = 1
        instance = "(none yet)"
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _drop_priority_boost(self.niceness)
            self._rehearse()
            payload = _read_to_end(reader)
            if not payload:
                code = 0            # not needed any more, or the spawner is gone
            else:
                kind, job, detail = pickle.loads(payload)
                instance = _instance_of(kind, detail)
                multiprocessing.current_process().name = instance
                self.targets[kind](self.ctx, job, detail)
                code = 0
        except BaseException:
            log.exception("instance %s: worker failed", instance)
        finally:
            logging.shutdown()
            _yield_teardown()
            os._exit(code)

    def _rehearse(self) -> None:
        """Go through the first steps of an instance while idle (see the module's
        docstring); a failure here is logged and the worker waits all the same."""
        if self.rehearse is None:
            return
        try:
            self.rehearse(self.ctx)
        except Exception:
            log.exception("idle worker %d: rehearsal failed", os.getpid())

    def reap(self, block: bool) -> None:
        """Report every busy worker that has exited to main; forget idle ones that died."""
        while self.busy or self.idle or self.ending:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self.busy.clear()
                self.idle.clear()
                self.ending.clear()
                return
            if pid == 0:
                return
            self.ending.discard(pid)
            instance = self.busy.pop(pid, None)
            if instance is not None:
                self.ctx.shared.scheduler_commands.put(
                    ("exited", instance, os.waitstatus_to_exitcode(status)))
                continue
            for worker in self.idle:
                if worker.pid == pid:
                    log.warning("idle worker %d died (%s)", pid, status)
                    self.idle.remove(worker)
                    _close(worker.pipe)
                    break

    def stop(self) -> None:
        """End every worker: idle ones see their pipe closed; all get SIGTERM, then
        SIGKILL after ``SHUTDOWN_GRACE``."""
        while self.idle:
            worker = self.idle.popleft()
            _close(worker.pipe)
            self.ending.add(worker.pid)
        for pid in list(self.busy) + list(self.ending):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while (self.busy or self.ending) and time.monotonic() < deadline:
            self.reap(block=False)
            time.sleep(0.05)
        for pid, instance in list(self.busy.items()):
            log.warning("worker of %s did not stop in %ss; killing it", instance,
                        SHUTDOWN_GRACE)
            _signal(pid, signal.SIGKILL)
        for pid in self.ending:
            _signal(pid, signal.SIGKILL)
        self.reap(block=True)


def _spawner_main(ctx, requests, run_instance, adopt_instance, rehearse) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    _die_with_parent()
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    _boost_priority(niceness)
    pool = _Pool(ctx, run_instance, adopt_instance, niceness, rehearse)
    # Everything the spawner holds now is shared with each worker: kept out of the cyclic
    # collector's sweeps, so that a worker's collections do not write (and so copy) it.
    gc.freeze()
    while not stopping:
        # Requests first; forking idle workers only while none is waiting.
        try:
            ready = requests.poll(0 if pool.can_top_up() else REAP_INTERVAL)
        except (EOFError, OSError, InterruptedError):
            ready = False
        while ready and not stopping:
            try:
                kind, detail = requests.recv()
            except (EOFError, OSError):
                stopping.append("main gone")
                break
            if kind == "prepare":
                pool.want(detail)
            else:
                for instance, payload in detail:
                    pool.dispatch(instance, payload)
            ready = requests.poll(0)
        pool.reap(block=False)
        if not stopping and not pool.top_up():
            pool.trim()
    pool.stop()


def assignment(kind: str, job, detail) -> Tuple[str, bytes]:
    """What a worker is handed: ``run`` (detail: the instance) or ``adopt`` (detail: the
    instance's record) of ``job``, as ``(instance, pickled request)``. Main pickles it:
    the spawner only forwards the bytes, so a burst is not unpickled and pickled again
    on its way to the workers."""
    return (_instance_of(kind, detail),
            pickle.dumps((kind, job, detail), pickle.HIGHEST_PROTOCOL))


def _instance_of(kind: str, detail) -> str:
    """The instance a ``run`` (detail: the instance) or ``adopt`` (detail: its record)
    request is for."""
    return detail if kind == "run" else detail["instance"]


def _hand_over(worker: IdleWorker, payload: bytes) -> bool:
    """Write the whole assignment to an idle worker and close its pipe."""
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(worker.pipe, view):]
        return True
    except OSError:
        return False
    finally:
        _close(worker.pipe)


def _read_to_end(reader: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(reader, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    _close(reader)
    return b"".join(chunks)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _boost_priority(niceness: int) -> None:
    """Keep the spawner handing out instances while a burst of new workers competes for
    the CPU: the lowest real-time priority if allowed (it only ever sleeps in ``poll``,
    writes to pipes or forks), else a lower niceness, else nothing (an unprivileged
    daemon)."""
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
        return
    except (OSError, AttributeError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness - SPAWNER_PRIORITY_BOOST)
    except OSError:
        pass


def _drop_priority_boost(niceness: int) -> None:
    """A worker (and every job it launches) runs with the daemon's own priority."""
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (OSError, AttributeError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except OSError:
        pass


def _yield_teardown() -> None:
    """A finished worker exits at the lowest priority: the kernel's unmapping of its copy
    of the spawner's memory costs about as much as its fork, and when many instances
    start in the same second and some end at once, that must not delay the others'
    start. Everything of the instance is written by now."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, LOWEST_PRIORITY)
    except OSError:
        pass


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    """Get SIGTERM if main dies, so that no worker is left without its daemon."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
