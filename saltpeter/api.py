"""The HTTP and WebSocket API (SPEC section 9), run in its own process with ``-a``.

One tornado application on the API port serves:

- legacy JSON endpoints ``GET /version``, ``/config``, ``/running``, ``/timeline``, and the
  new ``GET /status``, ``GET /jobs`` (a small per-job summary for the built-in UI) and
  ``POST /kill``; all with CORS headers, ``OPTIONS`` answered 204;
- ``WS /ws``, the live feed of the web UI (legacy ``saltpeter-ui`` or the built-in one);
- the web UI's static files at every other path (``index.html`` for unknown paths).

This process only reads the shared state, through ``saltpeter.state``; its two writes go
through the same module: kill requests (``state.request_kill``) and run-now requests
(put on ``shared.scheduler_commands``, where the scheduler applies the overlap rules).

A ``Broadcaster`` polls the shared state every ``POLL_INTERVAL`` seconds and pushes to
the sockets what changed, and everything every ``PUSH_INTERVAL`` seconds.

Options read (``run_api(..., options)``): ``ui_dir``, ``elasticsearch``, ``opensearch``,
``index``, ``auth_users``, ``read_only``.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import signal
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Optional, Set

import tornado.web
import tornado.websocket
from tornado.ioloop import PeriodicCallback

import saltpeter
from saltpeter import state
from saltpeter.joblog import HISTORY_FILE
from saltpeter.search_index import TIMELINE_MSG_TYPES, SearchIndex, SearchIndexError

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25            # seconds between cheap looks at the shared state
PUSH_INTERVAL = 2.0             # every socket gets a full refresh at least this often
ACCESS_REFRESH_INTERVAL = 1.0   # seconds between looks at the config's saltpeter_api section
SHUTDOWN_CLOSE_WAIT = 2.0       # seconds given to open connections when the API stops
MAX_WS_MESSAGE = 64 * 1024      # client commands are tiny
MAX_HTTP_BODY = 64 * 1024
DEFAULT_TIMELINE_START = "now-1d"
DEFAULT_TIMELINE_END = "now"
# history.jsonl is appended by several processes, each at its own event time: close to,
# not exactly, time order. Searching and stopping early allow this much disorder.
HISTORY_DISORDER = timedelta(minutes=10)
HISTORY_BISECT_WINDOW = 64 * 1024   # below this many bytes, read linearly
KILL_REASON = "user"            # the wrapper then reports RETCODE_KILLED (143)
BUILTIN_UI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui")
INDEX_HTML = "index.html"
PASSWORD_SCHEME = "pbkdf2_sha256"
PASSWORD_ITERATIONS = 200_000
AUTH_REALM = "saltpeter"

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": ("Authorization,DNT,User-Agent,X-Requested-With,"
                                     "If-Modified-Since,Cache-Control,Content-Type,Range"),
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
}


# ---------------------------------------------------------------- JSON

def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # the daemon keeps aware UTC datetimes; be safe anyway
            value = value.replace(tzinfo=timezone.utc)
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def to_json(value: Any) -> str:
    """JSON text of ``value``; datetimes become ISO 8601 strings with a UTC offset."""
    return json.dumps(value, default=_json_default)


# ---------------------------------------------------------------- shared-state snapshots

def known_jobs(shared: state.Shared) -> Set[str]:
    """Jobs in the config, plus jobs that still have state (e.g. just removed)."""
    return set(state.get_config(shared).get("crons") or {}) | set(shared.state.keys())


def last_state(job_states: Dict[str, Any], running: Dict[str, Any],
               memory: Dict[str, bool]) -> Dict[str, Dict[str, Any]]:
    """``{job: {"last_run", "result_ok"}}`` for every job that has run.

    ``result_ok`` is about the last *finished* run: it had at least one result and every
    retcode was 0. While a job runs, its results are the current run's, so the verdict
    of its previous run is taken from ``memory`` (updated here; True if never seen, as
    the legacy server did)."""
    running_jobs = {entry.get("name") for entry in running.values()}
    summary = {}
    for job_name, job_state in job_states.items():
        last_run = job_state.get("last_run")
        if not last_run:
            continue
        retcodes = [result.get("retcode", "")
                    for result in (job_state.get("results") or {}).values()]
        if job_name not in running_jobs and all(code != "" for code in retcodes):
            memory[job_name] = bool(retcodes) and all(code == 0 for code in retcodes)
        summary[job_name] = {"last_run": last_run,
                             "result_ok": memory.get(job_name, True)}
    return summary


# ---------------------------------------------------------------- commands

class CommandError(Exception):
    """A refused command: ``status`` is the HTTP status, the message goes to the user."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _require_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise CommandError(400, "%s must be a non-empty string" % what)
    return value


def request_run(shared: state.Shared, job_name: Any) -> Dict[str, Any]:
    """Ask the scheduler to run ``job_name`` now (it applies the overlap rules)."""
    job_name = _require_name(job_name, "run")
    if job_name not in (state.get_config(shared).get("crons") or {}):
        raise CommandError(404, "unknown job %r" % job_name)
    shared.scheduler_commands.put(("run", job_name))
    log.info("job %s: run now requested through the API", job_name)
    return {"command": "run", "job": job_name}


def kill_job(shared: state.Shared, job_name: Any) -> Dict[str, Any]:
    """Kill every machine of every running instance of ``job_name``.

    Raises ``CommandError`` 404 for an unknown job, 409 if it is not running."""
    job_name = _require_name(job_name, "job")
    instances = state.instances_of(shared, job_name)
    if not instances:
        if job_name not in known_jobs(shared):
            raise CommandError(404, "unknown job %r" % job_name)
        raise CommandError(409, "job %r is not running" % job_name)
    killed = {}
    for instance in instances:
        machines = state.request_kill(shared, job_name, instance,
                                      state.instance_machines(shared, instance),
                                      KILL_REASON, time.time())
        if machines:
            killed[instance] = machines
            log.info("job %s instance %s: kill requested through the API for %s",
                     job_name, instance, ", ".join(machines))
    if not killed:
        raise CommandError(409, "job %r has no machine left to kill" % job_name)
    return {"command": "killCron", "job": job_name, "killed": killed}


def kill_machine(shared: state.Shared, job_name: Any, machine: Any,
                 instance: Optional[str] = None) -> Dict[str, Any]:
    """Kill ``machine`` in the running instance(s) of ``job_name`` (only ``instance``
    if given). Raises ``CommandError`` 404/409 like ``kill_job``."""
    job_name = _require_name(job_name, "cron")
    machine = _require_name(machine, "machine")
    if instance is not None and not isinstance(instance, str):
        raise CommandError(400, "job_instance must be a string")
    instances = [candidate for candidate in state.instances_of(shared, job_name)
                 if instance in (None, candidate)]
    if not instances and job_name not in known_jobs(shared):
        raise CommandError(404, "unknown job %r" % job_name)
    killed = {}
    for candidate in instances:
        if machine in state.instance_machines(shared, candidate):
            if state.request_kill(shared, job_name, candidate, [machine], KILL_REASON,
                                  time.time()):
                killed[candidate] = [machine]
                log.info("job %s instance %s: kill requested through the API for %s",
                         job_name, candidate, machine)
    if not killed:
        raise CommandError(409, "machine %r is not running job %r" % (machine, job_name))
    return {"command": "killMachine", "job": job_name, "killed": killed}


# ---------------------------------------------------------------- timeline

_RELATIVE_DATE = re.compile(r"^now(?:\s*-\s*(\d+)\s*([smhdw]))?$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_HISTORY_TIMESTAMP = re.compile(rb'"timestamp"\s*:\s*"([^"]+)"')


def parse_date(value: Any, now: Optional[datetime] = None) -> datetime:
    """An aware UTC datetime from ``now``, ``now-<n><s|m|h|d|w>``, an ISO 8601 string
    (naive means UTC) or epoch seconds/milliseconds. Raises ValueError otherwise."""
    now = now or datetime.now(timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1000.0 if value > 1e11 else float(value)
        return datetime.fromtimestamp(seconds, timezone.utc)
    if not isinstance(value, str):
        raise ValueError("a date must be a string like 'now-5m' or ISO 8601")
    match = _RELATIVE_DATE.match(value.strip())
    if match:
        amount, unit = match.groups()
        return now - timedelta(seconds=int(amount) * _UNIT_SECONDS[unit] if amount else 0)
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError("bad date %r: expected 'now', 'now-5m', 'now-2h', 'now-1d' "
                         "or ISO 8601" % value) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _history_line_time(line: bytes) -> Optional[datetime]:
    match = _HISTORY_TIMESTAMP.search(line)
    if not match:
        return None
    try:
        moment = datetime.fromisoformat(match.group(1).decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _history_offset_before(handle, target: datetime) -> int:
    """A byte offset at a line start, before every line whose time is >= ``target``
    (assuming lines are in time order), found by bisection."""
    low, high = 0, handle.seek(0, os.SEEK_END)
    while high - low > HISTORY_BISECT_WINDOW:
        middle = (low + high) // 2
        handle.seek(middle)
        handle.readline()  # the rest of a line cut in the middle
        line_start = handle.tell()
        moment = _history_line_time(handle.readline())
        if moment is not None and moment < target:
            low = line_start
        else:
            high = middle
    return low


def history_timeline(path: str, start: datetime, end: datetime) -> List[Dict[str, Any]]:
    """Timeline entries ``{cron, job_instance, msg_type, ret_code, timestamp}`` of the
    ``machine_start``/``machine_result`` events of the run history file at ``path``
    with ``start <= timestamp <= end``, in file order. A missing file is an empty
    timeline; unreadable lines are skipped. Reads only the part of the file near the
    range."""
    entries = []
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return entries
    with handle:
        handle.seek(_history_offset_before(handle, start - HISTORY_DISORDER))
        stop_after = end + HISTORY_DISORDER
        for line in handle:
            moment = _history_line_time(line)
            if moment is None:
                continue
            if moment > stop_after:
                break
            if moment < start or moment > end or b'"machine_' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("msg_type") not in TIMELINE_MSG_TYPES:
                continue
            entries.append({"cron": event.get("cron"),
                            "job_instance": event.get("job_instance"),
                            "msg_type": event.get("msg_type"),
                            "ret_code": event.get("ret_code"),
                            "timestamp": event.get("timestamp")})
    return entries


class TimelineSource:
    """The search engine when one is configured, else the daemon's run history."""

    def __init__(self, statedir: str, search_index: Optional[SearchIndex]):
        self.history_path = os.path.join(statedir or ".", HISTORY_FILE)
        self.search_index = search_index

    def query(self, start: datetime, end: datetime) -> List[Dict[str, Any]]:
        """Timeline entries between ``start`` and ``end`` (blocking: call it off the
        event loop). A failing engine is logged and the run history answers instead."""
        if self.search_index is not None:
            try:
                return self.search_index.timeline(start, end)
            except SearchIndexError as exc:
                log.error("timeline: %s; answering from the run history instead", exc)
        return history_timeline(self.history_path, start, end)


def _timeline_range(start_value: Any, end_value: Any):
    now = datetime.now(timezone.utc)
    try:
        start = parse_date(DEFAULT_TIMELINE_START if start_value is None else start_value, now)
        end = parse_date(DEFAULT_TIMELINE_END if end_value is None else end_value, now)
    except ValueError as exc:
        raise CommandError(400, str(exc)) from None
    if start > end:
        raise CommandError(400, "start_date is after end_date")
    return start, end


# ---------------------------------------------------------------- access control

def hash_password(password: str, salt: Optional[str] = None,
                  iterations: int = PASSWORD_ITERATIONS) -> str:
    """A hash for ``options['auth_users']``: ``pbkdf2_sha256$<iterations>$<salt>$<hex>``."""
    salt = salt or secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt.encode("utf-8"),
                                 iterations)
    return "%s$%d$%s$%s" % (PASSWORD_SCHEME, iterations, salt, digest.hex())


def check_password(password: str, stored: str) -> bool:
    """True if ``password`` matches ``stored`` (a ``hash_password`` result)."""
    try:
        scheme, iterations, salt, expected = stored.split("$", 3)
        if scheme != PASSWORD_SCHEME:
            return False
        digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"),
                                     salt.encode("utf-8"), int(iterations))
    except (AttributeError, ValueError):
        return False
    return hmac.compare_digest(digest.hex(), expected)


class Authenticator:
    """HTTP basic auth against ``{user: hash}``; remembers headers that already passed,
    so the slow hash runs once per client, not once per request."""

    def __init__(self, users: Optional[Dict[str, str]]):
        self.users = dict(users or {})
        self._passed: Set[bytes] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.users)

    def check(self, header: Optional[str]) -> bool:
        """True if auth is off, or ``header`` carries a valid user and password."""
        if not self.enabled:
            return True
        if not header or not header.startswith("Basic "):
            return False
        fingerprint = hashlib.sha256(header.encode("utf-8", "replace")).digest()
        if fingerprint in self._passed:
            return True
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode(
                "utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        stored = self.users.get(user)
        if stored is None or not check_password(password, stored):
            return False
        self._passed.add(fingerprint)
        return True


# ---------------------------------------------------------------- HTTP handlers

class ApiMixin:
    """CORS on every answer, 204 for OPTIONS, basic auth when configured."""

    def initialize(self, api: "ApiContext", **kwargs):
        self.api = api

    def set_default_headers(self):
        for name, value in CORS_HEADERS.items():
            self.set_header(name, value)

    def prepare(self):
        if self.request.method == "OPTIONS":
            return
        if not self.api.auth.check(self.request.headers.get("Authorization")):
            raise tornado.web.HTTPError(401, reason="authentication required")

    def options(self, *args, **kwargs):
        self.set_status(204)
        self.finish()

    def write_error(self, status_code: int, **kwargs):
        """Every error is ``{"error": "..."}``."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, tornado.web.HTTPError) and exc.reason:
            message = exc.reason
        else:
            message = self._reason
        if status_code == 401:
            self.set_header("WWW-Authenticate", 'Basic realm="%s"' % AUTH_REALM)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(to_json({"error": message}))


class JsonHandler(ApiMixin, tornado.web.RequestHandler):
    """A JSON endpoint; errors are ``{"error": "..."}`` with a 4xx/5xx status."""

    def write_json(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(to_json(value))

    def fail(self, error: CommandError) -> None:
        self.write_json({"error": str(error)}, error.status)


class VersionHandler(JsonHandler):
    def get(self):
        self.write_json({"version": saltpeter.__version__})


class ConfigHandler(JsonHandler):
    def get(self):
        self.write_json(state.get_config(self.api.shared))


class RunningHandler(JsonHandler):
    def get(self):
        self.write_json(state.running_snapshot(self.api.shared))


class StatusHandler(JsonHandler):
    def get(self):
        self.write_json({"running": state.running_snapshot(self.api.shared),
                         "state": state.state_snapshot(self.api.shared)})


class JobsHandler(JsonHandler):
    """``{job: {group, next_run, last_run, overlap, result_ok, running}}`` without any
    output: what a job list needs, cheap to poll."""

    def get(self):
        shared = self.api.shared
        job_states = state.state_snapshot(shared, with_output=False)
        running = state.running_snapshot(shared)
        verdicts = last_state(job_states, running, self.api.result_memory)
        crons = state.get_config(shared).get("crons") or {}
        jobs = {}
        for job_name in sorted(set(crons) | set(job_states)):
            job_state = job_states.get(job_name) or {}
            jobs[job_name] = {
                "group": job_state.get("group") or (crons.get(job_name) or {}).get("group", ""),
                "next_run": job_state.get("next_run", ""),
                "last_run": job_state.get("last_run", ""),
                "overlap": job_state.get("overlap", False),
                "result_ok": verdicts.get(job_name, {}).get("result_ok"),
                "running": sorted(instance for instance, entry in running.items()
                                  if entry.get("name") == job_name),
            }
        self.write_json(jobs)


class TimelineHandler(JsonHandler):
    """``GET /timeline?start_date=now-1h&end_date=now&id=x`` → ``{"id", "content"}``."""

    async def get(self):
        try:
            start, end = _timeline_range(self.get_query_argument("start_date", None),
                                         self.get_query_argument("end_date", None))
        except CommandError as error:
            return self.fail(error)
        content = await asyncio.get_running_loop().run_in_executor(
            None, self.api.timeline.query, start, end)
        self.write_json({"id": self.get_query_argument("id", ""), "content": content})


class KillHandler(JsonHandler):
    """``POST /kill`` with ``{"job": name}`` (and optionally ``"machine"``)."""

    def post(self):
        try:
            self.api.refuse_if_read_only("kill")
            try:
                body = json.loads(self.request.body or b"null")
            except ValueError:
                raise CommandError(400, "the body must be JSON like {\"job\": \"name\"}")
            if not isinstance(body, dict) or "job" not in body:
                raise CommandError(400, "the body must be JSON like {\"job\": \"name\"}")
            if body.get("machine") is not None:
                result = kill_machine(self.api.shared, body["job"], body["machine"],
                                      body.get("job_instance"))
            else:
                result = kill_job(self.api.shared, body["job"])
        except CommandError as error:
            return self.fail(error)
        self.write_json(result)


class UIHandler(ApiMixin, tornado.web.StaticFileHandler):
    """The web UI's files; any path that is not a file gets ``index.html`` (the UI
    routes it itself, e.g. ``/details/<job>``)."""

    def initialize(self, api: "ApiContext", path: str):
        ApiMixin.initialize(self, api)
        tornado.web.StaticFileHandler.initialize(self, path=path)

    def get(self, path: str, include_body: bool = True):
        if not path or not os.path.isfile(os.path.join(self.root, path)):
            path = INDEX_HTML
        return super().get(path, include_body)

    @classmethod
    def get_cache_time(cls, path, modified, mime_type):
        return 0  # the UI changes with the installed version; never pin it in caches


# ---------------------------------------------------------------- WebSocket

class LiveSocket(ApiMixin, tornado.websocket.WebSocketHandler):
    """One UI connection: pushed updates out, commands in (SPEC section 9)."""

    def initialize(self, api: "ApiContext"):
        ApiMixin.initialize(self, api)
        self.subscriptions: Set[str] = set()

    def check_origin(self, origin):
        return True  # the UI may be served from elsewhere (legacy deployments do)

    def open(self):
        self.peer = self.request.remote_ip
        log.info("UI connected from %s", self.peer)
        self.api.broadcaster.add(self)

    def on_close(self):
        log.info("UI from %s disconnected", getattr(self, "peer", "?"))
        self.api.broadcaster.remove(self)

    def send(self, frame: str) -> None:
        """Send one text frame; a closed socket just leaves the broadcast."""
        try:
            self.write_message(frame)
        except tornado.websocket.WebSocketClosedError:
            self.api.broadcaster.remove(self)

    def reply_error(self, message: str) -> None:
        self.send(to_json({"error": message}))

    async def on_message(self, message):
        try:
            command = json.loads(message)
        except (ValueError, TypeError):
            return self.reply_error("messages must be JSON objects")
        if not isinstance(command, dict) or not command:
            return self.reply_error("messages must be JSON objects with one command")
        for name, method in self.COMMANDS.items():
            if name in command:
                try:
                    await method(self, command[name])
                except CommandError as error:
                    self.reply_error(str(error))
                except Exception:
                    log.exception("UI command %s failed", name)
                    self.reply_error("internal error running %s" % name)
                return
        self.reply_error("unknown command %s; expected one of %s"
                         % (", ".join(sorted(map(str, command))), ", ".join(self.COMMANDS)))

    @staticmethod
    def _names(value: Any, command: str) -> List[str]:
        names = [value] if isinstance(value, str) else value
        if (not isinstance(names, list) or not names
                or not all(isinstance(name, str) and name for name in names)):
            raise CommandError(400, "%s takes a job name or a list of job names" % command)
        return names

    async def _subscribe(self, value):
        names = self._names(value, "subscribe")
        known = known_jobs(self.api.shared)
        unknown = [name for name in names if name not in known]
        for name in names:
            if name in known and name not in self.subscriptions:
                self.subscriptions.add(name)
                self.api.broadcaster.send_job(self, name)
        if unknown:
            raise CommandError(404, "unknown job %s" % ", ".join(map(repr, unknown)))

    async def _unsubscribe(self, value):
        for name in self._names(value, "unsubscribe"):
            self.subscriptions.discard(name)

    async def _ack(self, value):
        """Newer UIs acknowledge output chunks; nothing to do."""

    async def _run(self, value):
        self.api.refuse_if_read_only("run")
        self.send(to_json({"result": request_run(self.api.shared, value)}))

    async def _kill_cron(self, value):
        self.api.refuse_if_read_only("killCron")
        self.send(to_json({"result": kill_job(self.api.shared, value)}))

    async def _kill_machine(self, value):
        self.api.refuse_if_read_only("killMachine")
        if not isinstance(value, dict):
            raise CommandError(400, "killMachine takes {\"cron\": name, \"machine\": name}")
        self.send(to_json({"result": kill_machine(self.api.shared, value.get("cron"),
                                                  value.get("machine"),
                                                  value.get("job_instance"))}))

    async def _get_timeline(self, value):
        if not isinstance(value, dict):
            raise CommandError(400, "getTimeline takes {\"start_date\", \"end_date\", \"id\"}")
        start, end = _timeline_range(value.get("start_date"), value.get("end_date"))
        content = await asyncio.get_running_loop().run_in_executor(
            None, self.api.timeline.query, start, end)
        self.send(to_json({"timeline": {"id": value.get("id"), "content": content}}))

    COMMANDS = {
        "subscribe": _subscribe,
        "unsubscribe": _unsubscribe,
        "ack": _ack,
        "run": _run,
        "killCron": _kill_cron,
        "killMachine": _kill_machine,
        "getTimeline": _get_timeline,
    }


class Broadcaster:
    """Pushes the shared state to every open socket.

    Every ``POLL_INTERVAL``: the config serial, the running instances and each
    subscribed job are compared with what was last sent, and changes are pushed at
    once. Every ``PUSH_INTERVAL``: the running/last_state message and every subscribed
    job are pushed to everyone again."""

    def __init__(self, api: "ApiContext"):
        self.api = api
        self.sockets: Set[LiveSocket] = set()
        self.config_serial: Any = None
        self.running_frame: Optional[str] = None
        self.job_frames: Dict[str, str] = {}
        self.next_full_push = 0.0
        self.failing = False
        self.poller = PeriodicCallback(self.poll, POLL_INTERVAL * 1000)

    def start(self) -> None:
        self.poller.start()

    def stop(self) -> None:
        self.poller.stop()
        for sock in list(self.sockets):
            sock.close(1001, "saltpeter API stopping")
        self.sockets.clear()

    # frames

    def config_frame(self) -> str:
        config = state.get_config(self.api.shared)
        config.setdefault("maintenance", {"global": False, "machines": []})
        self.config_serial = config.get("serial")
        return to_json({"config": config, "sp_version": saltpeter.__version__})

    def status_frame(self, running: Optional[Dict[str, Any]] = None) -> str:
        shared = self.api.shared
        running = state.running_snapshot(shared) if running is None else running
        summary = last_state(state.state_snapshot(shared, with_output=False), running,
                             self.api.result_memory)
        return to_json({"running": running, "last_state": summary})

    def job_frame(self, job_name: str) -> str:
        return to_json({job_name: state.get_job(self.api.shared, job_name) or {}})

    # connections

    def add(self, sock: LiveSocket) -> None:
        """Greet a new socket: config first, then running/last_state."""
        self.sockets.add(sock)
        try:
            sock.send(self.config_frame())
            sock.send(self.status_frame())
        except Exception:
            log.exception("cannot read the shared state for a new UI connection")

    def remove(self, sock: LiveSocket) -> None:
        self.sockets.discard(sock)

    def send_job(self, sock: LiveSocket, job_name: str) -> None:
        frame = self.job_frame(job_name)
        self.job_frames[job_name] = frame
        sock.send(frame)

    def _send_all(self, frame: str, sockets=None) -> None:
        for sock in list(self.sockets if sockets is None else sockets):
            sock.send(frame)

    # the loop

    def poll(self) -> None:
        if not self.sockets:
            return
        try:
            self._poll()
            if self.failing:
                log.info("shared state readable again")
            self.failing = False
        except Exception as exc:  # the Manager going away at shutdown, mostly
            if not self.failing:
                log.error("cannot read the shared state: %r", exc)
            self.failing = True

    def _poll(self) -> None:
        now = time.monotonic()
        full_push = now >= self.next_full_push
        if full_push:
            self.next_full_push = now + PUSH_INTERVAL - POLL_INTERVAL / 2
        if state.config_serial(self.api.shared) != self.config_serial:
            self._send_all(self.config_frame())
        running = state.running_snapshot(self.api.shared)
        running_frame = to_json(running)
        if full_push or running_frame != self.running_frame:
            self.running_frame = running_frame
            self._send_all(self.status_frame(running))
        subscribed: Dict[str, List[LiveSocket]] = {}
        for sock in self.sockets:
            for job_name in sock.subscriptions:
                subscribed.setdefault(job_name, []).append(sock)
        for job_name in list(self.job_frames):
            if job_name not in subscribed:
                del self.job_frames[job_name]
        for job_name, sockets in subscribed.items():
            frame = self.job_frame(job_name)
            if full_push or frame != self.job_frames.get(job_name):
                self.job_frames[job_name] = frame
                self._send_all(frame, sockets)


# ---------------------------------------------------------------- application

class ApiContext:
    """What every handler of one API process shares."""

    def __init__(self, shared: state.Shared, options: Dict[str, Any]):
        self.shared = shared
        self.options = options
        self.read_only = bool(options.get("read_only"))
        self.auth = Authenticator(options.get("auth_users"))
        self.access_serial = 0.0
        self.timeline = TimelineSource(shared.statedir, SearchIndex.from_options(options))
        self.result_memory: Dict[str, bool] = {}
        self.broadcaster = Broadcaster(self)

    def refresh_access(self) -> None:
        """Take the config's ``saltpeter_api`` section (users, read_only) once the daemon
        has published one; it replaces what ``options`` said."""
        try:
            access = state.get_access(self.shared)
        except Exception as exc:   # the Manager going away at shutdown
            log.debug("cannot read API access settings: %r", exc)
            return
        serial = access.get("serial") or 0.0
        if serial and serial != self.access_serial:
            self.access_serial = serial
            self.read_only = bool(access.get("read_only"))
            self.auth = Authenticator(access.get("users"))
            log.info("API access: %s, %s", "basic auth for %d user(s)" % len(self.auth.users)
                     if self.auth.enabled else "open", "read-only" if self.read_only
                     else "read-write")

    def refuse_if_read_only(self, command: str) -> None:
        if self.read_only:
            raise CommandError(403, "%s refused: this Saltpeter API is read-only" % command)


def ui_directory(options: Dict[str, Any]) -> str:
    """``options['ui_dir']`` if it holds an ``index.html``, else the built-in UI."""
    ui_dir = options.get("ui_dir")
    if ui_dir:
        if os.path.isfile(os.path.join(ui_dir, INDEX_HTML)):
            return os.path.abspath(ui_dir)
        log.error("UI directory %s has no %s; serving the built-in UI", ui_dir, INDEX_HTML)
    return BUILTIN_UI_DIR


def make_app(shared: state.Shared, options: Optional[Dict[str, Any]] = None):
    """The tornado application and its context (whose broadcaster the caller starts)."""
    options = dict(options or {})
    api = ApiContext(shared, options)
    routes = [
        (r"/ws", LiveSocket),
        (r"/version", VersionHandler),
        (r"/config", ConfigHandler),
        (r"/running", RunningHandler),
        (r"/status", StatusHandler),
        (r"/jobs", JobsHandler),
        (r"/timeline", TimelineHandler),
        (r"/kill", KillHandler),
    ]
    handlers = [(pattern, handler, {"api": api}) for pattern, handler in routes]
    handlers.append((r"/(.*)", UIHandler, {"api": api, "path": ui_directory(options)}))
    app = tornado.web.Application(handlers, websocket_max_message_size=MAX_WS_MESSAGE,
                                  websocket_ping_interval=PUSH_INTERVAL * 10)
    return app, api


async def serve(shared: state.Shared, host: str, port: int,
                options: Optional[Dict[str, Any]] = None,
                stop_signals=(signal.SIGTERM,)) -> None:
    """Serve the API on ``host:port`` until one of ``stop_signals`` arrives, then close
    the listener and every connection."""
    app, api = make_app(shared, options)
    api.refresh_access()            # before the first request is served
    access_poller = PeriodicCallback(api.refresh_access, ACCESS_REFRESH_INTERVAL * 1000)
    access_poller.start()
    server = app.listen(port, address=host or "", max_body_size=MAX_HTTP_BODY)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in stop_signals:
        loop.add_signal_handler(signum, stop.set)
    api.broadcaster.start()
    log.info("API listening on %s:%d (UI from %s%s%s)", host or "*", port,
             ui_directory(api.options), ", auth on" if api.auth.enabled else "",
             ", read-only" if api.read_only else "")
    try:
        await stop.wait()
    finally:
        log.info("API stopping")
        access_poller.stop()
        server.stop()
        api.broadcaster.stop()
        try:
            await asyncio.wait_for(server.close_all_connections(), SHUTDOWN_CLOSE_WAIT)
        except asyncio.TimeoutError:
            log.warning("API: some connections did not close within %.0fs",
                        SHUTDOWN_CLOSE_WAIT)


def run_api(shared: state.Shared, host: str, port: int,
            options: Optional[Dict[str, Any]] = None) -> None:
    """Entry point of the API process: serve until SIGTERM (or SIGINT, unless the
    caller ignores it, as the daemon's children do), stop cleanly, then return."""
    stop_signals = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        stop_signals.append(signal.SIGINT)
    asyncio.run(serve(shared, host, port, options, tuple(stop_signals)))
