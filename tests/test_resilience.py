"""Nothing lost: connection cuts, daemon restarts (SIGKILL and SIGTERM) mid-job, missed
fire times, and TLS between wrapper and server."""

import os
import signal
import subprocess
import sys
import time
import hashlib
import json

import pytest

from tests.tcp_proxy import CuttingProxy
from tests.test_daemon_local import first_result, job_yaml, results
from tests.helpers import wait_for, write_job

LINES = 3000


def counted_lines_command(directory, count=LINES, pause=0.002):
    """A job that prints ``count`` numbered lines over a few seconds, then their sha256."""
    path = directory / "counted.py"
    path.write_text("import hashlib, sys, time\n"
              "h = hashlib.sha256()\n"
              "for i in range(%d):\n"
              "    line = '%%06d the quick brown fox\\n' %% i\n"
              "    h.update(line.encode())\n"
              "    sys.stdout.write(line); sys.stdout.flush(); time.sleep(%s)\n"
              "print('sha256', h.hexdigest())\n" % (count, pause))
    return "%s %s" % (sys.executable, path)


def expected_output(count=LINES):
    lines = "".join("%06d the quick brown fox\n" % i for i in range(count))
    return lines + "sha256 %s\n" % hashlib.sha256(lines.encode()).hexdigest()


def spool_has_output(daemon):
    spool = daemon.state_dir / "spool"
    return any(path.stat().st_size > 2000 for path in spool.rglob("*")
               if path.is_file() and "." not in path.name)


def test_output_is_exact_across_random_connection_cuts(daemon_factory, tmp_path):
    daemon = daemon_factory()
    with CuttingProxy(daemon.ws_port, max_life=1.0) as proxy:
        daemon.extra_args += ["--websocket-url", "ws://127.0.0.1:%d" % proxy.port]
        write_job(daemon.config_dir, "demo", job_yaml("counted", counted_lines_command(tmp_path),
                                                      sec="*/30"))
        daemon.start()
        result = first_result(daemon, "counted", timeout=60)
        assert proxy.cuts >= 3, "the proxy cut the wrapper's connection several times"
    assert result["code"] == "0"
    assert result["output"] == expected_output()


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM])
def test_daemon_restart_mid_job_loses_nothing(daemon_factory, tmp_path, stop_signal):
    daemon = daemon_factory()
    write_job(daemon.config_dir, "demo", job_yaml(
        "survivor", counted_lines_command(tmp_path, pause=0.003), sec="*/30"))
    daemon.start()
    wait_for(lambda: spool_has_output(daemon), timeout=40, message="output streaming")
    instance = [line.split()[2] for line in daemon.log("survivor").splitlines()
                if line.startswith("###### Starting") and " on " not in line][0]
    if stop_signal == signal.SIGKILL:
        os.killpg(daemon.proc.pid, signal.SIGKILL)      # the daemon and all its children
        daemon.proc.wait()
    else:
        daemon.stop(signal.SIGTERM, timeout=10)
    assert (daemon.state_dir / "instances").exists() and any(
        (daemon.state_dir / "instances").iterdir()), "the running instance is on record"
    daemon.start()
    result = first_result(daemon, "survivor", timeout=60)
    assert result["instance"] == instance
    assert result["code"] == "0"
    assert result["output"] == expected_output()
    assert "adopted" in daemon.output()
    wait_for(lambda: "###### Finished %s" % instance in daemon.log("survivor"),
             message="Finished line after the restart")
    assert len(results(daemon.log("survivor"))) == 1
    assert not any((daemon.state_dir / "instances").iterdir())


def test_missed_fire_times_are_logged_and_catch_up_runs_once(daemon_factory):
    daemon = daemon_factory()
    write_job(daemon.config_dir, "demo",
              job_yaml("plain", "echo plain", sec="*/2")
              + job_yaml("eager", "echo eager", sec="*/2", catch_up="true"))
    daemon.start()
    wait_for(lambda: results(daemon.log("plain")) and results(daemon.log("eager")),
             message="both jobs ran once")
    daemon.stop(signal.SIGTERM)
    ledger = json.loads((daemon.state_dir / "ledger.json").read_text())
    assert set(ledger) == {"plain", "eager"}
    stopped_at = time.monotonic()
    wait_for(lambda: time.monotonic() - stopped_at > 4.5, timeout=10, message="downtime")
    eager_runs = len(results(daemon.log("eager")))
    daemon.start()
    wait_for(lambda: "Missed" in daemon.log("plain") and "Missed" in daemon.log("eager"),
             timeout=10, message="missed lines")
    assert "missed" in daemon.output()
    # the catch-up run happens at start, before the next scheduled second
    wait_for(lambda: len(results(daemon.log("eager"))) > eager_runs, timeout=10,
             message="catch-up run")
    fired = [r["instance"] for r in results(daemon.log("eager"))]
    assert len(fired) == len(set(fired)), "no fire time ran twice"


def _make_certificate(directory):
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_jobs_complete_and_plain_clients_are_refused(daemon_factory, tmp_path):
    cert, key = _make_certificate(tmp_path)
    daemon = daemon_factory(extra_args=["--websocket-cert", str(cert), "--websocket-key",
                                        str(key), "--wrapper-ca-file", str(cert)])
    write_job(daemon.config_dir, "demo", job_yaml("secure", "echo over tls", sec="*/2"))
    daemon.start()
    assert "wss://127.0.0.1:%d" % daemon.ws_port in daemon.output()
    result = first_result(daemon, "secure", timeout=20)
    assert result["code"] == "0" and result["output"] == "over tls\n"
    from websockets.sync.client import connect
    with pytest.raises(Exception):
        with connect("ws://127.0.0.1:%d" % daemon.ws_port, open_timeout=3) as plain:
            plain.send("{}")
            plain.recv(timeout=3)
    # a TLS client that does not trust the certificate is refused too
    with pytest.raises(Exception):
        with connect("wss://127.0.0.1:%d" % daemon.ws_port, open_timeout=3):
            pass


def test_legacy_job_running_at_a_restart_is_reported_not_rerun(daemon_factory, tmp_path):
    runs = tmp_path / "runs.txt"
    daemon = daemon_factory()
    write_job(daemon.config_dir, "demo", job_yaml(
        "oldstyle", "echo run >> %s; sleep 20 # %s" % (runs, tmp_path), sec="*/30",
        use_wrapper="false"))
    daemon.start()
    wait_for(lambda: runs.exists(), timeout=40, message="the legacy job started")
    os.killpg(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait()
    daemon.start()
    result = first_result(daemon, "oldstyle", timeout=20)
    assert result["code"] == "255"
    assert "legacy" in result["output"] and "not run again" in result["output"]
    assert runs.read_text() == "run\n"
