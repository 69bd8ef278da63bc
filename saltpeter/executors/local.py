"""``--local``: every job runs on this host only, through the same wrapper and WebSocket
path as on minions, with no Salt master."""

import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

from saltpeter.executors import Executor

log = logging.getLogger(__name__)

LAUNCH_TIMEOUT = 30.0
# The wrapper package lives beside the saltpeter package (installed or in the source tree).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WRAPPER_BOOTSTRAP = ("import sys; sys.path.insert(0, %r); from wrapper.runner import main; "
                     "sys.exit(main())" % PACKAGE_ROOT)


def this_machine() -> str:
    """The machine name used for this host in ``--local`` mode."""
    return socket.gethostname()


class LocalExecutor(Executor):
    """Launches the wrapper as a local subprocess; the only target is this host."""

    def __init__(self, machine: Optional[str] = None, wrapper_log_dir: Optional[str] = None):
        self.machine = machine or this_machine()
        self.wrapper_log_dir = wrapper_log_dir
        self._legacy_procs: Dict[Tuple[str, str], subprocess.Popen] = {}

    def resolve_targets(self, job) -> Tuple[List[str], List[str]]:
        return [self.machine], []

    def launch(self, job, instance: str, machines: List[str],
               wrapper_env: Dict[str, str]) -> Dict[str, Optional[str]]:
        results: Dict[str, Optional[str]] = {}
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("SP_")}
        for machine in machines:
            env = dict(base_env, **wrapper_env)
            env["SP_MACHINE_ID"] = machine
            if self.wrapper_log_dir:
                os.makedirs(self.wrapper_log_dir, exist_ok=True)
                env["SP_LOG_FILE"] = os.path.join(self.wrapper_log_dir, "%s.log" % instance)
            try:
                completed = subprocess.run(
                    [sys.executable, "-c", WRAPPER_BOOTSTRAP], env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, timeout=LAUNCH_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired) as exc:
                results[machine] = "could not start the wrapper: %s" % exc
                continue
            if completed.returncode != 0:
                results[machine] = ("wrapper exited with %d: %s" % (
                    completed.returncode, completed.stderr.decode(errors="replace").strip()))
            else:
                results[machine] = None
        return results

    def run_legacy(self, job, instance: str, machines: List[str], on_result) -> None:
        """Legacy path on this host: the command runs to completion under the shell."""
        env = dict(os.environ, **{str(k): str(v) for k, v in (job.env or {}).items()})
        for machine in machines:
            try:
                proc = subprocess.Popen(["/bin/sh", "-c", job.command], cwd=job.cwd or None,
                                        env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            except OSError as exc:
                on_result(machine, 255, "could not start the command: %s" % exc)
                continue
            self._legacy_procs[(instance, machine)] = proc
            output, _ = proc.communicate()
            self._legacy_procs.pop((instance, machine), None)
            retcode = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
            on_result(machine, retcode, output.decode("utf-8", "replace"))

    def kill_legacy(self, instance: str, machines: List[str]) -> None:
        for machine in machines:
            proc = self._legacy_procs.get((instance, machine))
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
