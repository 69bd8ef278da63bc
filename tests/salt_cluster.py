"""A real Salt master and minions on 127.0.0.1 for tests and development.

``salt_cluster()`` is a context manager that starts one ``salt-master`` and (by default)
two ``salt-minion`` processes from this venv's Salt, all under a short temp directory
(``/tmp/spsalt-XXXX``: minion IPC socket paths must stay under 108 characters), on free
non-default ports, with ``auto_accept``, and waits until every minion answers a ping.
It yields a ``SaltCluster``: the master config file for ``LocalClient(c_path=...)``, the
minion ids, and ``stop_minion`` / ``start_minion``. On exit every Salt process is stopped
(SIGTERM, then SIGKILL after a deadline) and the directory is removed.

``salt_cluster_fixture`` is the session-scoped pytest fixture around it; conftest imports
it as ``from tests.salt_cluster import salt_cluster_fixture as salt_cluster``. It skips
the test (with the reason) when Salt is not importable.
"""

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from tests.helpers import free_port

log = logging.getLogger(__name__)

DEFAULT_MINIONS = ("minion-a", "minion-b")
# Grains set per minion, so that grain and compound targeting have something to match.
MINION_GRAINS = {"minion-a": {"sp_role": "alpha"}, "minion-b": {"sp_role": "beta"}}
READY_TIMEOUT = 90.0     # first ping of all minions; measured 5-9 s on 2 cores
STOP_TIMEOUT = 15.0      # minions take 6-7 s to stop after SIGTERM


def salt_available() -> Optional[str]:
    """None when Salt can be imported here, else the reason it cannot."""
    try:
        import salt.client  # noqa: F401
        import salt.version  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return "salt is not importable (%s: %s); install it with: pip install salt" % (
            type(exc).__name__, exc)
    return None


def _salt_script(name: str) -> List[str]:
    """The command that runs Salt's ``name`` script (salt-master, salt-minion) of this venv."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [sys.executable, str(script)]
    found = shutil.which(name)
    if found:
        return [found]
    raise RuntimeError("cannot find the %s script next to %s or on PATH" % (name, sys.executable))


class SaltCluster:
    """One master and its minions under ``root``. Use ``salt_cluster()`` to get one."""

    def __init__(self, root: Path, minion_ids=DEFAULT_MINIONS):
        self.root = Path(root)
        self.minion_ids: List[str] = list(minion_ids)
        self.publish_port = free_port()
        self.ret_port = free_port()
        while self.ret_port == self.publish_port:
            self.ret_port = free_port()
        self.master_dir = self.root / "m"
        self.master_config = str(self.master_dir / "master")
        self.master_proc: Optional[subprocess.Popen] = None
        self.minion_procs: Dict[str, subprocess.Popen] = {}
        self.setup_seconds = 0.0
        self._client = None

    # ------------------------------------------------------------ configuration

    def _minion_dir(self, minion_id: str) -> Path:
        # Short directory names keep IPC socket paths far below 108 characters.
        return self.root / ("n%d" % self.minion_ids.index(minion_id))

    def write_configs(self) -> None:
        """Write the master and minion config files (YAML) under ``root``."""
        self.master_dir.mkdir(parents=True, exist_ok=True)
        (self.master_dir / "master").write_text("\n".join([
            "root_dir: %s" % self.master_dir,
            "interface: 127.0.0.1",
            "publish_port: %d" % self.publish_port,
            "ret_port: %d" % self.ret_port,
            "auto_accept: True",
            "user: root",
            "worker_threads: 2",
            "log_file: %s" % (self.master_dir / "master.log"),
            "log_level_logfile: info",
            "enable_fqdns_grains: False",
            "",
        ]))
        for minion_id in self.minion_ids:
            minion_dir = self._minion_dir(minion_id)
            minion_dir.mkdir(parents=True, exist_ok=True)
            grains = MINION_GRAINS.get(minion_id, {})
            lines = [
                "id: %s" % minion_id,
                "root_dir: %s" % minion_dir,
                "master: 127.0.0.1",
                "master_port: %d" % self.ret_port,
                "publish_port: %d" % self.publish_port,
                "user: root",
                "log_file: %s" % (minion_dir / "minion.log"),
                "log_level_logfile: info",
                "enable_fqdns_grains: False",
                "acceptance_wait_time: 1",
                "random_reauth_delay: 0",
                "auth_timeout: 10",
            ]
            if grains:
                lines.append("grains:")
                lines += ["  %s: %s" % item for item in sorted(grains.items())]
            (minion_dir / "minion").write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------ processes

    def _spawn(self, script: str, config_dir: Path, log_name: str) -> subprocess.Popen:
        out = open(config_dir / log_name, "ab")
        try:
            return subprocess.Popen(
                _salt_script(script) + ["-c", str(config_dir), "-l", "quiet"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True)
        finally:
            out.close()

    def start_master(self) -> None:
        self.master_proc = self._spawn("salt-master", self.master_dir, "master.out")

    def start_minion(self, minion_id: str, wait: bool = True, timeout: float = READY_TIMEOUT) -> None:
        """Start ``minion_id`` (if not running); with ``wait``, until it answers a ping."""
        proc = self.minion_procs.get(minion_id)
        if proc is None or proc.poll() is not None:
            self.minion_procs[minion_id] = self._spawn(
                "salt-minion", self._minion_dir(minion_id), "minion.out")
        if wait:
            self.wait_ready([minion_id], timeout=timeout)

    def stop_minion(self, minion_id: str, timeout: float = STOP_TIMEOUT) -> None:
        """Stop ``minion_id`` and wait until its processes are gone (takes 6-7 s)."""
        proc = self.minion_procs.pop(minion_id, None)
        if proc is not None:
            _stop_process_group(proc, timeout)

    def client(self, fresh: bool = False):
        """A ``salt.client.LocalClient`` on this master (one per test process)."""
        if fresh or self._client is None or self._client_pid != os.getpid():
            import salt.client
            self._client = salt.client.LocalClient(c_path=self.master_config)
            self._client_pid = os.getpid()
        return self._client

    def ping(self, minion_ids, timeout: float = 3) -> List[str]:
        """The minions of ``minion_ids`` that answer a ping within about ``timeout`` s."""
        try:
            returns = self.client().cmd(list(minion_ids), "test.ping", tgt_type="list",
                                        timeout=timeout, gather_job_timeout=2)
        except Exception as exc:  # master still starting: its sockets are not up yet
            log.debug("ping failed: %s", exc)
            # A client made before the master wrote its key never authenticates: renew it.
            self._client = None
            return []
        return sorted(m for m, value in (returns or {}).items() if value is True)

    def wait_ready(self, minion_ids=None, timeout: float = READY_TIMEOUT) -> float:
        """Retry pings until every minion of ``minion_ids`` answers; return seconds taken.
        Raises RuntimeError (with the tail of the logs) past ``timeout``."""
        wanted = sorted(minion_ids or self.minion_ids)
        started = time.monotonic()
        deadline = started + timeout
        answered: List[str] = []
        while not self.master_ready():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("salt-master not ready within %.0fs\n%s"
                                   % (timeout, self.logs_tail()))
            time.sleep(0.2)
        while time.monotonic() < deadline:
            self._check_alive()
            answered = self.ping(wanted)
            if answered == wanted:
                return time.monotonic() - started
            time.sleep(0.5)
        raise RuntimeError("minions %s did not answer within %.0fs (answered: %s)\n%s"
                           % (wanted, timeout, answered, self.logs_tail()))

    def master_ready(self) -> bool:
        """True once the master wrote its root key and listens on its return port."""
        if not (self.master_dir / "var/cache/salt/master/.root_key").exists():
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.ret_port), timeout=0.5):
                return True
        except OSError:
            return False

    def _check_alive(self) -> None:
        if self.master_proc is not None and self.master_proc.poll() is not None:
            raise RuntimeError("salt-master exited with %s\n%s"
                               % (self.master_proc.returncode, self.logs_tail()))

    def logs_tail(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted(self.root.glob("*/*.log")) + sorted(self.root.glob("*/*.out")):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append("--- %s\n%s" % (path, text[-chars:]))
        return "\n".join(parts)

    def start(self) -> "SaltCluster":
        """Write configs, start master and minions, wait until all minions answer."""
        started = time.monotonic()
        self.write_configs()
        self.start_master()
        for minion_id in self.minion_ids:
            self.start_minion(minion_id, wait=False)
        self.wait_ready()
        self.setup_seconds = time.monotonic() - started
        log.info("salt cluster ready in %.1fs: master %s, minions %s",
                 self.setup_seconds, self.master_config, self.minion_ids)
        return self

    def stop(self) -> None:
        """Stop every minion and the master; SIGKILL whatever outlives the deadline."""
        self._client = None
        procs = list(self.minion_procs.values())
        self.minion_procs.clear()
        if self.master_proc is not None:
            procs.append(self.master_proc)
            self.master_proc = None
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in procs:
            _wait_or_kill(proc, max(0.1, deadline - time.monotonic()))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_or_kill(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("salt process %s did not stop in time; killing its group", proc.pid)
    # Salt forks helper processes into the same group; make sure none is left.
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def _stop_process_group(proc: subprocess.Popen, timeout: float) -> None:
    _signal_group(proc, signal.SIGTERM)
    _wait_or_kill(proc, timeout)


@contextlib.contextmanager
def salt_cluster(minion_ids=DEFAULT_MINIONS, root: Optional[str] = None) -> Iterator[SaltCluster]:
    """A running master with ``minion_ids``, all answering pings; torn down on exit.

    ``root`` is the (short) directory to use; by default a new ``/tmp/spsalt-XXXX`` that
    is removed afterwards.
    """
    reason = salt_available()
    if reason:
        raise RuntimeError(reason)
    own_root = root is None
    root_path = Path(tempfile.mkdtemp(prefix="spsalt-", dir="/tmp") if own_root else root)
    cluster = SaltCluster(root_path, minion_ids)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if own_root:
            shutil.rmtree(root_path, ignore_errors=True)


# One cluster per test session even when several test modules import the fixture (each
# import is its own fixture definition to pytest): the first user starts it, the last stops it.
_shared = {"cluster": None, "context": None, "users": 0}


@pytest.fixture(scope="session", name="salt_cluster")
def salt_cluster_fixture():
    """Session-wide real Salt master with ``minion-a`` and ``minion-b`` (skips without Salt).

    Import it into a conftest or test module: ``from tests.salt_cluster import
    salt_cluster_fixture  # noqa: F401``; tests then ask for ``salt_cluster``.
    """
    reason = salt_available()
    if reason:
        pytest.skip(reason)
    if _shared["cluster"] is None:
        context = salt_cluster()
        _shared["cluster"] = context.__enter__()
        _shared["context"] = context
    _shared["users"] += 1
    try:
        yield _shared["cluster"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            context, _shared["context"], _shared["cluster"] = _shared["context"], None, None
            context.__exit__(None, None, None)


class DialBackServer:
    """A WebSocket server on 127.0.0.1 that wrappers on the minions dial back to.

    Unlike a one-wrapper test server it keeps every connection apart: it records each
    frame with the connection it came on, acks each connection's ``seq`` cumulatively,
    and can send ``kill`` to the connections of one machine. Use as a context manager.
    """

    def __init__(self):
        self.port = None
        self._records = []          # (connection number, message dict)
        self._connections = {}      # connection number -> websocket
        self._machines = {}         # connection number -> machine
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop = None
        self._stop = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def url(self) -> str:
        return "ws://127.0.0.1:%d" % self.port

    def __enter__(self) -> "DialBackServer":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("dial-back WebSocket server did not start")
        return self

    def __exit__(self, *exc_info) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _main(self):
        from websockets.asyncio.server import serve
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", 0, max_size=2 ** 22) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    async def _handler(self, ws):
        from websockets.exceptions import ConnectionClosed
        with self._lock:
            number = len(self._connections)
            self._connections[number] = ws
        acked = 0
        try:
            async for text in ws:
                message = json.loads(text)
                with self._lock:
                    self._records.append((number, message))
                    if message.get("machine"):
                        self._machines[number] = message["machine"]
                seq = message.get("seq")
                if isinstance(seq, int) and seq > acked:
                    acked = seq
                    await ws.send(json.dumps({"type": "ack", "ack": acked}))
        except ConnectionClosed:
            pass

    def messages(self, msg_type=None, machine=None):
        """Messages received (duplicates from re-sends removed), oldest first."""
        seen = set()
        found = []
        with self._lock:
            records = list(self._records)
        for _, message in records:
            key = (message.get("machine"), message.get("job_instance"), message.get("seq"))
            if message.get("seq") is not None:
                if key in seen:
                    continue
                seen.add(key)
            if msg_type is not None and message.get("type") != msg_type:
                continue
            if machine is not None and message.get("machine") != machine:
                continue
            found.append(message)
        return found

    def machines(self, msg_type="connect"):
        """The machines that sent a ``msg_type`` message, sorted."""
        return sorted({m["machine"] for m in self.messages(msg_type)})

    def output(self, machine) -> str:
        return "".join(m.get("data", "") for m in self.messages("output", machine))

    def kill(self, machine, reason="user") -> None:
        """Send ``kill`` on every connection of ``machine``."""
        text = json.dumps({"type": "kill", "reason": reason})
        with self._lock:
            targets = [self._connections[n] for n, m in self._machines.items() if m == machine]

        async def _send():
            for ws in targets:
                try:
                    await ws.send(text)
                except Exception:  # a closed connection: the others still get it
                    pass

        asyncio.run_coroutine_threadsafe(_send(), self._loop).result(10)


def kill_marked_processes(marker: str) -> None:
    """SIGKILL every process whose command line or environment holds ``marker``:
    wrappers and commands detached from the minions outlive the tests otherwise."""
    from tests.helpers import pids_with_marker
    for pid in pids_with_marker(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
