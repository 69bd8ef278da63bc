"""The minion-side wrapper, run as real processes against a tiny recording server.

Each test is a user story: a job command is launched through ``sp-wrapper`` (positional
or ``SP_*`` style), and what the server receives, what the command saw, and which
processes are left are checked. No fixed sleeps: everything polls with a deadline.
"""

import ast
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid

import pytest

from tests.helpers import REPO, free_port, pids_with_marker, wait_for
from tests.wrapper_server import WrapperServer

WRAPPER_FILES = ("wrapper/__init__.py", "wrapper/__main__.py", "wrapper/protocol.py",
                 "wrapper/wsclient.py", "wrapper/runner.py")


@pytest.fixture
def marker():
    """A unique string put into every launched wrapper's and command's environment, so
    that whatever is left can be found in /proc and killed at the end."""
    value = "sp-test-%s" % uuid.uuid4().hex
    yield value
    for pid in pids_with_marker(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture
def server():
    with WrapperServer() as srv:
        yield srv


def wrapper_env(marker, extra_env=None, **variables):
    """The environment for one wrapper run: ours without SP_* variables, plus a marker
    (also handed to the command through SP_ENV, with ``extra_env``) and ``variables``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SP_")}
    env["SP_TEST_MARKER"] = marker
    env["SP_ENV"] = json.dumps(dict(extra_env or {}, TEST_MARKER=marker))
    env.update(variables)
    return env


def run_wrapper(env, args=(), timeout=30):
    """Run ``python -m wrapper`` to its end; the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "wrapper"] + list(args), env=env,
                          cwd=str(REPO), capture_output=True, timeout=timeout)


def live_pids(marker):
    """Processes (not zombies) carrying ``marker`` in their environment."""
    alive = []
    for pid in pids_with_marker(marker):
        try:
            with open("/proc/%d/stat" % pid) as handle:
                if handle.read().rsplit(")", 1)[-1].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


def test_positional_call_reports_output_exit_code_and_fields(server, marker):
    env = wrapper_env(marker, SP_FOREGROUND="1", SP_TOKEN="secret-token")
    result = run_wrapper(env, [server.url, "backup", "backup_1700000000", "web1",
                               "echo out; echo err >&2; exit 3"])
    assert result.returncode == 0, result.stderr

    complete = server.wait_for("complete")
    assert complete["retcode"] == 3
    assert server.output("stdout") == b"out\n"
    assert server.output("stderr") == b"err\n"
    assert "out\n" in complete["output"] and "err\n" in complete["output"]
    messages = server.messages()
    assert [m["type"] for m in messages][:2] == ["connect", "start"]
    assert messages[-1]["type"] == "complete"
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    assert isinstance(server.messages("start")[0]["pid"], int)
    for message in messages:
        assert message["job_name"] == "backup"
        assert message["job_instance"] == "backup_1700000000"
        assert message["machine"] == "web1"
        assert message["token"] == "secret-token"
        assert message["timestamp"].endswith("+00:00")


def test_env_call_detaches_at_once_hides_command_and_secrets(server, marker, tmp_path):
    secret = "hunter2-%s" % uuid.uuid4().hex
    # Each line of `env` goes to its own file so that the test can read what the
    # command saw; the secret is in the command text itself.
    command = "env > %s/env.txt; echo %s > /dev/null; sleep 30" % (tmp_path, secret)
    env = wrapper_env(marker, SP_WEBSOCKET_URL=server.url, SP_JOB_NAME="report",
                      SP_JOB_INSTANCE="report_1", SP_MACHINE_ID="db1", SP_COMMAND=command,
                      SP_TOKEN="tok-%s" % secret, SP_CWD=str(tmp_path),
                      extra_env={"GREETING": "hello"})
    started = time.monotonic()
    # Pipes on stdout/stderr: like Salt's cmd.run, this only returns once no process
    # holds them any more, so it also proves that the detached wrapper closed them.
    result = run_wrapper(env, timeout=10)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 2.0
    assert result.stdout == b"" and result.stderr == b""

    server.wait_for("start")
    env_file = tmp_path / "env.txt"
    seen = wait_for(lambda: env_file.exists() and env_file.read_text(), message="env.txt")
    assert "GREETING=hello\n" in seen
    assert "TEST_MARKER=%s" % marker in seen
    assert not [line for line in seen.splitlines() if line.startswith(("SP_", "__SP_"))]
    assert secret not in seen
    # The command text is in no process's argv while the job runs.
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as handle:
                    assert secret.encode() not in handle.read(), "pid %s shows the command" % entry
            except OSError:
                pass
    assert live_pids(marker), "the job should still run after the wrapper returned"
    heartbeat = server.wait_for("heartbeat", timeout=8)
    assert heartbeat["token"] == "tok-%s" % secret

    server.kill("user")
    assert server.wait_for("complete")["retcode"] == 143
    wait_for(lambda: not live_pids(marker), timeout=10, message="no process left")


@pytest.mark.parametrize("reason, retcode", [("user", 143), ("timeout", 124)])
def test_kill_stops_the_whole_process_group(server, marker, reason, retcode):
    # Two background children and a foreground one: all must go.
    command = "sleep 60 & sleep 61 & sh -c 'sleep 62'"
    env = wrapper_env(marker, SP_FOREGROUND="1")
    proc = subprocess.Popen([sys.executable, "-m", "wrapper", server.url, "job", "job_2",
                             "m1", command], env=env, cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server.wait_for("start")
        wait_for(lambda: len(live_pids(marker)) >= 5, message="job's processes running")
        server.kill(reason, fragmented=True)  # fragmented frames must be reassembled
        assert server.wait_for("complete")["retcode"] == retcode
        assert proc.wait(10) == 0
        wait_for(lambda: not live_pids(marker), timeout=10, message="no process left")
    finally:
        proc.kill()
        proc.wait()


def test_job_dies_with_a_sigkilled_wrapper(server, marker):
    env = wrapper_env(marker, SP_FOREGROUND="1")
    proc = subprocess.Popen([sys.executable, "-m", "wrapper", server.url, "job", "job_11",
                             "m1", "sleep 60 & sleep 61; echo never"], env=env,
                            cwd=str(REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        server.wait_for("start")
        # wrapper, its guard, the shell and both sleeps
        wait_for(lambda: len(live_pids(marker)) >= 5, message="job's processes running")
        proc.kill()
        proc.wait(5)
        wait_for(lambda: not live_pids(marker), timeout=5, message="no process left")
        assert not server.messages("complete")
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_to_the_wrapper_stops_the_job_and_reports_143(server, marker):
    env = wrapper_env(marker, SP_FOREGROUND="1")
    proc = subprocess.Popen([sys.executable, "-m", "wrapper", server.url, "job", "job_12",
                             "m1", "echo begun; sleep 60 & sleep 61"], env=env,
                            cwd=str(REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        server.wait_for("start")
        wait_for(lambda: len(live_pids(marker)) >= 5, message="job's processes running")
        proc.terminate()
        assert server.wait_for("complete")["retcode"] == 143
        assert proc.wait(10) == 0
        wait_for(lambda: not live_pids(marker), timeout=10, message="no process left")
    finally:
        proc.kill()
        proc.wait()


def test_output_bytes_survive_exactly_including_invalid_utf8(server, marker):
    # A two-byte character split across writes, invalid bytes, and bytes on stderr.
    command = (r"printf 'caf\303'; sleep 0.2; printf '\251 \377\376 end'; "
               r"printf '\000\001\200' >&2; printf '\360\237\230\200' >&2")
    env = wrapper_env(marker, SP_FOREGROUND="1")
    result = run_wrapper(env, [server.url, "job", "job_3", "m1", command])
    assert result.returncode == 0, result.stderr
    server.wait_for("complete")
    assert server.output("stdout") == b"caf\xc3\xa9 \xff\xfe end"
    assert server.output("stderr") == b"\x00\x01\x80\xf0\x9f\x98\x80"


def test_dropped_connections_lose_no_output(marker):
    # ~20000 lines over about a second; the server drops the link three times
    # (abruptly and cleanly) without acking what it just got.
    command = ("i=0; while [ $i -lt 40 ]; do seq $((i*500+1)) $((i*500+500)); "
               "i=$((i+1)); sleep 0.02; done")
    expected = subprocess.run(["seq", "1", "20000"], capture_output=True).stdout
    with WrapperServer(drop_after_outputs=(2, 6, 10)) as server:
        env = wrapper_env(marker, SP_FOREGROUND="1")
        result = run_wrapper(env, [server.url, "job", "job_4", "m1", command])
        assert result.returncode == 0, result.stderr
        assert server.wait_for("complete")["retcode"] == 0
        assert server.drops == 3
        assert len([m for m in server.frames if m["type"] == "connect"]) == 4
        assert server.output("stdout") == expected


def test_server_that_never_acks_still_gets_everything(marker):
    with WrapperServer(ack=False) as server:
        env = wrapper_env(marker, SP_FOREGROUND="1")
        result = run_wrapper(env, [server.url, "job", "job_5", "m1", "echo legacy"])
        assert result.returncode == 0, result.stderr
        assert server.wait_for("complete")["output"] == "legacy\n"
        assert server.output("stdout") == b"legacy\n"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_wss_verifies_the_server_against_the_ca_file(marker, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    with WrapperServer(ssl_context=context) as server:
        # Not trusted by the system store: never connects, command not run.
        env = wrapper_env(marker, SP_FOREGROUND="1", SP_CONNECT_TIMEOUT="0.3")
        result = run_wrapper(env, [server.url, "job", "job_tls", "m1", "echo tls"])
        assert result.returncode == 255
        assert b"CERTIFICATE_VERIFY_FAILED" in result.stderr
        env = wrapper_env(marker, SP_FOREGROUND="1", SP_CA_FILE=str(cert))
        result = run_wrapper(env, [server.url, "job", "job_tls", "m1", "echo tls"])
        assert result.returncode == 0, result.stderr
        assert server.wait_for("complete")["retcode"] == 0
        assert server.output("stdout") == b"tls\n"


def test_unacked_buffer_is_bounded_by_dropping_oldest_output():
    from wrapper.runner import Outbox
    outbox = Outbox(cap=1000, trim_to=600)
    outbox.add(1, "connect", "c" * 100)
    for seq in range(2, 12):
        outbox.add(seq, "output", "o" * 100)
    kept = []
    item = outbox.take_unsent()
    while item is not None:
        kept.append((item[0], item[1]))
        item = outbox.take_unsent()
    assert kept[0] == (1, "connect")
    assert sum(100 for _ in kept) <= 1000
    assert [seq for seq, _ in kept] == sorted(seq for seq, _ in kept)
    assert kept[-1] == (11, "output")
    outbox.acknowledge(11)
    assert outbox.empty()


def test_unknown_user_is_reported_and_nothing_runs(server, marker, tmp_path):
    flag = tmp_path / "ran"
    env = wrapper_env(marker, SP_FOREGROUND="1", SP_USER="no-such-user-%s" % marker[-8:],
                      SP_WEBSOCKET_URL=server.url, SP_JOB_NAME="job",
                      SP_JOB_INSTANCE="job_6", SP_COMMAND="touch %s" % flag)
    result = run_wrapper(env)
    assert result.returncode == 0, result.stderr
    error = server.wait_for("error")
    assert "unknown user" in error["error"]
    assert not server.messages("start") and not server.messages("complete")
    assert not flag.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_user_drops_privileges_fully(server, marker, tmp_path):
    os.chmod(str(tmp_path), 0o777)
    command = "id -u; id -g; id -G; echo $HOME $USER $LOGNAME"
    env = wrapper_env(marker, SP_FOREGROUND="1")
    result = run_wrapper(env, [server.url, "job", "job_7", "m1", command, str(tmp_path),
                               "nobody"])
    assert result.returncode == 0, result.stderr
    assert server.wait_for("complete")["retcode"] == 0
    import pwd
    nobody = pwd.getpwnam("nobody")
    groups = sorted(os.getgrouplist("nobody", nobody.pw_gid))
    lines = server.output("stdout").decode().splitlines()
    assert lines[0] == str(nobody.pw_uid)
    assert lines[1] == str(nobody.pw_gid)
    assert sorted(int(g) for g in lines[2].split()) == groups
    assert lines[3] == "%s nobody nobody" % nobody.pw_dir


def test_never_connecting_gives_up_without_running(marker, tmp_path):
    flag = tmp_path / "ran"
    log_file = tmp_path / "wrapper.log"
    url = "ws://127.0.0.1:%d" % free_port()  # nothing listens there
    env = wrapper_env(marker, SP_FOREGROUND="1", SP_CONNECT_TIMEOUT="1",
                      SP_LOG_FILE=str(log_file))
    result = run_wrapper(env, [url, "job", "job_8", "m1", "touch %s" % flag])
    assert result.returncode == 255
    assert "never connected" in result.stderr.decode()
    assert not flag.exists()


def test_detached_wrapper_logs_to_its_log_file_when_it_cannot_connect(marker, tmp_path):
    flag = tmp_path / "ran"
    log_file = tmp_path / "wrapper.log"
    url = "ws://127.0.0.1:%d" % free_port()
    env = wrapper_env(marker, SP_CONNECT_TIMEOUT="0.5", SP_LOG_FILE=str(log_file))
    result = run_wrapper(env, [url, "job", "job_9", "m1", "touch %s" % flag])
    assert result.returncode == 0
    wait_for(lambda: "never connected" in log_file.read_text(), message="log line")
    assert not flag.exists()


@pytest.mark.parametrize("args, variables, complaint", [
    ([], {}, "missing websocket URL"),
    (["ws://x", "a", "b"], {}, "expected 5 to 7 arguments"),
    (["http://x", "a", "b", "c", "true"], {}, "ws:// or wss://"),
    (["ws://x", "a", "b", "c", "true"], {"SP_ENV": "[1]"}, "SP_ENV"),
    (["ws://x", "a", "b", "c", "true"], {"SP_CONNECT_TIMEOUT": "soon"}, "SP_CONNECT_TIMEOUT"),
])
def test_bad_configuration_is_one_line_and_exit_code_2(marker, args, variables, complaint):
    env = wrapper_env(marker, **variables)
    if "SP_ENV" not in variables:
        env.pop("SP_ENV")
    result = run_wrapper(env, args)
    assert result.returncode == 2
    assert complaint in result.stderr.decode()
    assert len(result.stderr.decode().strip().splitlines()) == 1


def test_runs_isolated_from_site_packages_with_stdlib_only(server, marker, tmp_path):
    # -I -S: no site-packages, no PYTHONPATH, no user site. A third-party import would
    # fail; the check below also proves every loaded module is stdlib or ours.
    script = (
        "import sys, sysconfig\n"
        "sys.path.insert(0, %r)\n"
        "from wrapper.runner import main\n"
        "code = main()\n"
        "stdlib = sysconfig.get_paths()['stdlib']\n"
        "for name, module in list(sys.modules.items()):\n"
        "    path = getattr(module, '__file__', None) or ''\n"
        "    assert not path or path.startswith(stdlib) or path.startswith(%r), path\n"
        "sys.exit(code)\n" % (str(REPO), str(REPO / "wrapper")))
    env = wrapper_env(marker, SP_FOREGROUND="1", SP_WEBSOCKET_URL=server.url,
                      SP_JOB_NAME="job", SP_JOB_INSTANCE="job_10", SP_COMMAND="echo isolated")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script], env=env,
                            cwd=str(tmp_path), capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert server.wait_for("complete")["retcode"] == 0
    assert server.output("stdout") == b"isolated\n"


def test_wrapper_sources_parse_as_python_3_9():
    for name in WRAPPER_FILES:
        source = (REPO / name).read_text()
        ast.parse(source, filename=name, feature_version=(3, 9))
        assert "import websockets" not in source


def test_client_masking_roundtrips_and_is_fast():
    from wrapper.wsclient import mask_payload
    payload = os.urandom(1 << 20)
    started = time.monotonic()
    masked = mask_payload(b"\x01\x02\x03\x04", payload)
    assert time.monotonic() - started < 0.5
    assert masked[:4] == bytes(b ^ m for b, m in zip(payload[:4], b"\x01\x02\x03\x04"))
    assert mask_payload(b"\x01\x02\x03\x04", masked) == payload
    assert mask_payload(b"abcd", b"") == b""
