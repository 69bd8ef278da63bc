"""Salt minions through ``salt.client.LocalClient``.

Wrapper path: ``resolve_targets`` pings the job's targets; ``launch`` deploys the
single-file wrapper (``saltpeter.deploy``) and runs it with ``cmd.run_all`` on exactly the
chosen minions. Every ``SP_*`` value travels in Salt's ``env=`` argument, never on a
command line; the minion id reaches the wrapper as ``SP_MACHINE_ID`` through the command's
Jinja template (``grains['id']``), rendered on each minion. The wrapper detaches at once,
so the call returns in seconds whatever the job's length.

Legacy path: ``run_legacy`` publishes ``cmd.run_all`` of the job's command without
waiting (``run_job(listen=True)``) and reports each minion's return as it arrives;
``kill_legacy`` sends ``saltutil.term_job`` for the Salt jid of that instance.

The LocalClient is made lazily in the process that uses it (per-run workers are forked
from the daemon, and a client must not cross a fork).
"""

import logging
import os
import shlex
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from saltpeter.constants import RETCODE_KILLED, RETCODE_NO_RESPONSE
from saltpeter.deploy import DEFAULT_WRAPPER_DIR, WrapperDeployer
from saltpeter.executors import Executor, ExecutorError

log = logging.getLogger(__name__)

# SPEC section 4 target types -> Salt's tgt_type names.
TARGET_TYPES = {
    "glob": "glob",
    "pcre": "pcre",
    "list": "list",
    "grain": "grain",
    "grain_pcre": "grain_pcre",
    "pillar": "pillar",
    "pillar_pcre": "pillar_pcre",
    "nodegroup": "nodegroup",
    "range": "range",
    "compound": "compound",
    "ipcidr": "ipcidr",
}

DEFAULT_OPTIONS = {
    "wrapper_python": "python3",     # interpreter on the minion that runs the wrapper
    "wrapper_dir": DEFAULT_WRAPPER_DIR,
    "ping_timeout": 5,               # seconds for test.ping in resolve_targets
    "gather_job_timeout": 3,         # seconds Salt waits for find_job of silent minions
    "launch_timeout": 20,            # seconds for the wrapper launch (and deploy) calls
    "legacy_poll_timeout": 10,       # legacy: how often Salt re-checks that a job still runs
}

NOT_RESPONDING = "Target did not respond"
TERMINATED = "Terminated through saltutil.term_job"
LEGACY_POLL_INTERVAL = 0.05

# Runs on the minion under /bin/sh, rendered by Jinja there first. The wrapper's early
# output goes to a temp file rather than Salt's pipes, so that even a wrapper that failed
# to detach cleanly cannot hold the call open.
_LAUNCH_SCRIPT = (
    "SP_MACHINE_ID={{{{ grains['id'] | quote }}}}; export SP_MACHINE_ID; "
    "out=$(mktemp 2>/dev/null) || out=/tmp/sp-wrapper-launch.$$; "
    "{python} {path} </dev/null >\"$out\" 2>&1; rc=$?; "
    "cat \"$out\"; rm -f \"$out\"; exit $rc"
)


class SaltExecutor(Executor):
    """Runs jobs on Salt minions through the master whose config file is
    ``master_config_path``. ``options`` override ``DEFAULT_OPTIONS``."""

    def __init__(self, master_config_path: str, options: Optional[Dict[str, Any]] = None):
        self.master_config_path = master_config_path
        self.options = dict(DEFAULT_OPTIONS)
        self.options.update({k: v for k, v in (options or {}).items() if v is not None})
        self._client_obj = None
        self._client_pid: Optional[int] = None
        self._lock = threading.Lock()
        self._legacy_jids: Dict[str, str] = {}     # job instance -> Salt jid
        self._legacy_terminated: Dict[str, set] = {}  # job instance -> machines term_job hit
        self.deployer = WrapperDeployer(self.client, wrapper_dir=self.options["wrapper_dir"],
                                        timeout=self.options["launch_timeout"],
                                        gather_job_timeout=self.options["gather_job_timeout"])

    # ------------------------------------------------------------ Salt access

    def _new_client(self):
        try:
            import salt.client
        except ImportError as exc:
            raise ExecutorError("Salt is not installed here (%s); install it or use --local"
                                % exc) from None
        if not os.path.isfile(self.master_config_path):
            raise ExecutorError("Salt master config file %s does not exist"
                                % self.master_config_path)
        try:
            return salt.client.LocalClient(c_path=self.master_config_path)
        except Exception as exc:
            raise ExecutorError("cannot create a Salt client from %s: %s: %s"
                                % (self.master_config_path, type(exc).__name__, exc)) from exc

    def client(self):
        """This process's LocalClient (made on first use, and again after a fork)."""
        with self._lock:
            if self._client_obj is None or self._client_pid != os.getpid():
                self._client_obj = self._new_client()
                self._client_pid = os.getpid()
            return self._client_obj

    def _reset_client(self) -> None:
        with self._lock:
            self._client_obj = None

    def _master_error(self, exc: Exception) -> ExecutorError:
        # A client that failed (master down, stale key) is not reused: the next call
        # makes a new one, so that a restarted master is picked up.
        self._reset_client()
        return ExecutorError("Salt master (config %s) cannot be reached: %s: %s"
                             % (self.master_config_path, type(exc).__name__, exc))

    def _cmd(self, tgt, fun: str, arg=(), tgt_type="glob", kwarg=None, timeout=None,
             client=None) -> Dict[str, Any]:
        try:
            return (client or self.client()).cmd(
                tgt, fun, list(arg), tgt_type=tgt_type, kwarg=kwarg or {},
                timeout=timeout or self.options["ping_timeout"],
                gather_job_timeout=self.options["gather_job_timeout"]) or {}
        except ExecutorError:
            raise
        except Exception as exc:
            raise self._master_error(exc) from exc

    # ------------------------------------------------------------ targets

    @staticmethod
    def salt_target(job) -> Tuple[Any, str]:
        """The (tgt, tgt_type) pair for Salt from a job's ``targets`` and ``target_type``.
        A ``list`` target may be a YAML list or a comma-separated string. Raises
        ``ExecutorError`` for an unknown type."""
        target_type = (getattr(job, "target_type", None) or "glob").strip()
        tgt_type = TARGET_TYPES.get(target_type)
        if tgt_type is None:
            raise ExecutorError("unknown target_type %r (expected one of %s)"
                                % (target_type, ", ".join(sorted(TARGET_TYPES))))
        targets = getattr(job, "targets", None)
        if targets is None or targets == "":
            targets = "*"
        if tgt_type == "list":
            items = targets if isinstance(targets, (list, tuple)) else str(targets).split(",")
            return [str(item).strip() for item in items if str(item).strip()], tgt_type
        if isinstance(targets, (list, tuple)):
            targets = ",".join(str(item) for item in targets)
        return str(targets), tgt_type

    def resolve_targets(self, job) -> Tuple[List[str], List[str]]:
        """Ping the job's targets: (minions that answered, matched minions that did not),
        both sorted. No match gives ([], []). Raises ``ExecutorError`` if the master
        cannot be reached or the target type is unknown."""
        tgt, tgt_type = self.salt_target(job)
        returns = self._cmd(tgt, "test.ping", tgt_type=tgt_type,
                            timeout=self.options["ping_timeout"])
        responding = sorted(m for m, value in returns.items() if value is True)
        silent = sorted(m for m, value in returns.items() if value is not True)
        if silent:
            log.warning("job %s: targets not responding to ping: %s",
                        getattr(job, "name", "?"), ", ".join(silent))
        return responding, silent

    def number_of_targets(self, job) -> List[str]:
        """The responding targets of ``job``, narrowed to ``job.number_of_targets`` of them
        picked at random when that is set (0 = all)."""
        import random
        responding, _ = self.resolve_targets(job)
        wanted = getattr(job, "number_of_targets", 0) or 0
        if wanted and len(responding) > wanted:
            return sorted(random.sample(responding, wanted))
        return responding

    # ------------------------------------------------------------ wrapper path

    def launch_script(self) -> str:
        """The shell script (a Jinja template rendered on the minion) that starts the
        deployed wrapper. It holds no job data: all of that is in the environment."""
        return _LAUNCH_SCRIPT.format(python=shlex.quote(str(self.options["wrapper_python"])),
                                     path=shlex.quote(self.deployer.remote_path))

    def launch(self, job, instance: str, machines: List[str],
               wrapper_env: Dict[str, str]) -> Dict[str, Optional[str]]:
        """Deploy the wrapper where needed, then start it on exactly ``machines`` with
        ``wrapper_env`` plus ``SP_MACHINE_ID`` = the minion id. Returns within about
        ``launch_timeout`` seconds (plus the deploy, when a copy is needed):
        ``{machine: None}`` for a started wrapper, ``{machine: reason}`` otherwise.
        Raises ``ExecutorError`` if the master cannot be reached."""
        machines = list(machines)
        if not machines:
            return {}
        results: Dict[str, Optional[str]] = {}
        try:
            deployed = self.deployer.ensure(machines)
        except ExecutorError:
            raise
        except Exception as exc:
            raise self._master_error(exc) from exc
        ready = []
        for machine in machines:
            reason = deployed.get(machine, "no answer while deploying the wrapper")
            if reason is None:
                ready.append(machine)
            else:
                results[machine] = reason
        if not ready:
            return results
        env = {str(name): str(value) for name, value in wrapper_env.items()
               if name != "SP_MACHINE_ID"}
        log.info("instance %s: starting wrapper %s on %s", instance,
                 self.deployer.bundle.version, ", ".join(ready))
        returns = self._cmd(ready, "cmd.run_all", tgt_type="list",
                            kwarg={"cmd": self.launch_script(), "env": env,
                                   "template": "jinja", "python_shell": True,
                                   "output_loglevel": "quiet"},
                            timeout=self.options["launch_timeout"])
        failed = []
        for machine in ready:
            value = returns.get(machine)
            if isinstance(value, dict) and value.get("retcode") == 0:
                results[machine] = None
                continue
            if value is None:
                reason = "no answer from the minion while starting the wrapper"
            elif isinstance(value, dict):
                output = (value.get("stdout") or value.get("stderr") or "").strip()
                reason = "wrapper exited with %s: %s" % (value.get("retcode"),
                                                         output or "(no output)")
                failed.append(machine)
            else:
                reason = str(value).strip() or "unknown error"
            results[machine] = reason
            log.error("instance %s machine %s: wrapper not started: %s", instance, machine,
                      reason)
        # A failed start may mean the file vanished: check it again next time.
        self.deployer.forget(failed)
        return results

    # ------------------------------------------------------------ legacy path

    def run_legacy(self, job, instance: str, machines: List[str], on_result) -> None:
        """Run the job's command itself on ``machines`` (``cmd.run_all`` with cwd, runas,
        env; stderr merged into the output as the legacy ``cmd.run`` did) and call
        ``on_result(machine, retcode, output)`` exactly once per machine as each returns;
        a machine that never returns gets ``(machine, 255, "Target did not respond")``,
        one whose job ``kill_legacy`` terminated gets ``(machine, 143, ...)`` (the caller
        knows whether that was a timeout or a user's kill).
        Blocks until every machine is accounted for. Raises ``ExecutorError`` if the job
        cannot be published."""
        machines = list(machines)
        if not machines:
            return
        # The command goes as a keyword: Salt reads a positional "NAME=value ..." string
        # as a keyword argument.
        kwarg: Dict[str, Any] = {"cmd": job.command, "python_shell": True,
                                 "redirect_stderr": True}
        if getattr(job, "cwd", None):
            kwarg["cwd"] = job.cwd
        if getattr(job, "user", None):
            kwarg["runas"] = job.user
        if getattr(job, "env", None):
            kwarg["env"] = {str(k): str(v) for k, v in job.env.items()}
        # Own client: the event stream of this long wait must not be shared with the
        # kill calls that another thread makes meanwhile.
        client = self._new_client()
        try:
            published = client.run_job(machines, "cmd.run_all", [],
                                       tgt_type="list", kwarg=kwarg, listen=True,
                                       timeout=self.options["legacy_poll_timeout"])
        except Exception as exc:
            raise self._master_error(exc) from exc
        if not published or "jid" not in published:
            raise ExecutorError("Salt master did not accept the job for %s" % instance)
        jid = published["jid"]
        with self._lock:
            self._legacy_jids[instance] = jid
        log.info("instance %s: legacy job published as Salt jid %s to %s", instance, jid,
                 ", ".join(machines))
        pending = set(machines)
        try:
            for event in client.get_iter_returns(
                    jid, set(machines), timeout=self.options["legacy_poll_timeout"],
                    tgt=machines, tgt_type="list", block=False,
                    gather_job_timeout=self.options["gather_job_timeout"]):
                if event is None:
                    # No event just now: report machines whose job kill_legacy ended
                    # (a terminated Salt job sends no return), then poll again.
                    for machine in sorted(pending & self._terminated(instance)):
                        pending.discard(machine)
                        on_result(machine, RETCODE_KILLED, TERMINATED)
                    if not pending:
                        break
                    time.sleep(LEGACY_POLL_INTERVAL)
                    continue
                for machine, data in event.items():
                    if machine not in pending or not isinstance(data, dict):
                        continue
                    pending.discard(machine)
                    retcode, output = _legacy_result(data)
                    log.info("instance %s machine %s: legacy return, exit code %s",
                             instance, machine, retcode)
                    on_result(machine, retcode, output)
                if not pending:
                    break
        except Exception as exc:
            log.error("instance %s: lost the Salt event stream of jid %s: %s: %s",
                      instance, jid, type(exc).__name__, exc)
        finally:
            with self._lock:
                self._legacy_jids.pop(instance, None)
                self._legacy_terminated.pop(instance, None)
            _destroy(client)
        for machine in sorted(pending):
            log.warning("instance %s machine %s: no legacy return", instance, machine)
            on_result(machine, RETCODE_NO_RESPONSE, NOT_RESPONDING)

    def _terminated(self, instance: str) -> set:
        with self._lock:
            return set(self._legacy_terminated.get(instance, ()))

    def legacy_jid(self, instance: str) -> Optional[str]:
        """The Salt jid of ``instance``'s running legacy job, if any."""
        with self._lock:
            return self._legacy_jids.get(instance)

    def kill_legacy(self, instance: str, machines: List[str]) -> None:
        """Send ``saltutil.term_job`` for ``instance``'s jid to ``machines`` (SIGTERM to
        the minion's job process and the command it runs). Does nothing for an unknown
        instance; raises ``ExecutorError`` if the master cannot be reached."""
        jid = self.legacy_jid(instance)
        if jid is None or not machines:
            log.warning("instance %s: no legacy Salt job to kill", instance)
            return
        log.info("instance %s: terminating Salt jid %s on %s", instance, jid,
                 ", ".join(machines))
        client = self._new_client()
        try:
            returns = self._cmd(list(machines), "saltutil.term_job", [jid], tgt_type="list",
                                client=client)
        finally:
            _destroy(client)
        # A minion that answered has signalled the job (or had already finished it).
        answered = {m for m, value in returns.items() if isinstance(value, str)
                    and "did not return" not in value}
        with self._lock:
            if instance in self._legacy_jids:
                self._legacy_terminated.setdefault(instance, set()).update(answered)


def _legacy_result(data: Dict[str, Any]) -> Tuple[int, str]:
    """(retcode, output) from one ``cmd.run_all`` return event."""
    ret = data.get("ret")
    if isinstance(ret, dict) and "retcode" in ret:
        output = ret.get("stdout") or ""
        if ret.get("stderr"):
            output = output + ("\n" if output else "") + ret["stderr"]
        return int(ret.get("retcode") or 0), output
    # Salt-side failure (unknown runas user, bad cwd): the return is an error text.
    retcode = data.get("retcode")
    if not isinstance(retcode, int) or retcode == 0:
        retcode = 1
    return retcode, str(ret)


def _destroy(client) -> None:
    try:
        client.destroy()
    except Exception:  # closing a half-broken client must not mask the real outcome
        pass
