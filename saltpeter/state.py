"""The shared state, and the only code that reads or writes it.

The main process creates a ``multiprocessing.Manager``; its dicts are shared by every
process, which all fork from main and so inherit one ``Shared`` bundle:

- ``state[job_name]``: SPEC section 7 (next_run, last_run, overlap, group, targets, results)
- ``running[job_instance]``: SPEC section 7 (started, name, machines)
- ``liveness[job_instance]``: ``{machine: {'last_seen': epoch, 'connected': bool, 'pid': int}}``
  written by the WebSocket server in batches, read by the per-run worker
- ``kills[job_instance]``: ``{machine: {'reason': str, 'at': epoch}}``: kill requests,
  so that the worker can record 124/143 itself if a killed wrapper never reports
- ``config``: ``{'crons': {...}, 'maintenance': {...}, 'serial': float}`` for the API

Nested values of a Manager dict are copies: every change here reads the value, changes
the copy and writes it back, under the job's lock, so two processes never lose each
other's writes.
"""

import logging
import multiprocessing
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Optional

from saltpeter.constants import DEFAULT_RET_CAP, LOCK_POOL_SIZE

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Shared:
    """Everything that crosses process boundaries. Built once in main, inherited by fork."""

    state: Any
    running: Any
    liveness: Any
    kills: Any
    config: Any
    access: Any                        # API access control: read_only, users, serial
    locks: List[Any]
    scheduler_commands: Any            # multiprocessing.Queue: ('run', job_name)
    ws_commands: Any                   # multiprocessing.Queue: ('register', instance, job,
                                       # [machines]), ('forget', instance),
                                       # ('kill', instance, [machines], reason)
    statedir: str = ""
    ret_cap: int = DEFAULT_RET_CAP
    options: Dict[str, Any] = field(default_factory=dict)

    def job_lock(self, job_name: str):
        """The lock that guards ``state[job_name]`` and that job's ``running`` entries."""
        return self.locks[zlib.crc32(job_name.encode("utf-8", "replace")) % len(self.locks)]


def make_shared(manager, statedir: str, ret_cap: int = DEFAULT_RET_CAP,
                options: Optional[Dict[str, Any]] = None) -> Shared:
    """Create the shared dicts, locks and queues on ``manager``."""
    return Shared(
        state=manager.dict(),
        running=manager.dict(),
        liveness=manager.dict(),
        kills=manager.dict(),
        config=manager.dict({"crons": {}, "maintenance": {"global": False, "machines": []},
                             "serial": 0.0}),
        access=manager.dict({"read_only": False, "users": {}, "serial": 0.0}),
        locks=[manager.Lock() for _ in range(LOCK_POOL_SIZE)],
        scheduler_commands=multiprocessing.Queue(),
        ws_commands=multiprocessing.Queue(),
        statedir=statedir,
        ret_cap=ret_cap,
        options=dict(options or {}),
    )


def _empty_job_state(group: str) -> Dict[str, Any]:
    return {"next_run": "", "last_run": "", "overlap": False, "group": group,
            "targets": [], "results": {}}


# ---------------------------------------------------------------- job state

def get_job(shared: Shared, job_name: str) -> Optional[Dict[str, Any]]:
    """A copy of ``state[job_name]``, or None."""
    return shared.state.get(job_name)


def update_job(shared: Shared, job_name: str, group: str = "", **fields: Any) -> None:
    """Set top-level fields of ``state[job_name]`` (creating it if needed)."""
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


def init_results(shared: Shared, job_name: str, group: str, machines: Iterable[str],
                 starttime: datetime) -> None:
    """Start a run: ``targets`` and one empty result per machine (retcode ``''``)."""
    machines = list(machines)
    with shared.job_lock(job_name):
        job_state = shared.state.get(job_name) or _empty_job_state(group)
        job_state["targets"] = machines
        job_state["results"] = {
            machine: {"starttime": starttime, "endtime": "", "ret": "", "retcode": ""}
            for machine in machines
        }
        shared.state[job_name] = job_state


def set_live_output(shared: Shared, job_name: str, rets: Dict[str, str]) -> None:
    """Write the output so far of several machines of one job in one round trip.

    Machines whose result is already final are left alone.
    """
    with shared.job_lock(job_name):
        job_state = shared.state.get(job_name)
        if not job_state:
            return
        results = job_state.setdefault("results", {})
        changed = False
        for machine, ret in rets.items():
            result = results.get(machine)
            if result is None or result.get("retcode", "") != "":
                continue
            result["ret"] = ret
            changed = True
        if changed:
            shared.state[job_name] = job_state


def mark_started(shared: Shared, job_name: str, machine: str, starttime: datetime) -> None:
    """Record when the command really started on ``machine``."""
    with shared.job_lock(job_name):
        job_state = shared.state.get(job_name)
        if not job_state:
            return
        result = job_state.setdefault("results", {}).get(machine)
        if result is None or result.get("retcode", "") != "":
            return
        result["starttime"] = starttime
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


def is_running(shared: Shared, job_name: str) -> bool:
    return bool(instances_of(shared, job_name))


def finish_machine(shared: Shared, job_name: str, instance: str, machine: str,
                   retcode: int, ret: Optional[str] = None,
                   endtime: Optional[datetime] = None) -> bool:
    """Record the final result of ``machine`` and take it out of ``running``.

    Returns True for the one caller that made the result final, False if it already was
    (the WebSocket server and the worker may race: the first one wins).
    ``ret`` replaces the output so far when given.
    """
    endtime = endtime or utcnow()
    with shared.job_lock(job_name):
        entry = shared.running.get(instance)
        if entry is None or machine not in entry["machines"]:
            return False
        entry["machines"] = [m for m in entry["machines"] if m != machine]
        job_state = shared.state.get(job_name) or _empty_job_state("")
        result = job_state.setdefault("results", {}).setdefault(
            machine, {"starttime": endtime, "endtime": "", "ret": "", "retcode": ""})
        result["retcode"] = int(retcode)
        result["endtime"] = endtime
        if ret is not None:
            result["ret"] = ret
        shared.state[job_name] = job_state
        shared.running[instance] = entry
    return True


def get_result(shared: Shared, job_name: str, machine: str) -> Optional[Dict[str, Any]]:
    job_state = shared.state.get(job_name)
    if not job_state:
        return None
    return job_state.get("results", {}).get(machine)


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


def publish_access(shared: Shared, access: Dict[str, Any], serial: float) -> None:
    """API access control from the config; kept apart from ``config``, which the API
    shows to everyone, because it holds password hashes."""
    shared.access.update({"read_only": bool(access.get("read_only")),
                          "users": dict(access.get("users") or {}), "serial": serial})


def get_access(shared: Shared) -> Dict[str, Any]:
    return dict(shared.access)


def config_serial(shared: Shared) -> float:
    """The config's serial alone: cheap to poll, where ``get_config`` copies every job."""
    return shared.config.get("serial", 0.0)


def running_snapshot(shared: Shared) -> Dict[str, Any]:
    """A copy of all of ``running`` in one round trip."""
    return shared.running.copy()


def state_snapshot(shared: Shared) -> Dict[str, Any]:
    """A copy of all of ``state`` in one round trip."""
    return shared.state.copy()
