"""The API: its HTTP endpoints, its WebSocket feed and commands, its timeline, its UI files.

Most stories run ``run_api`` in a forked process over a real ``multiprocessing.Manager``,
as the daemon does, with the test playing the daemon: it fills the shared state through
``saltpeter.state`` and reads what the API put on the queues. The end-to-end stories at the
bottom run the real daemon with ``-a``.
"""

import base64
import contextlib
import json
import multiprocessing
import os
import queue
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from saltpeter import state
from saltpeter.spool import spool_path
from saltpeter.api import (check_password, hash_password, history_timeline, last_state,
                           parse_date, run_api)
from tests.helpers import free_port, pids_with_marker, wait_for, write_job
from tests.test_search_index import BlackHole, Engine

FORK = multiprocessing.get_context("fork")


class ApiProcess:
    """``run_api`` forked like the daemon does it; stopped with SIGTERM."""

    def __init__(self, shared, options=None):
        self.shared = shared
        self.options = dict(options or {})
        self.port = free_port()
        self.base = "http://127.0.0.1:%d" % self.port
        self.ws_url = "ws://127.0.0.1:%d/ws" % self.port
        self.proc = FORK.Process(target=run_api,
                                 args=(shared, "127.0.0.1", self.port, self.options),
                                 daemon=True)
        self.auth = None

    def start(self):
        self.proc.start()
        wait_for(self._answers, timeout=15, message="API on port %d" % self.port)
        return self

    def _answers(self):
        try:
            urllib.request.urlopen(self.base + "/version", timeout=1).close()
        except urllib.error.HTTPError:
            pass  # 401 with auth on: it answers
        return True

    def stop(self, timeout=10.0):
        """SIGTERM; returns the exit code."""
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
            raise AssertionError("API did not stop within %.0fs of SIGTERM" % timeout)
        return self.proc.exitcode

    def request(self, method, path, body=None, raw=None, headers=None):
        """(status, headers, parsed JSON body or text)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        all_headers = {"Content-Type": "application/json"}
        if self.auth:
            all_headers["Authorization"] = "Basic " + base64.b64encode(
                ("%s:%s" % self.auth).encode()).decode()
        all_headers.update(headers or {})
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers=all_headers)
        try:
            response = urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as exc:
            response = exc
        with response:
            payload = response.read().decode()
            content_type = response.headers.get("Content-Type", "")
            parsed = json.loads(payload) if "json" in content_type and payload else payload
            return response.status, response.headers, parsed

    def get(self, path):
        return self.request("GET", path)


def drain(q, timeout=2.0):
    """Everything on a multiprocessing queue within ``timeout`` (first item waited for)."""
    items = []
    try:
        items.append(q.get(timeout=timeout))
        while True:
            items.append(q.get(timeout=0.2))
    except queue.Empty:
        return items


def ws_recv_json(conn, timeout=5.0):
    return json.loads(conn.recv(timeout=timeout))


def ws_wait(conn, predicate, timeout=10.0, what="a message"):
    """Receive frames until one satisfies ``predicate``; return it."""
    deadline = datetime.now() + timedelta(seconds=timeout)
    seen = []
    while datetime.now() < deadline:
        remaining = (deadline - datetime.now()).total_seconds()
        try:
            message = json.loads(conn.recv(timeout=max(remaining, 0.01)))
        except TimeoutError:
            break
        if predicate(message):
            return message
        seen.append(message)
    raise AssertionError("no %s within %.0fs; last frames: %r" % (what, timeout, seen[-3:]))


def utc(*args):
    return datetime(*args, tzinfo=timezone.utc)


def publish_jobs(shared, jobs, serial=1.0, maintenance=None):
    """Put ``{name: fields}`` in the config the API sees."""
    state.publish_config(shared, jobs, maintenance or {"global": False, "machines": []},
                         serial)


# ---------------------------------------------------------------- fixtures

JOBS = {
    "backup": {"sec": "0", "min": "0", "hour": "2", "dom": "*", "mon": "*", "dow": "*",
               "command": "backup.sh", "group": "nightly"},
    "report": {"sec": "0", "min": "*/5", "hour": "*", "dom": "*", "mon": "*", "dow": "*",
               "command": "report.sh", "group": "reports"},
}
STARTED = utc(2024, 5, 1, 10, 0, 0)


@pytest.fixture
def shared(tmp_path):
    manager = multiprocessing.Manager()
    bundle = state.make_shared(manager, str(tmp_path))
    publish_jobs(bundle, JOBS)
    for name, fields in JOBS.items():
        state.update_job(bundle, name, group=fields["group"])
        set_schedule(bundle, name, next_run=utc(2030, 1, 1))
    yield bundle
    manager.shutdown()


@pytest.fixture
def api_factory(shared):
    started = []

    def make(options=None):
        api = ApiProcess(shared, options).start()
        started.append(api)
        return api

    yield make
    for api in started:
        api.stop()


@pytest.fixture
def api(api_factory):
    return api_factory()


def set_schedule(shared, job, **fields):
    """What the scheduler publishes of a job: next_run, last_run, overlap."""
    info = {"next_run": utc(2030, 1, 1), "last_run": "", "overlap": False}
    info.update(fields)
    state.update_schedule(shared, {job: info})


def write_live_output(shared, instance, machine, text):
    """What the WebSocket server does with a running machine's output: its spool file."""
    path = Path(spool_path(shared.statedir, instance, machine))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def start_backup_run(shared, machines=("web1", "web2"), when=STARTED):
    instance = "backup_%d" % int(when.timestamp())
    set_schedule(shared, "backup", last_run=when)
    state.start_instance(shared, "backup", instance, machines, when)
    state.init_results(shared, "backup", "nightly", machines, when)
    return instance


# ---------------------------------------------------------------- HTTP

def test_every_json_endpoint_answers_with_cors(api):
    for path in ("/version", "/config", "/running", "/status", "/timeline", "/jobs"):
        status, headers, body = api.get(path)
        assert status == 200, path
        assert headers["Access-Control-Allow-Origin"] == "*", path
        assert "GET" in headers["Access-Control-Allow-Methods"], path
        assert "Content-Type" in headers["Access-Control-Allow-Headers"], path
        assert isinstance(body, dict), path
        status, headers, _ = api.request("OPTIONS", path)
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "*", path


def test_version_config_running_status_shapes(api, shared):
    instance = start_backup_run(shared)
    assert api.get("/version")[2] == {"version": __import__("saltpeter").__version__}
    config = api.get("/config")[2]
    assert config["crons"]["backup"]["command"] == "backup.sh"
    assert config["maintenance"] == {"global": False, "machines": []}
    assert config["serial"] == 1.0
    running = api.get("/running")[2]
    assert running == {instance: {"started": "2024-05-01T10:00:00+00:00", "name": "backup",
                                  "machines": ["web1", "web2"]}}
    status = api.get("/status")[2]
    assert status["running"] == running
    backup = status["state"]["backup"]
    assert backup["last_run"] == "2024-05-01T10:00:00+00:00"
    assert backup["next_run"] == "2030-01-01T00:00:00+00:00"
    assert backup["results"]["web1"] == {"starttime": "2024-05-01T10:00:00+00:00",
                                         "endtime": "", "ret": "", "retcode": ""}
    jobs = api.get("/jobs")[2]
    assert jobs["backup"]["running"] == [instance]
    assert jobs["report"]["group"] == "reports" and jobs["report"]["last_run"] == ""


def test_post_kill_kills_every_running_machine_of_the_job(api, shared):
    instance = start_backup_run(shared)
    status, _, body = api.request("POST", "/kill", {"job": "backup"})
    assert status == 200
    assert body["killed"] == {instance: ["web1", "web2"]}
    assert drain(shared.ws_commands) == [("kill", instance, ["web1", "web2"], "user")]
    assert set(state.get_kills(shared, instance)) == {"web1", "web2"}
    assert state.get_kills(shared, instance)["web1"]["reason"] == "user"


def test_post_kill_of_a_job_that_is_not_running_changes_nothing(api, shared):
    status, _, body = api.request("POST", "/kill", {"job": "report"})
    assert status == 409 and "not running" in body["error"]
    status, _, body = api.request("POST", "/kill", {"job": "nosuchjob"})
    assert status == 404 and "unknown job" in body["error"]
    assert drain(shared.ws_commands, timeout=0.5) == []


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"nojob": 1}', b'{"job": 5}',
                                 b'{"job": ""}', b""])
def test_post_kill_bad_bodies_are_400_with_json_error(api, raw):
    status, headers, body = api.request("POST", "/kill", raw=raw)
    assert status == 400, raw
    assert isinstance(body, dict) and body["error"], raw
    assert headers["Access-Control-Allow-Origin"] == "*"


def test_wrong_methods_are_json_errors(api):
    status, headers, body = api.request("POST", "/version", {"x": 1})
    assert status == 405 and body["error"]
    assert headers["Access-Control-Allow-Origin"] == "*"
    status, _, body = api.request("GET", "/kill")
    assert status == 405 and body["error"]


def test_http_timeline_reads_the_run_history(api, shared, tmp_path):
    now = datetime.now(timezone.utc)
    write_history(tmp_path, [
        event("start", "backup", "backup_1", "", now - timedelta(minutes=3)),
        event("machine_start", "backup", "backup_1", "web1", now - timedelta(minutes=3)),
        event("machine_result", "backup", "backup_1", "web1", now - timedelta(minutes=2), 0),
        event("machine_start", "backup", "backup_0", "web1", now - timedelta(hours=3)),
    ])
    status, _, body = api.get("/timeline?start_date=now-5m&end_date=now&id=abc")
    assert status == 200 and body["id"] == "abc"
    assert [(e["msg_type"], e["ret_code"]) for e in body["content"]] == [
        ("machine_start", 0), ("machine_result", 0)]
    assert set(body["content"][0]) == {"cron", "job_instance", "msg_type", "ret_code",
                                       "timestamp"}
    status, _, body = api.get("/timeline?start_date=yesterday")
    assert status == 400 and "bad date" in body["error"]


# ---------------------------------------------------------------- static UI

def test_builtin_ui_is_served_for_root_and_unknown_paths(api):
    for path in ("/", "/details/backup", "/some/where"):
        status, headers, body = api.get(path)
        assert status == 200, path
        assert "text/html" in headers["Content-Type"], path
        assert "<title>Saltpeter</title>" in body, path


def test_ui_dir_option_serves_another_build(api_factory, tmp_path):
    build = tmp_path / "build"
    (build / "static").mkdir(parents=True)
    (build / "index.html").write_text("<html>legacy ui</html>")
    (build / "static" / "app.js").write_text("console.log('app')")
    api = api_factory({"ui_dir": str(build)})
    assert api.get("/")[2] == "<html>legacy ui</html>"
    assert api.get("/details/backup")[2] == "<html>legacy ui</html>"
    status, headers, body = api.get("/static/app.js")
    assert status == 200 and body == "console.log('app')"
    assert "javascript" in headers["Content-Type"]
    status, _, body = api.get("/static/../../../etc/passwd")
    assert "root:" not in body
    assert api.get("/version")[0] == 200


# ---------------------------------------------------------------- WebSocket feed

def test_first_frame_is_config_then_running_and_last_state(api, shared):
    set_schedule(shared, "report", last_run=utc(2024, 5, 1, 9, 0))
    state.init_results(shared, "report", "reports", ["web1"], utc(2024, 5, 1, 9, 0))
    state.start_instance(shared, "report", "report_1", ["web1"], utc(2024, 5, 1, 9, 0))
    state.finish_machine(shared, "report", "report_1", "web1", 0, "done\n")
    state.end_instance(shared, "report", "report_1")
    with ws_connect(api.ws_url) as conn:
        first = ws_recv_json(conn)
        assert set(first) == {"config", "sp_version"}
        assert set(first["config"]) >= {"crons", "maintenance", "serial"}
        assert first["config"]["crons"]["backup"]["command"] == "backup.sh"
        second = ws_recv_json(conn)
        assert set(second) == {"running", "last_state"}
        assert second["running"] == {}
        assert second["last_state"] == {
            "report": {"last_run": "2024-05-01T09:00:00+00:00", "result_ok": True}}


def test_config_is_pushed_again_when_its_serial_changes(api, shared):
    with ws_connect(api.ws_url) as conn:
        ws_recv_json(conn)
        jobs = dict(JOBS, newjob=dict(JOBS["report"], command="new.sh"))
        publish_jobs(shared, jobs, serial=2.0, maintenance={"global": True, "machines": []})
        started = time.monotonic()
        message = ws_wait(conn, lambda m: "config" in m, timeout=3, what="new config")
        assert time.monotonic() - started < 1.5
        assert message["config"]["serial"] == 2.0
        assert "newjob" in message["config"]["crons"]
        assert message["config"]["maintenance"]["global"] is True


def test_running_changes_are_pushed_at_once_and_refreshed_every_two_seconds(api, shared):
    with ws_connect(api.ws_url) as conn:
        ws_recv_json(conn), ws_recv_json(conn)
        instance = start_backup_run(shared)
        started = time.monotonic()
        message = ws_wait(conn, lambda m: instance in m.get("running", {}), timeout=3,
                          what="running instance")
        assert time.monotonic() - started < 1.0
        assert message["running"][instance]["machines"] == ["web1", "web2"]
        refresh_started = time.monotonic()
        ws_wait(conn, lambda m: "running" in m, timeout=3, what="periodic refresh")
        assert time.monotonic() - refresh_started < 2.6


def test_subscribed_job_output_grows_live_and_retcode_becomes_int(api, shared):
    instance = start_backup_run(shared, machines=("web1",))
    with ws_connect(api.ws_url) as conn:
        ws_recv_json(conn), ws_recv_json(conn)
        conn.send(json.dumps({"subscribe": "backup"}))
        first = ws_wait(conn, lambda m: "backup" in m, what="job frame")
        assert set(first) == {"backup"}
        assert first["backup"]["results"]["web1"]["retcode"] == ""
        for line in range(1, 4):
            write_live_output(shared, instance, "web1", "".join(
                "line%d\n" % n for n in range(1, line + 1)))
            started = time.monotonic()
            message = ws_wait(conn, lambda m: "line%d" % line in
                              m.get("backup", {}).get("results", {}).get("web1", {}).get("ret", ""),
                              timeout=3, what="line%d" % line)
            assert time.monotonic() - started < 1.0
        state.finish_machine(shared, "backup", instance, "web1", 0, "line1\nline2\nline3\n",
                             endtime=utc(2024, 5, 1, 10, 0, 5))
        message = ws_wait(conn, lambda m: m.get("backup", {}).get("results", {}).get(
            "web1", {}).get("retcode") == 0, what="final result")
        assert message["backup"]["results"]["web1"]["endtime"] == "2024-05-01T10:00:05+00:00"
        conn.send(json.dumps({"unsubscribe": "backup"}))
        write_live_output(shared, instance, "web1", "ignored")
        ws_wait(conn, lambda m: "running" in m, what="refresh")  # no error, still served


def test_subscribe_accepts_a_list_and_reports_unknown_jobs(api):
    with ws_connect(api.ws_url) as conn:
        ws_recv_json(conn), ws_recv_json(conn)
        conn.send(json.dumps({"subscribe": ["backup", "ghost"]}))
        error = ws_wait(conn, lambda m: "error" in m, what="error")
        assert "ghost" in error["error"]
        ws_wait(conn, lambda m: "backup" in m, what="backup frame")


def test_run_now_goes_to_the_scheduler(api, shared):
    with ws_connect(api.ws_url) as conn:
        ws_recv_json(conn), ws_recv_json(conn)
        conn.send(json.dumps({"run": "report"}))
        reply = ws_wait(conn, lambda m: "result" in m or "error" in m, what="reply")
        assert reply == {"result": {"command": "run", "job": "report"}}
        assert drain(shared.scheduler_commands) == [("run", "report")]
        conn.send(json.dumps({"run": "ghost"}))
        reply = ws_wait(conn, lambda m: "error" in m, what="error")
        assert "unknown job" in reply["error"]
        assert drain(shared.scheduler_commands, timeout=0.5) == []


def test_kill_cron_and_kill_machine_over_the_socket(api, shared):
    instance = start_backup_run(shared)
    with ws_connect(api.ws_url) as conn:
        ws_recv_json(conn), ws_recv_json(conn)
        conn.send(json.dumps({"killMachine": {"cron": "backup", "machine": "web2"}}))
        reply = ws_wait(conn, lambda m: "result" in m or "error" in m, what="reply")
        assert reply["result"]["killed"] == {instance: ["web2"]}
        assert drain(shared.ws_commands) == [("kill", instance, ["web2"], "user")]
        assert set(state.get_kills(shared, instance)) == {"web2"}

        conn.send(json.dumps({"killMachine": {"cron": "backup", "machine": "db9"}}))
        reply = ws_wait(conn, lambda m: "error" in m, what="error")
        assert "db9" in reply["error"]

        conn.send(json.dumps({"killCron": "backup"}))
        reply = ws_wait(conn, lambda m: "result" in m, what="reply")
        # web2 has not reported yet, so it is asked again: a repeated kill is harmless
        assert reply["result"]["killed"] == {instance: ["web1", "web2"]}
        assert drain(shared.ws_commands) == [("kill", instance, ["web1", "web2"], "user")]

        conn.send(json.dumps({"killCron": "report"}))
        reply = ws_wait(conn, lambda m: "error" in m, what="error")
        assert "not running" in reply["error"]
        assert drain(shared.ws_commands, timeout=0.5) == []


@pytest.mark.parametrize("bad", [
    "not json", "[]", "42", "{}", '{"frobnicate": 1}', '{"subscribe": 5}',
    '{"subscribe": []}', '{"run": null}', '{"run": ["a"]}', '{"killCron": {}}',
    '{"killMachine": "backup"}', '{"killMachine": {"cron": "backup"}}',
    '{"getTimeline": "now"}', '{"getTimeline": {"start_date": "soon"}}',
    '{"getTimeline": {"start_date": "now", "end_date": "now-1d"}}',
])
def test_bad_socket_input_gets_an_error_and_the_socket_keeps_working(api, bad):
    with ws_connect(api.ws_url) as conn, ws_connect(api.ws_url) as bystander:
        ws_recv_json(conn), ws_recv_json(conn)
        conn.send(bad)
        reply = ws_wait(conn, lambda m: "error" in m, what="error for %s" % bad)
        assert isinstance(reply["error"], str) and reply["error"]
        conn.send(json.dumps({"subscribe": "backup"}))
        ws_wait(conn, lambda m: "backup" in m, what="job frame after bad input")
        ws_wait(bystander, lambda m: "running" in m, what="bystander refresh")


def test_get_timeline_over_the_socket(api, tmp_path):
    now = datetime.now(timezone.utc)
    write_history(tmp_path, [
        event("machine_start", "backup", "backup_1", "web1", now - timedelta(minutes=90)),
        event("machine_result", "backup", "backup_1", "web1", now - timedelta(minutes=89), 3),
        event("end", "backup", "backup_1", "", now - timedelta(minutes=89)),
        event("machine_start", "report", "report_2", "web1", now - timedelta(minutes=1)),
    ])
    with ws_connect(api.ws_url) as conn:
        ws_recv_json(conn), ws_recv_json(conn)
        conn.send(json.dumps({"getTimeline": {"start_date": "now-2h", "end_date": "now",
                                              "id": 7}}))
        reply = ws_wait(conn, lambda m: "timeline" in m, what="timeline")
        assert reply["timeline"]["id"] == 7
        assert [(e["cron"], e["msg_type"], e["ret_code"])
                for e in reply["timeline"]["content"]] == [
            ("backup", "machine_start", 0), ("backup", "machine_result", 3),
            ("report", "machine_start", 0)]
        start = (now - timedelta(minutes=30)).isoformat()
        conn.send(json.dumps({"getTimeline": {"start_date": start,
                                              "end_date": now.isoformat(), "id": "x"}}))
        reply = ws_wait(conn, lambda m: "timeline" in m, what="timeline")
        assert [e["cron"] for e in reply["timeline"]["content"]] == ["report"]


def test_sigterm_stops_the_api_with_a_socket_open(shared):
    api = ApiProcess(shared).start()
    with ws_connect(api.ws_url) as conn:
        ws_recv_json(conn)
        started = time.monotonic()
        assert api.stop() == 0
        assert time.monotonic() - started < 5


# ---------------------------------------------------------------- access control

def test_basic_auth_guards_http_and_socket(api_factory):
    api = api_factory({"auth_users": {"ops": hash_password("s3cret", iterations=1000)}})
    status, headers, body = api.get("/version")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert body["error"]
    assert api.request("OPTIONS", "/version")[0] == 204
    api.auth = ("ops", "wrong")
    assert api.get("/status")[0] == 401
    api.auth = ("ops", "s3cret")
    assert api.get("/status")[0] == 200
    assert api.get("/")[0] == 200
    with pytest.raises(Exception):
        with ws_connect(api.ws_url):
            pass
    token = base64.b64encode(b"ops:s3cret").decode()
    with ws_connect(api.ws_url, additional_headers={"Authorization": "Basic " + token}) as conn:
        assert "config" in ws_recv_json(conn)


def test_read_only_refuses_every_command_that_changes_something(api_factory, shared):
    api = api_factory({"read_only": True})
    start_backup_run(shared)
    status, _, body = api.request("POST", "/kill", {"job": "backup"})
    assert status == 403 and "read-only" in body["error"]
    with ws_connect(api.ws_url) as conn:
        ws_recv_json(conn), ws_recv_json(conn)
        for command in ({"run": "backup"}, {"killCron": "backup"},
                        {"killMachine": {"cron": "backup", "machine": "web1"}}):
            conn.send(json.dumps(command))
            assert "read-only" in ws_wait(conn, lambda m: "error" in m, what="refusal")["error"]
        conn.send(json.dumps({"subscribe": "backup"}))
        ws_wait(conn, lambda m: "backup" in m, what="job frame")
    assert drain(shared.ws_commands, timeout=0.3) == []
    assert drain(shared.scheduler_commands, timeout=0.3) == []


def test_password_hashes():
    stored = hash_password("pw", iterations=1000)
    assert stored.startswith("pbkdf2_sha256$1000$")
    assert check_password("pw", stored)
    assert not check_password("pw2", stored)
    assert not check_password("pw", "garbage")
    assert not check_password("pw", "md5$1$2$3")


# ---------------------------------------------------------------- pure pieces

def test_last_state_judges_the_last_finished_run():
    memory = {}
    job_states = {
        "good": {"last_run": "t1", "results": {"a": {"retcode": 0}, "b": {"retcode": 0}}},
        "bad": {"last_run": "t2", "results": {"a": {"retcode": 0}, "b": {"retcode": 143}}},
        "empty": {"last_run": "t3", "results": {}},
        "never": {"last_run": "", "results": {}},
    }
    summary = last_state(job_states, {}, memory)
    assert summary == {"good": {"last_run": "t1", "result_ok": True},
                       "bad": {"last_run": "t2", "result_ok": False},
                       "empty": {"last_run": "t3", "result_ok": False}}
    # "bad" runs again: while it runs, its previous verdict stands.
    job_states["bad"] = {"last_run": "t4", "results": {"a": {"retcode": ""}}}
    summary = last_state(job_states, {"bad_4": {"name": "bad"}}, memory)
    assert summary["bad"] == {"last_run": "t4", "result_ok": False}
    job_states["bad"]["results"]["a"]["retcode"] = 0
    assert last_state(job_states, {}, memory)["bad"]["result_ok"] is True


def test_parse_date():
    now = utc(2024, 5, 1, 12, 0, 0)
    assert parse_date("now", now) == now
    assert parse_date("now-5m", now) == utc(2024, 5, 1, 11, 55)
    assert parse_date("now-2h", now) == utc(2024, 5, 1, 10, 0)
    assert parse_date("now-1d", now) == utc(2024, 4, 30, 12, 0)
    assert parse_date("2024-05-01T10:00:00Z", now) == utc(2024, 5, 1, 10, 0)
    assert parse_date("2024-05-01T12:00:00+02:00", now) == utc(2024, 5, 1, 10, 0)
    assert parse_date("2024-05-01T10:00:00", now) == utc(2024, 5, 1, 10, 0)
    assert parse_date(1714557600000, now) == utc(2024, 5, 1, 10, 0)
    for bad in ("yesterday", "now-5x", "", None, [], True):
        with pytest.raises(ValueError):
            parse_date(bad, now)


def test_history_timeline_finds_a_range_in_a_big_file(tmp_path):
    base = utc(2024, 1, 1)
    events = []
    for minute in range(20000):  # ~14 days, a few MB
        moment = base + timedelta(minutes=minute)
        kind = ("start", "machine_start", "machine_result", "end")[minute % 4]
        events.append(event(kind, "job%d" % (minute % 7), "inst%d" % (minute // 4),
                            "m1", moment, minute % 3))
    write_history(tmp_path, events)
    path = str(tmp_path / "history.jsonl")
    with open(path, "ab") as handle:
        handle.write(b"garbage line\n{\"timestamp\": \"not a date\"}\n")
    start, end = base + timedelta(days=5), base + timedelta(days=5, hours=2)
    expected = [e for e in events
                if start <= datetime.fromisoformat(e["timestamp"]) <= end
                and e["msg_type"] in ("machine_start", "machine_result")]
    got = history_timeline(path, start, end)
    assert [g["timestamp"] for g in got] == [e["timestamp"] for e in expected]
    assert got[0] == {"cron": expected[0]["cron"], "job_instance": expected[0]["job_instance"],
                      "msg_type": expected[0]["msg_type"], "ret_code": expected[0]["ret_code"],
                      "timestamp": expected[0]["timestamp"]}
    assert history_timeline(path, base - timedelta(days=9), base - timedelta(days=8)) == []
    assert len(history_timeline(path, base, base + timedelta(days=30))) == 10000
    assert history_timeline(str(tmp_path / "missing.jsonl"), start, end) == []


def event(msg_type, cron, instance, machine, moment, ret_code=0):
    return {"cron": cron, "group": "g", "job_instance": instance, "machine": machine,
            "msg_type": msg_type, "ret_code": ret_code, "timestamp": moment.isoformat()}


def write_history(statedir, events):
    with open(os.path.join(str(statedir), "history.jsonl"), "a") as handle:
        for item in events:
            handle.write(json.dumps(item) + "\n")


# ---------------------------------------------------------------- end to end: the real daemon

NEVER = {"sec": "0", "min": "0", "hour": "0", "dom": "1", "mon": "1", "dow": "*",
         "year": "2099"}
COUNTING = "for i in 1 2 3 4 5; do echo line$i; sleep 1; done"


def never_job(name, command):
    """YAML of a job that only runs when asked (run-now)."""
    return json.dumps({name: dict(NEVER, command=command)})


def long_job(tmp_path):
    """A command that sleeps for a unique, findable number of seconds."""
    seconds = "3%d.%06d" % (os.getpid() % 1000, int(time.time() * 1e6) % 1000000)
    return "echo started; sleep %s; : %s" % (seconds, tmp_path), seconds


@contextlib.contextmanager
def daemon_ws(daemon):
    """A UI connection to the daemon's API, past its first (config) frame."""
    with ws_connect("ws://127.0.0.1:%d/ws" % daemon.api_port) as conn:
        assert "config" in ws_recv_json(conn)
        yield conn


def machine_results(message, job):
    return (message.get(job) or {}).get("results") or {}


def wait_final(daemon, job, timeout=30):
    def final():
        results = daemon.http_get("/status")["state"][job]["results"]
        if results and all(r["retcode"] != "" for r in results.values()):
            return results
    return wait_for(final, timeout=timeout, message="final results of %s" % job)


def test_daemon_api_endpoints(daemon_factory):
    daemon = daemon_factory(api=True)
    write_job(daemon.config_dir, "demo", never_job("quiet", "true"))
    daemon.start()
    assert daemon.http_get("/version")["version"]
    config = wait_for(lambda: (c := daemon.http_get("/config"))["crons"].get("quiet") and c,
                      message="job in /config")
    assert config["crons"]["quiet"]["command"] == "true"
    assert "maintenance" in config and isinstance(config["serial"], float)
    assert daemon.http_get("/running") == {}
    assert daemon.http_get("/status")["state"]["quiet"]["next_run"].startswith("2099-01-01")
    assert daemon.http_get("/timeline")["content"] == []
    request = urllib.request.Request("http://127.0.0.1:%d/config" % daemon.api_port,
                                     method="OPTIONS")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_daemon_run_now_and_watch_output_grow_live(daemon_factory):
    daemon = daemon_factory(api=True)
    write_job(daemon.config_dir, "demo", never_job("count", COUNTING))
    daemon.start()
    wait_for(lambda: "count" in daemon.http_get("/config")["crons"], message="config")
    with daemon_ws(daemon) as conn:
        conn.send(json.dumps({"subscribe": "count"}))
        conn.send(json.dumps({"run": "count"}))
        ws_wait(conn, lambda m: m.get("result", {}).get("command") == "run", what="run ack")
        seen_at = {}
        deadline = time.monotonic() + 30
        while len(seen_at) < 5 and time.monotonic() < deadline:
            message = ws_recv_json(conn, timeout=10)
            for result in machine_results(message, "count").values():
                for n in range(1, 6):
                    if "line%d" % n in result["ret"]:
                        seen_at.setdefault(n, time.monotonic())
        assert sorted(seen_at) == [1, 2, 3, 4, 5]
        for n in range(2, 6):  # each line shows up within 2 s of the one before
            assert seen_at[n] - seen_at[n - 1] < 2.0, seen_at
        final = ws_wait(conn, lambda m: any(r["retcode"] == 0 for r in
                                            machine_results(m, "count").values()),
                        timeout=15, what="retcode 0")
        result = next(iter(machine_results(final, "count").values()))
        assert result["ret"] == "line1\nline2\nline3\nline4\nline5\n"
        assert result["endtime"] and "+00:00" in result["endtime"]
        ws_wait(conn, lambda m: m.get("last_state", {}).get("count", {}).get("result_ok")
                is True and not m["running"], timeout=10, what="last_state ok")
        conn.send(json.dumps({"getTimeline": {"start_date": "now-5m", "end_date": "now",
                                              "id": "t"}}))
        timeline = ws_wait(conn, lambda m: "timeline" in m, what="timeline")["timeline"]
        assert [e["msg_type"] for e in timeline["content"]] == ["machine_start",
                                                                "machine_result"]
        assert timeline["content"][1]["ret_code"] == 0


@pytest.mark.parametrize("how", ["killCron", "POST /kill", "killMachine"])
def test_daemon_kill_a_long_job(daemon_factory, tmp_path, how):
    daemon = daemon_factory(api=True)
    command, marker = long_job(tmp_path)
    write_job(daemon.config_dir, "demo", never_job("long", command))
    daemon.start()
    wait_for(lambda: "long" in daemon.http_get("/config")["crons"], message="config")
    with daemon_ws(daemon) as conn:
        conn.send(json.dumps({"subscribe": "long"}))
        conn.send(json.dumps({"run": "long"}))
        message = ws_wait(conn, lambda m: any("started" in r["ret"] for r in
                                              machine_results(m, "long").values()),
                          timeout=20, what="job started")
        machine = next(iter(machine_results(message, "long")))
        assert pids_with_marker(marker)
        if how == "killCron":
            conn.send(json.dumps({"killCron": "long"}))
            assert "result" in ws_wait(conn, lambda m: "result" in m or "error" in m,
                                       what="kill reply")
        elif how == "killMachine":
            conn.send(json.dumps({"killMachine": {"cron": "long", "machine": machine}}))
            assert "result" in ws_wait(conn, lambda m: "result" in m or "error" in m,
                                       what="kill reply")
        else:
            status, body = daemon.http_post("/kill", {"job": "long"})
            assert status == 200 and body["killed"]
    results = wait_final(daemon, "long", timeout=30)
    assert results[machine]["retcode"] == 143
    wait_for(lambda: not pids_with_marker(marker), timeout=15, message="no process left")
    wait_for(lambda: daemon.http_get("/running") == {}, message="instance ended")
    with pytest.raises(urllib.error.HTTPError) as refused:
        daemon.http_post("/kill", {"job": "long"})
    assert refused.value.code == 409
    assert "not running" in json.loads(refused.value.read())["error"]


def test_daemon_api_survives_bad_input(daemon_factory):
    daemon = daemon_factory(api=True)
    write_job(daemon.config_dir, "demo", never_job("quiet", "true"))
    daemon.start()
    with daemon_ws(daemon) as conn:
        for bad in ("{", '{"run": "ghost"}', '{"killCron": "ghost"}', '{"nope": 1}',
                    '{"killMachine": {"cron": 1, "machine": []}}', '"just a string"'):
            conn.send(bad)
            assert ws_wait(conn, lambda m: "error" in m, what="error for %s" % bad)["error"]
    for body in (b"{", b'{"job": "ghost"}'):
        request = urllib.request.Request("http://127.0.0.1:%d/kill" % daemon.api_port,
                                         data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code in (400, 404)
        assert json.loads(refused.value.read())["error"]
    assert daemon.http_get("/version")["version"]


def test_daemon_indexes_events_into_the_search_engine_and_survives_a_down_one(
        daemon_factory, tmp_path):
    with Engine() as engine:
        daemon = daemon_factory(api=True, extra_args=["-e", engine.url, "-i", "sp"])
        write_job(daemon.config_dir, "demo", never_job("quick", "echo hi"))
        daemon.start()
        wait_for(lambda: "quick" in daemon.http_get("/config")["crons"], message="config")
        with daemon_ws(daemon) as conn:
            conn.send(json.dumps({"run": "quick"}))
            wait_for(lambda: {b["msg_type"] for _, _, b in engine.requests} >= {
                "start", "machine_start", "machine_result", "end"}, timeout=30,
                message="events indexed")
        today = datetime.now(timezone.utc).strftime("%Y.%m.%d")
        posts = [(path, body) for method, path, body in engine.requests if "_doc" in path]
        assert all(path in ("/sp-%s/_doc" % today, "/sp-%s/_doc" % (
            datetime.now(timezone.utc) - timedelta(minutes=1)).strftime("%Y.%m.%d"))
            for path, _ in posts)
        result = next(body for _, body in posts if body["msg_type"] == "machine_result")
        assert set(result) == {"job_name", "group", "job_instance", "@timestamp",
                               "return_code", "machine", "output", "msg_type"}
        assert result["job_name"] == "quick" and result["return_code"] == 0
        daemon.stop()
    with BlackHole() as hole:
        daemon = daemon_factory(api=True, extra_args=["-e", hole.url])
        write_job(daemon.config_dir, "demo", never_job("quick2", "echo hi"))
        daemon.start()
        wait_for(lambda: "quick2" in daemon.http_get("/config")["crons"], message="config")
        started = time.monotonic()
        with daemon_ws(daemon) as conn:
            conn.send(json.dumps({"run": "quick2"}))
        wait_for(lambda: "Finished" in daemon.log("quick2"), timeout=40,
                 message="job finished despite the hanging engine")
        assert time.monotonic() - started < 30
        assert daemon.http_get("/version")["version"]
