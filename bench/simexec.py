"""A simulated executor for the benchmarks: machines that exist only as simulated
wrappers (``bench/simwrapper.py``) on this host.

The daemon loads it when started with ``SALTPETER_TEST_EXECUTOR=bench.simexec:SimExecutor``
(the test-only hook in ``saltpeter/daemon.py``). A job says what to simulate:

- ``targets: "sim:N"``: N machines ``sim-00000`` ... (``sim:0``: no targets, the run ends
  at once; that is what the scheduler benchmark uses).
- ``command``: ``key=value`` words:
  ``mode=wrappers`` (default): launch the machines' simulated wrappers in ``procs``
  detached load-generator processes (``hold``, ``heartbeat``, ``protocol``,
  ``lines_per_sec``, ``line_bytes``, ``batch_bytes``, ``output_bytes``, ``concurrency``
  are passed on);
  ``mode=probe``: one wrapper run inside the per-run worker itself, which sends a
  heartbeat, then polls ``liveness`` until the server has published it, and records
  the heartbeat-to-state latency, for ``hold`` seconds.
  ``mode=none``: launch nothing.

Reports (JSON) go to ``$SALTPETER_SIM_REPORT_DIR`` (default ``<statedir>/sim-reports``).
"""

import json
import os
import random
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Tuple

from saltpeter.executors import Executor

SIMWRAPPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "simwrapper.py")
PROBE_POLL = 0.02
PROBE_GIVE_UP = 10.0


def parse_command(command: str) -> Dict[str, str]:
    options = {"mode": "wrappers"}
    for word in command.split():
        key, sep, value = word.partition("=")
        if sep:
            options[key] = value
    return options


class SimExecutor(Executor):
    def __init__(self, statedir: str, shared=None):
        self.statedir = statedir
        self.shared = shared
        self.report_dir = (os.environ.get("SALTPETER_SIM_REPORT_DIR")
                           or os.path.join(statedir, "sim-reports"))

    def resolve_targets(self, job) -> Tuple[List[str], List[str]]:
        targets = job.targets or ""
        if not targets.startswith("sim:"):
            return [], []
        count = int(targets[4:])
        return ["sim-%05d" % i for i in range(count)], []

    def launch(self, job, instance: str, machines: List[str],
               wrapper_env: Dict[str, str]) -> Dict[str, Optional[str]]:
        options = parse_command(job.command)
        os.makedirs(self.report_dir, exist_ok=True)
        if options["mode"] == "probe":
            for machine in machines:
                threading.Thread(target=self._probe, daemon=True,
                                 args=(job, instance, machine, wrapper_env, options)).start()
        elif options["mode"] == "wrappers":
            procs = max(1, min(int(options.get("procs", 2)), len(machines)))
            for index in range(procs):
                self._spawn(job, instance, machines[index::procs], wrapper_env, options, index)
        return {machine: None for machine in machines}

    def _spawn(self, job, instance, machines, wrapper_env, options, index) -> None:
        base = os.path.join(self.report_dir, "%s.%d" % (instance, index))
        with open(base + ".machines", "w") as handle:
            handle.write("\n".join(machines) + "\n")
        argv = [sys.executable, SIMWRAPPER, "--url", wrapper_env["SP_WEBSOCKET_URL"],
                "--job", job.name, "--instance", instance, "--machine-list",
                base + ".machines", "--report", base + ".json", "--tag", instance,
                "--protocol", options.get("protocol", "extended")]
        for key in ("hold", "heartbeat", "lines_per_sec", "line_bytes", "batch_bytes",
                    "output_bytes", "max_seconds"):
            if key in options:
                argv += ["--" + key.replace("_", "-"), options[key]]
        if "concurrency" in options:
            argv += ["--connect-concurrency", options["concurrency"]]
        env = dict(os.environ, SP_TOKEN=wrapper_env.get("SP_TOKEN", ""))
        # through a shell that exits at once: the load generator is not our child, so its
        # CPU never lands in the daemon's accounting (cutime) and the worker never waits
        with open(base + ".log", "ab") as log_file:
            subprocess.run(["/bin/sh", "-c", '"$@" </dev/null &', "sh"] + argv, env=env,
                           stdout=log_file, stderr=log_file, check=False)

    def _probe(self, job, instance, machine, wrapper_env, options) -> None:
        from websockets.sync.client import connect
        from saltpeter.state import live_output
        hold = float(options.get("hold", 30))
        token = wrapper_env.get("SP_TOKEN")
        latencies = []

        def frame(kind, **fields):
            body = {"type": kind, "job_name": job.name, "job_instance": instance,
                    "machine": machine, "timestamp": datetime.now(timezone.utc).isoformat()}
            if token:
                body["token"] = token
            body.update(fields)
            return json.dumps(body)

        # the benchmark leaves this measuring worker out of saltpeter's CPU
        with open(os.path.join(self.report_dir, "%s.probe.pid" % instance), "w") as handle:
            handle.write(str(os.getpid()))
        with connect(wrapper_env["SP_WEBSOCKET_URL"], compression=None,
                     ping_interval=None) as ws:
            ws.send(frame("connect"))
            ws.send(frame("start", pid=os.getpid()))
            end = time.monotonic() + hold
            while time.monotonic() < end:
                time.sleep(random.uniform(0.3, 0.7))
                # a numbered output line: latency until the state shows it (the API reads
                # a running machine's output from the server's spool through state.py)
                marker = "probe-%d\n" % len(latencies)
                sent = time.time()
                ws.send(frame("output", stream="stdout", data=marker))
                give_up = time.monotonic() + PROBE_GIVE_UP
                while time.monotonic() < give_up:
                    if live_output(self.shared, instance, machine).endswith(marker):
                        break
                    time.sleep(PROBE_POLL)
                latencies.append((sent, time.time() - sent))
                if len(latencies) % 3 == 0:
                    self._probe_report(instance, latencies)
            ws.send(frame("complete", retcode=0, output=""))
        self._probe_report(instance, latencies)

    def _probe_report(self, instance, latencies) -> None:
        path = os.path.join(self.report_dir, "%s.probe.json" % instance)
        with open(path + ".tmp", "w") as handle:
            json.dump({"instance": instance, "samples": latencies}, handle)
        os.replace(path + ".tmp", path)

    def run_legacy(self, job, instance, machines, on_result) -> None:
        for machine in machines:
            on_result(machine, 255, "the simulated executor has no legacy path")

    def kill_legacy(self, instance, machines) -> None:
        pass
