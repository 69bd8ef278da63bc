"""The shared state, and the only code that reads or writes it.

The main process creates a ``multiprocessing.Manager``; its dicts are shared by every
process, which all fork from main and so inherit one ``Shared`` bundle:

- ``state[job_name]``: SPEC section 7 (group, targets, results; the schedule fields below
  are merged in on reading)
- ``schedule[job_name]``: ``{'next_run', 'last_run', 'overlap'}``, written by main alone,
  in one round trip for every job fired in a loop pass
- ``running[job_instance]``: SPEC section 7 (started, name, machines)
- ``liveness[job_instance]``: ``{machine: {'seen': bool, 'lost': bool}}``, written by the
  WebSocket server only when a machine's wrapper first reports or goes silent
- ``kills[job_instance]``: ``{machine: {'reason': str, 'at': epoch}}``: kill requests,
  so that the worker can record 124/143 itself if a killed wrapper never reports
- ``config``: ``{'crons': {...}, 'maintenance': {...}, 'serial': float}`` for the API
- ``access``: the API's users and read-only switch (kept out of ``config``, which is shown)

Output is not copied through the Manager at all: that of a machine still running is in
its spool file, the final ``ret`` of a finished one in the job's final-output file
(``saltpeter.spool.append_final_outputs``), and the read functions here put it into
``ret`` when someone asks. Nested values of a Manager dict are copies: every change here reads the
value, changes the copy and writes it back, under the job's lock, so two processes never
lose each other's writes.
"""

import logging
import multiprocessing
import queue
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Optional, Tuple

from saltpeter.constants import DEFAULT_RET_CAP, LOCK_POOL_SIZE
from saltpeter.spool import (append_final_outputs, load_final_outputs, read_tail,
                             remove_final_outputs, spool_path)

log = logging.getLogger(__name__)

SCHEDULE_FIELDS = ("next_run", "last_run", "overlap")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Shared:
    """Everything that crosses process boundaries. Built once in main, inherited by fork."""

    state: Any
    schedule: Any
    running: Any
    liveness: Any
    kills: Any
    config: Any
    access: Any
    locks: List[Any]
    scheduler_commands: Any            # multiprocessing.Queue: ('run', job_name)
    ws_commands: Any                   # CommandPipe: ('register', instance, job,
                                       # [machines]), ('forget', instance),
                                       # ('kill', instance, [machines], reason)
    statedir: str = ""
    ret_cap: int = DEFAULT_RET_CAP
    options: Dict[str, Any] = field(default_factory=dict)

    def job_lock(self, job_name: str):
        """The lock that guards ``state[job_name]`` and that job's ``running`` entries."""
        return self.locks[zlib.crc32(job_name.encode("utf-8", "replace")) % len(self.locks)]


class CommandPipe:
    """A command channel from many forked processes to one reader: a pipe and a lock.

    ``put`` writes in the caller, at once. A ``multiprocessing.Queue`` instead starts a
    feeder thread in every process that puts, which costs a short-lived per-run worker
    about as much as the rest of its start, and whose buffer is lost if the process ends
    with ``os._exit`` before the thread wrote it. The reader must keep reading (the
    WebSocket server does, in a thread): a writer blocks while the pipe is full.
    """

    def __init__(self):
        self._reader, self._writer = multiprocessing.Pipe(duplex=False)
        self._write_lock = multiprocessing.Lock()

    def put(self, item) -> None:
        with self._write_lock:
            self._writer.send(item)

    def get(self, block: bool = True, timeout: Optional[float] = None):
        """The next item; ``queue.Empty`` if none came within ``timeout`` (or at once,
        with ``block=False``)."""
        if not block or timeout is not None:
            if not self._reader.poll(timeout if block else 0):
                raise queue.Empty
        return self._reader.recv()

    def get_nowait(self):
        return self.get(block=False)


def make_shared(manager, statedir: str, ret_cap: int = DEFAULT_RET_CAP,
                options: Optional[Dict[str, Any]] = None) -> Shared:
    """Create the shared dicts, locks and queues on ``manager``."""
    return Shared(
        state=manager.dict(),
        schedule=manager.dict(),
        running=manager.dict(),
        liveness=manager.dict(),
        kills=manager.dict(),
        config=manager.dict({"crons": {}, "maintenance": {"global": False, "machines": []},
                             "serial": 0.0}),
        access=manager.dict({"read_only": False, "users": {}, "serial": 0.0}),
        # semaphores inherited by fork: no Manager round trip, and no Manager proxy (each
        # proxy costs every new process a connection to the Manager when it starts)
        locks=[multiprocessing.Lock() for _ in range(LOCK_POOL_SIZE)],
        scheduler_commands=multiprocessing.Queue(),
        ws_commands=CommandPipe(),
        statedir=statedir,
        ret_cap=ret_cap,
        options=dict(options or {}),
    )


def _empty_job_state(group: str) -> Dict[str, Any]:
    return {"group": group, "targets": [], "results": {}}


# ---------------------------------------------------------------- reading job state

def _assemble(shared: Shared, job_name: str, job_state: Optional[Dict[str, Any]],
              schedule: Optional[Dict[str, Any]], running: Dict[str, Any],
              with_output: bool = True) -> Optional[Dict[str, Any]]:
    """``state[job_name]`` as SPEC section 7 shows it: schedule fields merged in, the
    output so far of every machine still running read from its spool file, and the final
    output of every finished one read from where ``finish_machines`` keeps it. Without
    ``with_output``, every ``ret`` is left empty and no file is read."""
    if job_state is None and schedule is None:
        return None
    assembled = {"next_run": "", "last_run": "", "overlap": False, "group": "",
                 "targets": [], "results": {}}
    assembled.update(schedule or {})
    assembled.update(job_state or {})
    if not with_output:
        return assembled
    results = assembled["results"]
    finished = [machine for machine, result in results.items()
                if result.get("retcode", "") != "" and not result.get("ret")]
    if finished:
        outputs = load_final_outputs(shared.statedir, job_name)
        for machine in finished:
            results[machine]["ret"] = outputs.get(machine, "")
    for instance, entry in running.items():
        if entry.get("name") != job_name:
            continue
        for machine in entry.get("machines", ()):
            result = results.get(machine)
            if result is not None and result.get("retcode", "") == "":
                result["ret"] = live_output(shared, instance, machine)
    return assembled


def live_output(shared: Shared, instance: str, machine: str) -> str:
    """The output so far of a running machine: the capped tail of its spool file."""
    return read_tail(spool_path(shared.statedir, instance, machine), shared.ret_cap).text()


def get_job(shared: Shared, job_name: str,
            with_output: bool = True) -> Optional[Dict[str, Any]]:
    """A copy of ``state[job_name]`` as the API shows it, or None (every ``ret`` empty
    without ``with_output``)."""
    job_state = shared.state.get(job_name)
    schedule = shared.schedule.get(job_name)
    running = (shared.running.copy() if with_output and job_state and _has_running(job_state)
               else {})
    return _assemble(shared, job_name, job_state, schedule, running, with_output)


def _has_running(job_state: Dict[str, Any]) -> bool:
    return any(result.get("retcode", "") == ""
               for result in job_state.get("results", {}).values())


def state_snapshot(shared: Shared, with_output: bool = True) -> Dict[str, Any]:
    """A copy of all of ``state`` as the API shows it (``ret`` left empty everywhere
    without ``with_output``: what a job list or a status summary needs)."""
    states = shared.state.copy()
    schedules = shared.schedule.copy()
    running = shared.running.copy() if with_output else {}
    snapshot = {}
    for job_name in set(states) | set(schedules):
        snapshot[job_name] = _assemble(shared, job_name, states.get(job_name),
                                       schedules.get(job_name), running, with_output)
    return snapshot


def running_snapshot(shared: Shared) -> Dict[str, Any]:
    """A copy of all of ``running`` in one round trip."""
    return shared.running.copy()


def get_results(shared: Shared, job_name: str) -> Dict[str, Dict[str, Any]]:
    """The stored results of a job, without reading any output (``ret`` is empty)."""
    return (shared.state.get(job_name) or {}).get("results", {})


def get_result(shared: Shared, job_name: str, machine: str) -> Optional[Dict[str, Any]]:
    """The stored result of ``machine``, without reading its output (``ret`` is empty)."""
    job_state = shared.state.get(job_name)
    if not job_state:
        return None
    return job_state.get("results", {}).get(machine)


# ---------------------------------------------------------------- writing job state

def update_schedule(shared: Shared, updates: Dict[str, Dict[str, Any]]) -> None:
    """Set schedule fields (``next_run``, ``last_run``, ``overlap``) of many jobs in one
    round trip. ``updates`` maps job names to their complete schedule fields; only main
    writes here."""
    if updates:
        shared.schedule.update(updates)


def update_job(shared: Shared, job_name: str, group: str = "", **fields: Any) -> None:
    """Set other top-level fields of ``state[job_name]`` (creating it if needed)."""
    with shared.job_lock(job_name):
        job_state = shared.state.get(job_name) or _empty_job_state(group)
        if group:
            job_state["group"] = group
        job_state.update(fields)
        shared.state[job_name] = job_state


def remove_job(shared: Shared, job_name: str) -> None:
    """Forget a job that left the config (its running instances keep their entries)."""
    with shared.job_lock(job_name):
        shared.state.pop(job_name, None)
        remove_final_outputs(shared.statedir, job_name)
    shared.schedule.pop(job_name, None)


def init_results(shared: Shared, job_name: str, group: str, machines: Iterable[str],
                 starttime: datetime) -> None:
    """Start a run: ``targets`` and one empty result per machine (retcode ``''``); the
    final outputs of the job's previous run are dropped with its results."""
    machines = list(machines)
    with shared.job_lock(job_name):
        remove_final_outputs(shared.statedir, job_name)
        job_state = shared.state.get(job_name) or _empty_job_state(group)
        job_state["group"] = group or job_state.get("group", "")
        job_state["targets"] = machines
        job_state["results"] = {
            machine: {"starttime": starttime, "endtime": "", "ret": "", "retcode": ""}
            for machine in machines
        }
        shared.state[job_name] = job_state


# ---------------------------------------------------------------- running instances

def start_instance(shared: Shared, job_name: str, instance: str, machines: Iterable[str],
                   started: datetime) -> None:
    with shared.job_lock(job_name):
        shared.running[instance] = {"started": started, "name": job_name,
                                    "machines": list(machines)}


def set_instance_machines(shared: Shared, job_name: str, instance: str,
                          machines: Iterable[str]) -> None:
    with shared.job_lock(job_name):
        entry = shared.running.get(instance)
        if entry is None:
            return
        entry["machines"] = list(machines)
        shared.running[instance] = entry


def end_instance(shared: Shared, job_name: str, instance: str) -> None:
    with shared.job_lock(job_name):
        shared.running.pop(instance, None)
    shared.liveness.pop(instance, None)
    shared.kills.pop(instance, None)


def instance_machines(shared: Shared, instance: str) -> List[str]:
    """Machines of ``instance`` whose result is not final yet ([] if it is not running)."""
    entry = shared.running.get(instance)
    return list(entry["machines"]) if entry else []


def instances_of(shared: Shared, job_name: str) -> List[str]:
    """The running instances of ``job_name``."""
    return [instance for instance, entry in shared.running.items()
            if entry.get("name") == job_name]


FinalResult = Tuple[str, str, int, Optional[str], datetime]   # instance, machine, code, ret, end


def finish_machines(shared: Shared, job_name: str, finals: List[FinalResult]) -> List[str]:
    """Record several final results of one job and take those machines out of
    ``running``, with one read and one write of the job's state.

    A machine whose result is already final (the WebSocket server and the worker may
    race: the first one wins) is skipped. Returns the machines recorded here. ``ret``,
    when given, is the final output: kept in the job's final-output file (see
    ``saltpeter.spool``), not in the job's state, which is copied whole through the
    Manager on every read and write; if the file cannot be written, it is kept in the
    state after all.
    """
    recorded = []
    outputs: Dict[str, str] = {}
    with shared.job_lock(job_name):
        entries: Dict[str, Any] = {}
        job_state = None
        for instance, machine, retcode, ret, endtime in finals:
            if instance not in entries:
                entries[instance] = shared.running.get(instance)
            entry = entries[instance]
            if entry is None or machine not in entry["machines"]:
                continue
            entry["machines"] = [m for m in entry["machines"] if m != machine]
            if job_state is None:
                job_state = shared.state.get(job_name) or _empty_job_state("")
            result = job_state.setdefault("results", {}).setdefault(
                machine, {"starttime": endtime, "endtime": "", "ret": "", "retcode": ""})
            result["retcode"] = int(retcode)
            result["endtime"] = endtime
            if ret is not None:
                result["ret"] = ""
                outputs[machine] = ret
            recorded.append(machine)
        if recorded:
            _keep_final_outputs(shared, job_name, outputs, job_state)
            shared.state[job_name] = job_state
            shared.running.update({instance: entry for instance, entry in entries.items()
                                   if entry is not None})
    return recorded


def _keep_final_outputs(shared: Shared, job_name: str, outputs: Dict[str, str],
                        job_state: Dict[str, Any]) -> None:
    """Append ``{machine: ret}`` to the job's final-output file; if that fails, put each
    ``ret`` into ``job_state`` instead, so that nothing is lost."""
    try:
        append_final_outputs(shared.statedir, job_name, outputs)
    except OSError as exc:
        log.error("job %s: cannot write the final output of %d machine(s) (%s); keeping "
                  "it in the shared state", job_name, len(outputs), exc)
        for machine, ret in outputs.items():
            job_state["results"][machine]["ret"] = ret


def finish_machine(shared: Shared, job_name: str, instance: str, machine: str,
                   retcode: int, ret: Optional[str] = None,
                   endtime: Optional[datetime] = None) -> bool:
    """``finish_machines`` for one machine: True if this call made the result final."""
    return bool(finish_machines(shared, job_name,
                                [(instance, machine, retcode, ret, endtime or utcnow())]))


# ---------------------------------------------------------------- liveness and kills

def publish_liveness(shared: Shared, updates: Dict[str, Dict[str, Dict[str, Any]]]) -> None:
    """Merge ``{instance: {machine: info}}`` into ``liveness``. Only the WebSocket server
    writes here, so no lock is needed."""
    for instance, machines in updates.items():
        current = shared.liveness.get(instance) or {}
        current.update(machines)
        shared.liveness[instance] = current


def get_liveness(shared: Shared, instance: str) -> Dict[str, Dict[str, Any]]:
    return shared.liveness.get(instance) or {}


def request_kill(shared: Shared, job_name: str, instance: str, machines: Iterable[str],
                 reason: str, at: float) -> List[str]:
    """Ask the wrappers of ``machines`` of ``instance`` to stop. Returns the machines
    that were still running and so were asked."""
    with shared.job_lock(job_name):
        still_running = set(instance_machines(shared, instance))
        targets = [m for m in machines if m in still_running]
        if not targets:
            return []
        kills = shared.kills.get(instance) or {}
        for machine in targets:
            kills.setdefault(machine, {"reason": reason, "at": at})
        shared.kills[instance] = kills
    shared.ws_commands.put(("kill", instance, targets, reason))
    return targets


def get_kills(shared: Shared, instance: str) -> Dict[str, Dict[str, Any]]:
    return shared.kills.get(instance) or {}


# ---------------------------------------------------------------- config for the API

def publish_config(shared: Shared, crons: Dict[str, Any], maintenance: Dict[str, Any],
                   serial: float) -> None:
    shared.config.update({"crons": crons, "maintenance": maintenance, "serial": serial})


def get_config(shared: Shared) -> Dict[str, Any]:
    return dict(shared.config)


def get_maintenance(shared: Shared) -> Dict[str, Any]:
    """The maintenance settings alone (``get_config`` would copy every job as well: a
    round trip of the whole config through the Manager for each fired instance)."""
    return shared.config.get("maintenance") or {}


def config_serial(shared: Shared) -> float:
    """The config's serial alone: cheap to poll, where ``get_config`` copies every job."""
    return shared.config.get("serial", 0.0)


def publish_access(shared: Shared, access: Dict[str, Any], serial: float) -> None:
    """API access control from the config; kept apart from ``config``, which the API
    shows to everyone, because it holds password hashes."""
    shared.access.update({"read_only": bool(access.get("read_only")),
                          "users": dict(access.get("users") or {}), "serial": serial})


def get_access(shared: Shared) -> Dict[str, Any]:
    return dict(shared.access)
