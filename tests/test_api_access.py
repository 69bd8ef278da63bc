"""Opt-in API protection from the YAML config: HTTP basic auth (also on /ws) and a
read-only mode; the default stays open for drop-in users."""

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from websockets.sync.client import connect

from tests.helpers import REPO, wait_for, write_job
from tests.test_daemon_local import job_yaml


def hash_of(password):
    done = subprocess.run([sys.executable, "-m", "saltpeter", "--hash-password"], cwd=REPO,
                          input=password + "\n", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def request(daemon, path, method="GET", body=None, user=None):
    headers = {"Content-Type": "application/json"}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (daemon.api_port, path),
                                 data=json.dumps(body).encode() if body is not None else None,
                                 method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_basic_auth_from_yaml_guards_http_and_websocket(daemon_factory):
    daemon = daemon_factory(api=True)
    write_job(daemon.config_dir, "jobs", job_yaml("guarded", "echo ok", sec="*/30"))
    write_job(daemon.config_dir, "access",
              "saltpeter_api:\n  users:\n    ops: '%s'\n" % hash_of("s3cret"))
    daemon.start()
    assert request(daemon, "/version")[0] == 401
    assert request(daemon, "/version", user="ops:wrong")[0] == 401
    status, body = request(daemon, "/version", user="ops:s3cret")
    assert status == 200 and body
    assert "users" not in json.dumps(request(daemon, "/config", user="ops:s3cret")[1])
    with pytest.raises(Exception):
        with connect("ws://127.0.0.1:%d/ws" % daemon.api_port, open_timeout=5) as sock:
            sock.recv(timeout=5)
    token = base64.b64encode(b"ops:s3cret").decode()
    with connect("ws://127.0.0.1:%d/ws" % daemon.api_port, open_timeout=5,
                 additional_headers={"Authorization": "Basic " + token}) as sock:
        assert "config" in json.loads(sock.recv(timeout=5))


def test_read_only_refuses_run_and_kill_but_serves_reads(daemon_factory):
    daemon = daemon_factory(api=True)
    write_job(daemon.config_dir, "jobs", job_yaml("readonly", "sleep 30", sec="*/30"))
    write_job(daemon.config_dir, "access", "saltpeter_api:\n  read_only: true\n")
    daemon.start()
    wait_for(lambda: "read-only" in daemon.output(), message="read-only mode applied")
    status, body = request(daemon, "/kill", method="POST", body={"job": "readonly"})
    assert status == 403 and "read-only" in body["error"]
    assert request(daemon, "/status")[0] == 200
    with connect("ws://127.0.0.1:%d/ws" % daemon.api_port, open_timeout=5) as sock:
        sock.recv(timeout=5)
        for command in ({"run": "readonly"}, {"killCron": "readonly"},
                        {"killMachine": {"cron": "readonly", "machine": "x"}}):
            sock.send(json.dumps(command))
            reply = None
            while reply is None or "error" not in reply:
                reply = json.loads(sock.recv(timeout=5))
            assert "read-only" in reply["error"]
    assert "###### Starting readonly_" not in daemon.log("readonly")


def test_bad_access_section_is_reported_and_the_api_stays_open(daemon_factory):
    daemon = daemon_factory(api=True)
    write_job(daemon.config_dir, "access",
              "saltpeter_api:\n  users:\n    ops: plaintext-password\n")
    daemon.start()
    assert request(daemon, "/version")[0] == 200
    assert "saltpeter_api" in daemon.output() and "hash-password" in daemon.output()
