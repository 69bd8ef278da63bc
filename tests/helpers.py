"""Test helpers: start the real daemon on temp dirs and free ports, wait for conditions.

Every process a test starts is stopped by the fixture that started it; no fixed sleeps,
only ``wait_for`` with a deadline.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS says is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout=20.0, interval=0.05, message="condition"):
    """Poll ``predicate`` until it returns a truthy value; return that value.
    Raises AssertionError naming ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing polled may not exist yet
            last_error = exc
        time.sleep(interval)
    raise AssertionError("timed out after %.1fs waiting for %s (last error: %r)"
                         % (timeout, message, last_error))


def write_job(config_dir: Path, group: str, yaml_text: str) -> Path:
    """Write ``<config_dir>/<group>.yaml`` atomically (write then rename)."""
    path = Path(config_dir) / ("%s.yaml" % group)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(textwrap.dedent(yaml_text))
    os.replace(tmp, path)
    return path


def every_second_job(name: str, command: str, **extra) -> str:
    """YAML for a job firing every second (or at ``sec`` given in extra)."""
    fields = {"sec": "*", "min": "*", "hour": "*", "dom": "*", "mon": "*", "dow": "*",
              "command": command}
    fields.update(extra)
    return json.dumps({name: fields})  # JSON is YAML


def pids_with_marker(marker: str):
    """PIDs of live processes whose command line or environment contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as handle:
                cmdline = handle.read()
            with open("/proc/%s/environ" % entry, "rb") as handle:
                environ = handle.read()
            with open("/proc/%s/stat" % entry) as handle:
                stat = handle.read()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            found.append(int(entry))
            continue
        if marker.encode() in cmdline or marker.encode() in environ:
            found.append(int(entry))
    return [pid for pid in found if pid != os.getpid()]


class Daemon:
    """One real ``saltpeter`` daemon process on temp dirs and free ports."""

    def __init__(self, tmp_path: Path, local=True, api=False, extra_args=(), env=None):
        self.tmp = Path(tmp_path)
        self.config_dir = self.tmp / "config"
        self.log_dir = self.tmp / "log"
        self.state_dir = self.tmp / "state"
        self.config_dir.mkdir(exist_ok=True)
        self.ws_port = free_port()
        self.api_port = free_port() if api else None
        self.local = local
        self.api = api
        self.extra_args = list(extra_args)
        self.env = dict(os.environ, **(env or {}))
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = None
        self.stderr_path = self.tmp / "daemon.stderr"

    def args(self):
        args = [sys.executable, "-m", "saltpeter",
                "-c", str(self.config_dir), "-l", str(self.log_dir),
                "--state-dir", str(self.state_dir),
                "-w", str(self.ws_port), "--websocket-host", "127.0.0.1"]
        if self.local:
            args.append("--local")
        if self.api:
            args += ["-a", "-p", str(self.api_port)]
        return args + self.extra_args

    def start(self):
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(self.args(), cwd=str(REPO), env=self.env,
                                     stdout=self._stderr, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if "--legacy" in self.extra_args:   # no WebSocket server in legacy mode
            wait_for(lambda: self.proc.poll() is None and "started" in self.output(),
                     timeout=20, message="legacy daemon started")
        else:
            wait_for(self._ws_listening, timeout=20, message="daemon WebSocket port")
        if self.api:   # a TCP accept, since the API may demand a password
            wait_for(lambda: self._listening(self.api_port), timeout=20, message="daemon API")
        return self

    def _ws_listening(self):
        return self._listening(self.ws_port)

    def _listening(self, port):
        if self.proc.poll() is not None:
            raise AssertionError("daemon exited with %s:\n%s" % (self.proc.returncode,
                                                                 self.output()))
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    def output(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def log(self, job: str) -> str:
        path = self.log_dir / ("%s.log" % job)
        return path.read_text(errors="replace") if path.exists() else ""

    def http_get(self, path: str):
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.api_port, path),
                                    timeout=5) as response:
            return json.loads(response.read().decode())

    def http_post(self, path: str, body):
        request = urllib.request.Request(
            "http://127.0.0.1:%d%s" % (self.api_port, path),
            data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read().decode() or "null")

    def stop(self, sig=signal.SIGTERM, timeout=15.0) -> float:
        """Stop the daemon with ``sig``; return how long it took to exit."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError("daemon did not exit within %.0fs of %s:\n%s"
                                 % (timeout, sig, self.output()[-4000:]))
        return time.monotonic() - started

    def kill_everything(self):
        """Last-resort cleanup: the daemon's whole process group."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if getattr(self, "_stderr", None):
            self._stderr.close()
