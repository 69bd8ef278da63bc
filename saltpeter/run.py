"""The per-run worker: one process per fired job instance.

``run()`` resolves the targets, applies maintenance and ``number_of_targets``, then for each
batch launches the wrapper through the executor and waits in
``processresults_websocket()`` (or runs the legacy ``processresults()`` for ``--legacy``
and ``use_wrapper: false``). The worker owns its instance's lifecycle: the ``running``
entry, the log lines, and the results nobody else can give (124, 253, 255).
"""

import json
import logging
import pickle
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, List, Optional

from saltpeter import state as shared_state
from saltpeter.config import Job
from saltpeter.constants import (HEARTBEAT_LOSS_AFTER, KILL_REPORT_WAIT, RETCODE_HEARTBEAT_LOST,
                                 RETCODE_KILLED, RETCODE_NO_RESPONSE, RETCODE_TIMEOUT,
                                 WORKER_POLL_INTERVAL)
from saltpeter.executors import ExecutorError
from saltpeter.joblog import JobLog
from saltpeter.records import remove_instance_record, save_instance
from saltpeter.spool import load_result, remove_instance, spool_path

log = logging.getLogger(__name__)

KILL_RETCODES = {"timeout": RETCODE_TIMEOUT, "user": RETCODE_KILLED}
# Liveness (judged by the WebSocket server) and kill requests are read this often;
# finished machines are looked for every WORKER_POLL_INTERVAL while results come in, and
# less often (doubling up to LIVENESS_CHECK_INTERVAL) while none do: each look copies the
# instance's whole machine list out of the Manager (10,000 names in a fleet).
LIVENESS_CHECK_INTERVAL = 1.0


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class RunContext:
    """What a worker needs, handed over by the scheduler at fork time."""

    shared: object
    executor: object
    joblog: JobLog
    websocket_url: str
    connect_deadline: float
    legacy: bool = False
    token_for: Optional[object] = None      # callable(instance) -> secret, or None
    wrapper_options: Dict[str, str] = field(default_factory=dict)


class InstanceRecord:
    """The on-disk record of a running instance (see ``saltpeter.records``), kept in step
    with what the worker has done, so a restarted daemon can adopt the instance."""

    def __init__(self, ctx: RunContext, job, instance: str, started: datetime,
                 data: Optional[Dict] = None):
        self.statedir = ctx.shared.statedir
        self.on_disk = data is not None      # as ``data`` says (an adopted instance's)
        self.data = data or {"instance": instance, "job_name": job.name, "group": job.group,
                             "job": job.raw, "started": started.isoformat(),
                             "targets": [], "todo": [], "launched": {}, "logged": [],
                             "legacy": ctx.legacy or not job.use_wrapper}

    def save(self, **changes) -> None:
        """Apply ``changes`` and write the record, unless it is on disk already as it
        would be written (an instance with no targets changes nothing when they are
        chosen: every write is a new file, and 1,000 instances at once contend for
        the directory)."""
        if self.on_disk and all(self.data.get(key) == value for key, value in changes.items()):
            return
        self.data.update(changes)
        try:
            save_instance(self.statedir, self.data)
            self.on_disk = True
        except OSError as exc:
            self.on_disk = False
            log.error("instance %s: cannot write its record: %s", self.data["instance"], exc)

    def launched(self, times: Dict[str, float]) -> None:
        launched = dict(self.data["launched"], **times)
        todo = [m for m in self.data["todo"] if m not in times]
        self.save(launched=launched, todo=todo)

    def logged(self, machines: List[str]) -> None:
        """Note that the results of ``machines`` are in the log file (one write for all)."""
        new = [m for m in machines if m not in self.data["logged"]]
        if new:
            self.save(logged=self.data["logged"] + new)


def run(ctx: RunContext, job, instance: str) -> None:
    """Run one instance of ``job`` on its targets and record every result."""
    shared = ctx.shared
    started = utcnow()
    ctx.joblog.start(job.name, job.group, instance, started)
    record = InstanceRecord(ctx, job, instance, started)
    record.save()
    shared_state.start_instance(shared, job.name, instance, [], started)
    try:
        machines = _choose_targets(ctx, job, instance, started)
        record.save(targets=machines, todo=list(machines))
        _run_batches(ctx, job, instance, machines, record)
    except Exception:
        log.exception("instance %s: run failed", instance)
        _fail_unfinished(ctx, job, instance)
    finally:
        _end(ctx, job, instance)


def rehearse(ctx: RunContext) -> None:
    """What an idle worker does before its instance comes: the first steps of ``run()``
    on a made-up job, with nothing written anywhere, and its connection to the Manager
    (see ``saltpeter.spawner``)."""
    job = Job(name="rehearsal", group="", min="*", hour="*", dom="*", mon="*", dow="*",
              command="true", raw={"command": "true"})
    pickle.loads(pickle.dumps(("run", job, "rehearsal_0"), pickle.HIGHEST_PROTOCOL))
    ctx.joblog.rehearse()
    shared_state.config_serial(ctx.shared)     # connects to the Manager


def _run_batches(ctx: RunContext, job, instance: str, machines: List[str],
                 record: InstanceRecord) -> None:
    if not machines:
        return
    use_legacy = ctx.legacy or not job.use_wrapper
    batch_size = job.batch_size or len(machines)
    for first in range(0, len(machines), batch_size):
        batch = machines[first:first + batch_size]
        if use_legacy:
            processresults(ctx, job, instance, batch)
        else:
            launched = _launch(ctx, job, instance, batch)
            record.launched(launched)
            processresults_websocket(ctx, job, instance, batch, launched, record)


def _end(ctx: RunContext, job, instance: str) -> None:
    shared = ctx.shared
    ctx.joblog.finished(job.name, job.group, instance, utcnow())
    shared_state.end_instance(shared, job.name, instance)
    shared.ws_commands.put(("forget", instance))
    remove_instance(shared.statedir, instance)
    remove_instance_record(shared.statedir, instance)
    log.info("instance %s: finished", instance)


def adopt(ctx: RunContext, job, record_data: Dict) -> None:
    """Carry on with an instance that a previous daemon run started: record the results
    that arrived before the restart, wait for the wrappers still running to reconnect and
    finish, then run the batches not launched yet."""
    shared = ctx.shared
    instance = record_data["instance"]
    started = datetime.fromisoformat(record_data["started"])
    record = InstanceRecord(ctx, job, instance, started, record_data)
    logged = set(record_data.get("logged", ()))
    launched = {m: t for m, t in record_data.get("launched", {}).items() if m not in logged}
    todo = [m for m in record_data.get("todo", []) if m not in logged]
    unfinished = list(launched) + todo
    log.info("instance %s: adopted after a restart; waiting for %s", instance,
             ", ".join(unfinished) or "nothing")
    shared_state.start_instance(shared, job.name, instance, unfinished, started)
    shared_state.init_results(shared, job.name, job.group, unfinished, started)
    if record_data.get("legacy"):
        # cmd.run returns went to the previous daemon's Salt client: nothing can bring
        # them back, and running the command again could do the work twice
        for machine in unfinished:
            _record(ctx, job, instance, machine, RETCODE_NO_RESPONSE,
                    "[saltpeter] the daemon restarted while this legacy (cmd.run) job ran "
                    "here; its result is unknown and it was not run again\n")
        _end(ctx, job, instance)
        return
    shared.ws_commands.put(("register", instance, job.name, list(launched)))
    try:
        for machine in list(launched):
            result = load_result(shared.statedir, instance, machine)
            if result is not None:
                shared_state.finish_machine(
                    shared, job.name, instance, machine, result["retcode"],
                    ret=shared_state.live_output(shared, instance, machine),
                    endtime=datetime.fromisoformat(result["endtime"]))
        now = time.time()
        # the wrappers get a full connect deadline from now to come back
        processresults_websocket(ctx, job, instance, list(launched),
                                 {m: now for m in launched}, record,
                                 batch_start=min(launched.values(), default=now),
                                 never_connected_code=RETCODE_HEARTBEAT_LOST)
        _run_batches(ctx, job, instance, todo, record)
    except Exception:
        log.exception("instance %s: adopting it failed", instance)
        _fail_unfinished(ctx, job, instance)
    finally:
        _end(ctx, job, instance)


def _fail_unfinished(ctx: RunContext, job, instance: str) -> None:
    """After a bug in the worker: every machine without a result gets 255, not silence."""
    for machine in shared_state.instance_machines(ctx.shared, instance):
        _record(ctx, job, instance, machine, RETCODE_NO_RESPONSE,
                "[saltpeter] run failed inside the daemon; see its log\n")


def _choose_targets(ctx: RunContext, job, instance: str, started: datetime) -> List[str]:
    """Resolve, filter and initialise the targets. Returns the machines to run on; the
    ones that did not respond are already recorded as 255."""
    shared = ctx.shared
    try:
        responding, silent = ctx.executor.resolve_targets(job)
    except ExecutorError as exc:
        # Salt is down: the machines we know of (listed, or those of the last run) get
        # 255 with the reason, so the failure shows where people look.
        log.error("instance %s: cannot resolve targets %r: %s", instance, job.targets, exc)
        known = _known_targets(shared, job)
        shared_state.init_results(shared, job.name, job.group, known, started)
        shared_state.set_instance_machines(shared, job.name, instance, known)
        for machine in known:
            _record(ctx, job, instance, machine, RETCODE_NO_RESPONSE,
                    "[saltpeter] cannot reach the targets: %s\n" % exc)
        if not known:
            ctx.joblog.no_targets(job.name, job.group, instance, started)
        return []
    maintenance = shared_state.get_maintenance(shared)
    in_maintenance = set(maintenance.get("machines") or [])
    for machine in sorted(in_maintenance & set(responding + silent)):
        log.warning("instance %s machine %s: Target under maintenance", instance, machine)
    responding = [m for m in responding if m not in in_maintenance]
    silent = [m for m in silent if m not in in_maintenance]
    if job.number_of_targets and len(responding) > job.number_of_targets:
        responding = sorted(random.sample(responding, job.number_of_targets))
    targets = responding + silent
    if not targets:
        ctx.joblog.no_targets(job.name, job.group, instance, started)
        shared_state.init_results(shared, job.name, job.group, [], started)
        return []
    shared_state.init_results(shared, job.name, job.group, targets, started)
    shared_state.set_instance_machines(shared, job.name, instance, targets)
    for machine in silent:
        _record(ctx, job, instance, machine, RETCODE_NO_RESPONSE, "Target did not respond")
    return responding


def _known_targets(shared, job) -> List[str]:
    """The machines a job is known to run on without asking Salt: an explicit list, or
    the targets of its last run."""
    if job.target_type == "list":
        listed = job.targets if isinstance(job.targets, list) else str(job.targets).split(",")
        return sorted({name.strip() for name in listed if name.strip()})
    previous = shared_state.get_job(shared, job.name, with_output=False) or {}
    return list(previous.get("targets") or [])


def _launch(ctx: RunContext, job, instance: str, machines: List[str]) -> Dict[str, float]:
    """Start the wrapper on ``machines``; returns {machine: launch time} of those started
    (the others are recorded as 255 here)."""
    shared = ctx.shared
    shared.ws_commands.put(("register", instance, job.name, list(machines)))
    env = {
        "SP_WEBSOCKET_URL": job.websocket_url or ctx.websocket_url,
        "SP_JOB_NAME": job.name,
        "SP_JOB_INSTANCE": instance,
        "SP_COMMAND": job.command,
        "SP_CONNECT_TIMEOUT": str(int(ctx.connect_deadline)),
    }
    if job.cwd:
        env["SP_CWD"] = job.cwd
    if job.user:
        env["SP_USER"] = job.user
    if job.env:
        env["SP_ENV"] = json.dumps({str(k): str(v) for k, v in job.env.items()})
    if ctx.token_for is not None:
        env["SP_TOKEN"] = ctx.token_for(instance)
    env.update(ctx.wrapper_options)
    ctx.joblog.machine_starts(job.name, job.group, instance, machines, utcnow())
    try:
        failures = ctx.executor.launch(job, instance, machines, env)
    except ExecutorError as exc:
        failures = {machine: str(exc) for machine in machines}
    launched = {}
    for machine in machines:
        reason = failures.get(machine, "no answer from the executor")
        if reason is None:
            launched[machine] = time.time()
        else:
            log.error("instance %s machine %s: wrapper not started: %s", instance, machine,
                      reason)
            _record(ctx, job, instance, machine, RETCODE_NO_RESPONSE,
                    "Wrapper execution failed:\n%s" % reason)
    return launched


def _record(ctx: RunContext, job, instance: str, machine: str, retcode: int,
            note: str) -> bool:
    """Make ``machine``'s result final with ``retcode`` (unless someone already did) and
    write its log block: the spooled output, then ``note``."""
    shared = ctx.shared
    ret = shared_state.live_output(shared, instance, machine)
    if note:
        ret = ret + ("\n" if ret and not ret.endswith("\n") else "") + note
    if not shared_state.finish_machine(shared, job.name, instance, machine, retcode, ret=ret):
        return False
    log.info("instance %s machine %s: recorded exit code %d", instance, machine, retcode)
    _write_result_log(ctx, job, instance, machine, note)
    return True


def _write_result_log(ctx: RunContext, job, instance: str, machine: str, note: str = "",
                      result: Optional[Dict] = None) -> None:
    """The log block of ``machine``'s final ``result`` (read from the state if not given)."""
    if result is None:
        result = shared_state.get_result(ctx.shared, job.name, machine) or {}
    retcode = result.get("retcode", RETCODE_NO_RESPONSE)
    endtime = result.get("endtime") or utcnow()
    ctx.joblog.machine_result(job.name, job.group, instance, machine,
                              retcode if retcode != "" else RETCODE_NO_RESPONSE, endtime,
                              output_path=spool_path(ctx.shared.statedir, instance, machine),
                              output_text=note)


def processresults_websocket(ctx: RunContext, job, instance: str, machines: List[str],
                             launched: Dict[str, float],
                             record: Optional[InstanceRecord] = None,
                             batch_start: Optional[float] = None,
                             never_connected_code: int = RETCODE_NO_RESPONSE) -> None:
    """Wait until every machine of this batch has a final result.

    Enforces the job's ``timeout`` (kill, then 124), logs ``soft_timeout`` once, records
    253 for a machine silent for ``HEARTBEAT_LOSS_AFTER`` seconds and 255 for a wrapper
    that never connected within the connect deadline. Results that the WebSocket server
    made final are written to the log file here.
    """
    shared = ctx.shared
    batch_start = batch_start or time.time()
    pending = set(launched)
    unlogged = set(launched)
    soft_warned = False
    timeout_requested = False
    next_liveness_check = 0.0
    poll = WORKER_POLL_INTERVAL
    while unlogged:
        still_running = set(shared_state.instance_machines(shared, instance))
        finished_now = sorted(unlogged - still_running)
        poll = (WORKER_POLL_INTERVAL if finished_now
                else min(poll * 2, LIVENESS_CHECK_INTERVAL))
        if finished_now:
            # finalised by the WebSocket server: log them here, reading the state once
            results = shared_state.get_results(shared, job.name)
            for machine in finished_now:
                if machine in pending:
                    _write_result_log(ctx, job, instance, machine,
                                      result=results.get(machine) or {})
            unlogged.difference_update(finished_now)
            if record is not None:
                record.logged(finished_now)
        pending &= still_running
        if not pending:
            break
        now = time.time()
        elapsed = now - batch_start
        if job.soft_timeout and elapsed > job.soft_timeout and not soft_warned:
            soft_warned = True
            warning = ("soft timeout of %ss exceeded by %s; still running on %s"
                       % (job.soft_timeout, instance, ", ".join(sorted(pending))))
            log.warning("instance %s: %s", instance, warning)
            shared_state.update_job(shared, job.name, job.group, soft_timeout_exceeded=True,
                                    warning=warning)
        if job.timeout and elapsed > job.timeout and not timeout_requested:
            timeout_requested = True
            log.warning("instance %s: timeout of %ss reached; stopping %s", instance,
                        job.timeout, ", ".join(sorted(pending)))
            shared_state.request_kill(shared, job.name, instance, sorted(pending), "timeout", now)
        if now < next_liveness_check:
            time.sleep(poll)
            continue
        next_liveness_check = now + LIVENESS_CHECK_INTERVAL
        liveness = shared_state.get_liveness(shared, instance)
        kills = shared_state.get_kills(shared, instance)
        for machine in sorted(pending):
            info = liveness.get(machine) or {}
            seen = info.get("seen")
            kill = kills.get(machine)
            if kill and now - kill["at"] > KILL_REPORT_WAIT:
                code = KILL_RETCODES.get(kill["reason"], RETCODE_KILLED)
                _finalise(ctx, job, instance, machine, code, pending, unlogged,
                          "[saltpeter] killed (%s); the wrapper did not report within %ds\n"
                          % (kill["reason"], KILL_REPORT_WAIT), record)
            elif not seen and now - launched[machine] > ctx.connect_deadline:
                _finalise(ctx, job, instance, machine, never_connected_code, pending, unlogged,
                          "[saltpeter] the wrapper never connected within %ds\n"
                          % ctx.connect_deadline, record)
            elif info.get("lost"):
                _finalise(ctx, job, instance, machine, RETCODE_HEARTBEAT_LOST, pending, unlogged,
                          "[saltpeter] no heartbeat for %ds; the wrapper is lost\n"
                          % HEARTBEAT_LOSS_AFTER, record)
        time.sleep(poll)


def _finalise(ctx, job, instance, machine, retcode, pending, unlogged, note, record) -> None:
    log.warning("instance %s machine %s: %s", instance, machine, note.strip())
    _record(ctx, job, instance, machine, retcode, note)
    pending.discard(machine)
    unlogged.discard(machine)
    if record is not None:
        record.logged([machine])


def processresults(ctx: RunContext, job, instance: str, machines: List[str]) -> None:
    """Legacy path: the executor runs the command itself (Salt ``cmd.run``); results are
    recorded as each machine returns. Timeout and kill stop it through the executor."""
    shared = ctx.shared
    started = time.time()
    pending = set(machines)
    ctx.joblog.machine_starts(job.name, job.group, instance, machines, utcnow())

    def on_result(machine, retcode, output):
        kill = shared_state.get_kills(shared, instance).get(machine)
        if kill:
            retcode = KILL_RETCODES.get(kill["reason"], retcode)
        _record(ctx, job, instance, machine, retcode, output)

    runner = threading.Thread(target=_run_legacy_safely,
                              args=(ctx, job, instance, machines, on_result), daemon=True)
    runner.start()
    timeout_requested = False
    kill_sent = set()
    while True:
        pending &= set(shared_state.instance_machines(shared, instance))
        if not pending:
            break
        now_ts = time.time()
        if job.timeout and now_ts - started > job.timeout and not timeout_requested:
            timeout_requested = True
            shared_state.request_kill(shared, job.name, instance, sorted(pending), "timeout",
                                      now_ts)
        kills = shared_state.get_kills(shared, instance)
        to_kill = sorted(m for m in pending if m in kills and m not in kill_sent)
        if to_kill:
            ctx.executor.kill_legacy(instance, to_kill)
            kill_sent.update(to_kill)
        for machine in sorted(pending):
            kill = kills.get(machine)
            if kill and now_ts - kill["at"] > KILL_REPORT_WAIT:
                _record(ctx, job, instance, machine,
                        KILL_RETCODES.get(kill["reason"], RETCODE_KILLED),
                        "[saltpeter] killed (%s)\n" % kill["reason"])
        if not runner.is_alive():
            for machine in sorted(pending):
                _record(ctx, job, instance, machine, RETCODE_NO_RESPONSE,
                        "Target did not respond")
        time.sleep(WORKER_POLL_INTERVAL)


def _run_legacy_safely(ctx, job, instance, machines, on_result) -> None:
    try:
        ctx.executor.run_legacy(job, instance, machines, on_result)
    except Exception as exc:
        log.exception("instance %s: legacy run failed", instance)
        for machine in machines:
            on_result(machine, RETCODE_NO_RESPONSE, "legacy run failed: %s" % exc)
