"""The spawner: the process that forks every per-run worker.

Forking main for each fired instance costs a copy of main's page tables, which grow with
the number of jobs configured (10,000 jobs: tens of milliseconds a fork, so 1,000 jobs
due in one second took most of a minute to start). The spawner is forked from main once,
early, while main is still small; main hands it ``(job, instance)`` over a pipe, and it
forks a worker per instance. Each worker is still one process per fired instance, as the
design asks, and starts in about a millisecond.

The spawner owns its workers: it reaps them, reports each exit to main on the scheduler
command queue as ``('exited', instance, exit_code)``, and on SIGTERM (also sent to it if
main dies) stops them all, SIGTERM then SIGKILL, before it exits.
"""

import ctypes
import logging
import multiprocessing
import os
import signal
import time
from typing import Dict, Optional

from saltpeter.constants import SHUTDOWN_GRACE

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
REAP_INTERVAL = 0.1          # seconds between looks for exited workers while idle
SPAWNER_PRIORITY_BOOST = 5   # the spawner runs this much less nice than its workers


class Spawner:
    """Main's handle on the spawner process."""

    def __init__(self, ctx, run_instance, adopt_instance):
        self.ctx = ctx
        self.run_instance = run_instance          # callable(ctx, job, instance)
        self.adopt_instance = adopt_instance      # callable(ctx, job, record)
        self.process: Optional[multiprocessing.Process] = None
        self.requests = None

    def start(self) -> None:
        receiver, self.requests = multiprocessing.Pipe(duplex=False)
        self.process = multiprocessing.Process(
            target=_spawner_main, name="spawner",
            args=(self.ctx, receiver, self.run_instance, self.adopt_instance))
        self.process.start()
        receiver.close()

    def run(self, job, instance: str) -> None:
        self.requests.send(("run", job, instance))

    def adopt(self, job, record: dict) -> None:
        self.requests.send(("adopt", job, record))

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


def _spawner_main(ctx, requests, run_instance, adopt_instance) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    _die_with_parent()
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    _boost_priority(niceness)
    workers: Dict[int, str] = {}          # pid -> instance
    while not stopping:
        try:
            ready = requests.poll(REAP_INTERVAL)
        except (EOFError, OSError, InterruptedError):
            ready = False
        while ready and not stopping:
            try:
                kind, job, detail = requests.recv()
            except (EOFError, OSError):
                stopping.append("main gone")
                break
            instance = detail if kind == "run" else detail["instance"]
            target = run_instance if kind == "run" else adopt_instance
            pid = _fork_worker(ctx, target, job, detail, instance, niceness)
            if pid:
                workers[pid] = instance
            ready = requests.poll(0)
        _reap(ctx, workers, block=False)
    _stop_workers(ctx, workers)


def _fork_worker(ctx, target, job, detail, instance: str, niceness: int) -> Optional[int]:
    """Fork one worker running ``target(ctx, job, detail)``; its pid (None on failure).

    A plain fork, not ``multiprocessing.Process``: that one re-registers every Manager
    proxy in the child, a connection to the Manager each, which made 1,000 workers
    started in the same second queue for most of a minute. The spawner uses no proxy and
    runs no thread, so the child can open its own connections when it needs them.
    """
    try:
        pid = os.fork()
    except OSError as exc:
        log.error("instance %s: cannot fork its worker: %s", instance, exc)
        ctx.shared.scheduler_commands.put(("exited", instance, -1))
        return None
    if pid:
        return pid
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _drop_priority_boost(niceness)
        multiprocessing.current_process().name = instance
        target(ctx, job, detail)
        code = 0
    except BaseException:
        log.exception("instance %s: worker failed", instance)
    finally:
        logging.shutdown()
        os._exit(code)


def _reap(ctx, workers: Dict[int, str], block: bool) -> None:
    """Report every worker that has exited to main."""
    while workers:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            workers.clear()
            return
        if pid == 0:
            return
        instance = workers.pop(pid, None)
        if instance is not None:
            ctx.shared.scheduler_commands.put(("exited", instance,
                                               os.waitstatus_to_exitcode(status)))


def _stop_workers(ctx, workers: Dict[int, str]) -> None:
    for pid in list(workers):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_GRACE
    while workers and time.monotonic() < deadline:
        _reap(ctx, workers, block=False)
        time.sleep(0.05)
    for pid, instance in list(workers.items()):
        log.warning("worker of %s did not stop in %ss; killing it", instance, SHUTDOWN_GRACE)
        _signal(pid, signal.SIGKILL)
    _reap(ctx, workers, block=True)


def _boost_priority(niceness: int) -> None:
    """Keep the spawner forking while a burst of new workers competes for the CPU: the
    lowest real-time priority if allowed (it only ever sleeps in ``poll`` or forks), else
    a lower niceness, else nothing (an unprivileged daemon)."""
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
