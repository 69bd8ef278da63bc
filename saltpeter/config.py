"""YAML files of the config directory to validated ``Job`` objects (SPEC section 4).

Every ``*.yaml`` file directly in the config directory is read; its name without ``.yaml``
is the ``group`` of its jobs. Each top-level key is a job name, except
``saltpeter_maintenance`` (merged over all files) and the legacy ``saltpeter_config``
(ignored).

``ConfigDir.load()`` is cheap to call every second: it lists the directory and stats each
file, and parses only files whose (mtime_ns, size, inode) changed. A problem (a file that
does not parse, a job with a bad field, a duplicate job name) is logged once at ERROR with
file, job and reason, and that file or job is skipped; it is logged again only after the
file changes and is still bad. Every other job keeps working.
"""

import datetime as _dt
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml

from saltpeter.constants import (ALLOW_OVERLAP_PHRASE, API_ACCESS_KEY, CONFIG_FILE_SUFFIX,
                                 LEGACY_CONFIG_KEY, MAINTENANCE_KEY, TARGET_TYPES)
from saltpeter.schedule import CronSchedule, ScheduleError

log = logging.getLogger(__name__)

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_REQUIRED_CRON_FIELDS = ("min", "hour", "dom", "mon", "dow")
_KNOWN_KEYS = frozenset((
    "sec", "min", "hour", "dom", "mon", "dow", "year", "utc", "command", "user", "cwd",
    "env", "targets", "target_type", "number_of_targets", "batch_size", "timeout",
    "hard_timeout", "soft_timeout", "allow_overlap", "use_wrapper", "websocket_url",
    "catch_up",
))
_TRUE_WORDS = frozenset(("true", "yes", "on", "1"))
_FALSE_WORDS = frozenset(("false", "no", "off", "0"))


class ConfigError(Exception):
    """The config directory itself cannot be used (missing, not a directory, unreadable)."""


class JobError(ValueError):
    """One job definition is not valid; the message names the field and the reason."""


@dataclass(frozen=True, kw_only=True)
class Job:
    """One validated job. Cron fields are strings as given (ints normalised to text).

    ``timeout`` and ``soft_timeout`` are seconds, 0 meaning none. ``raw`` is the job's YAML
    mapping plus ``group``, made JSON-serialisable, for the API's ``/config``.
    """

    name: str
    group: str
    sec: str = "0"
    min: str
    hour: str
    dom: str
    mon: str
    dow: str
    year: str = "*"
    utc: bool = False
    command: str
    user: Optional[str] = None
    cwd: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict, hash=False)
    targets: str = "*"
    target_type: str = "glob"
    number_of_targets: int = 0
    batch_size: int = 0
    timeout: float = 0.0
    soft_timeout: float = 0.0
    allow_overlap: bool = False
    use_wrapper: bool = True
    websocket_url: Optional[str] = None
    catch_up: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, hash=False)

    def cron_schedule(self) -> CronSchedule:
        """This job's schedule (already known to be valid for a ``Job`` from ``parse_job``)."""
        return CronSchedule.from_job(self)


@dataclass(frozen=True)
class ConfigSnapshot:
    """The whole valid configuration at one moment.

    ``maintenance`` is ``{'global': bool, 'machines': [str]}``; ``errors`` lists the current
    problems (each also logged once); ``serial`` changes whenever the content changes.
    """

    jobs: Dict[str, Job]
    maintenance: Dict[str, Any]
    errors: List[str]
    serial: float
    api_access: Dict[str, Any] = field(default_factory=lambda: {"read_only": False,
                                                                 "users": {}})


# --- one job -----------------------------------------------------------------------------

def _bad(field_name: str, reason: str) -> JobError:
    return JobError("field %r: %s" % (field_name, reason))


def _parse_bool(data: dict, key: str, default: bool) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise _bad(key, "expected true or false, got %r" % (value,))


def _parse_seconds(data: dict, key: str) -> float:
    value = data.get(key)
    if value is None:
        return 0.0
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            pass
    if seconds is None or not math.isfinite(seconds):
        raise _bad(key, "expected a number of seconds, got %r" % (value,))
    if seconds < 0:
        raise _bad(key, "expected a number of seconds >= 0, got %r" % (value,))
    return seconds


def _parse_count(data: dict, key: str) -> int:
    value = data.get(key)
    if value is None:
        return 0
    count = None
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, str) and value.strip().isdigit():
        count = int(value.strip())
    if count is None or count < 0:
        raise _bad(key, "expected a whole number >= 0, got %r" % (value,))
    return count


def _parse_optional_text(data: dict, key: str) -> Optional[str]:
    value = data.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _bad(key, "expected a string, got %r" % (value,))
    return str(value)


def _parse_cron_field(data: dict, key: str, default: Optional[str]) -> str:
    value = data.get(key, default)
    if value is None:
        raise _bad(key, "missing (required)")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _bad(key, "expected a cron expression, got %r" % (value,))
    return str(value).strip()


def _parse_env(data: dict) -> Dict[str, str]:
    value = data.get("env")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("env", "expected a mapping of variable names to values, got %r" % (value,))
    env = {}
    for name, setting in value.items():
        name = str(name)
        if not name or "=" in name or "\0" in name:
            raise _bad("env", "invalid variable name %r" % (name,))
        env[name] = "" if setting is None else str(setting)
    return env


def _parse_targets(data: dict) -> str:
    value = data.get("targets", "*")
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        value = ",".join(value)  # Salt's list targeting takes a comma-separated string too
    if not isinstance(value, str) or not value.strip():
        raise _bad("targets", "expected a non-empty target expression, got %r" % (value,))
    return value


def _parse_timeout(data: dict) -> float:
    timeout = _parse_seconds(data, "timeout")
    hard_timeout = _parse_seconds(data, "hard_timeout")
    # Both given (a legacy file may carry both): the larger never stops a job earlier
    # than either setting promised.
    return max(timeout, hard_timeout)


def _parse_websocket_url(data: dict) -> Optional[str]:
    url = _parse_optional_text(data, "websocket_url")
    if url is not None and not url.startswith(("ws://", "wss://")):
        raise _bad("websocket_url", "expected a ws:// or wss:// URL, got %r" % (url,))
    return url


def _json_safe(value):
    """``value`` with every date, time and other non-JSON scalar turned into text."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def parse_job(name: str, group: str, data: Any) -> Job:
    """A validated ``Job`` from one YAML job mapping.

    Raises ``JobError`` whose message names the field and the reason, e.g.
    ``field 'timeout': expected a number of seconds, got 'soon'``.
    """
    if not isinstance(data, dict):
        raise JobError("expected a mapping of job settings, got %r" % (data,))
    cron = {key: _parse_cron_field(data, key, None) for key in _REQUIRED_CRON_FIELDS}
    cron["sec"] = _parse_cron_field(data, "sec", "0")
    cron["year"] = _parse_cron_field(data, "year", "*")
    utc = _parse_bool(data, "utc", False)
    try:
        CronSchedule(utc=utc, **cron)
    except ScheduleError as exc:
        raise JobError(str(exc)) from None

    command = data.get("command")
    if not isinstance(command, str) or not command.strip():
        if command is None:
            raise _bad("command", "missing (required)")
        raise _bad("command", "expected a non-empty shell command line, got %r" % (command,))

    target_type = data.get("target_type", "glob")
    if target_type not in TARGET_TYPES:
        raise _bad("target_type", "expected one of %s, got %r"
                   % (", ".join(TARGET_TYPES), target_type))

    unknown = sorted(str(key) for key in data if key not in _KNOWN_KEYS)
    if unknown:
        log.debug("config: group %r: job %r: ignoring unknown keys %s", group, name,
                  ", ".join(unknown))

    raw = _json_safe(data)
    raw["group"] = group
    return Job(
        name=name, group=group, utc=utc, command=command,
        user=_parse_optional_text(data, "user"), cwd=_parse_optional_text(data, "cwd"),
        env=_parse_env(data), targets=_parse_targets(data), target_type=target_type,
        number_of_targets=_parse_count(data, "number_of_targets"),
        batch_size=_parse_count(data, "batch_size"),
        timeout=_parse_timeout(data), soft_timeout=_parse_seconds(data, "soft_timeout"),
        allow_overlap=data.get("allow_overlap") == ALLOW_OVERLAP_PHRASE,
        use_wrapper=_parse_bool(data, "use_wrapper", True),
        websocket_url=_parse_websocket_url(data),
        catch_up=_parse_bool(data, "catch_up", False),
        raw=raw, **cron,
    )


def _job_name_problem(name) -> Optional[str]:
    # The name becomes a log file name and part of instance names.
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        return "invalid job name (must be non-empty, without '/')"
    return None


# --- one file ----------------------------------------------------------------------------

@dataclass
class _ParsedFile:
    """What one file version contributed; kept until the file changes."""

    signature: Tuple[int, int, int]
    jobs: Dict[str, Job] = field(default_factory=dict)
    maintenance: Optional[Dict[str, Any]] = None
    api_access: Optional[Dict[str, Any]] = None
    errors: List[str] = field(default_factory=list)


PASSWORD_HASH_PREFIX = "pbkdf2_sha256$"


def _parse_api_access(value) -> Dict[str, Any]:
    """``saltpeter_api: {read_only: bool, users: {name: password hash}}``; the hashes are
    what ``saltpeter --hash-password`` prints."""
    if value is None:
        return {"read_only": False, "users": {}}
    if not isinstance(value, dict):
        raise JobError("expected a mapping with 'read_only' and 'users', got %r" % (value,))
    read_only = _parse_bool(value, "read_only", False)
    users = value.get("users") or {}
    if not isinstance(users, dict):
        raise _bad("users", "expected a mapping of user names to password hashes")
    for user, stored in users.items():
        if not isinstance(stored, str) or not stored.startswith(PASSWORD_HASH_PREFIX):
            raise _bad("users", "user %r: expected a hash made by 'saltpeter "
                                "--hash-password' (%s...)" % (user, PASSWORD_HASH_PREFIX))
    return {"read_only": read_only, "users": {str(k): v for k, v in users.items()}}


def _parse_maintenance(value) -> Dict[str, Any]:
    if value is None:
        return {"global": False, "machines": []}
    if not isinstance(value, dict):
        raise JobError("expected a mapping with 'global' and 'machines', got %r" % (value,))
    is_global = _parse_bool(value, "global", False)
    machines = value.get("machines") or []
    if isinstance(machines, str):
        machines = [machines]
    if not isinstance(machines, list) or not all(isinstance(m, (str, int)) for m in machines):
        raise _bad("machines", "expected a list of machine names, got %r" % (machines,))
    return {"global": is_global, "machines": [str(machine) for machine in machines]}


def _read_yaml(path: str):
    """The parsed content of ``path`` (the one place files are read and parsed)."""
    with open(path, "rb") as stream:
        return yaml.load(stream, Loader=_YAML_LOADER)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """A one-line reason with line and column, without repeating the file name."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    return "line %d, column %d: %s" % (mark.line + 1, mark.column + 1, problem)


def _parse_file(path: str, group: str, signature) -> _ParsedFile:
    """Every job of one file; each problem is logged here, i.e. once per file version."""
    parsed = _ParsedFile(signature=signature)

    def problem(message):
        parsed.errors.append(message)
        log.error("config: %s", message)

    try:
        content = _read_yaml(path)
    except OSError as exc:
        problem("%s: cannot read: %s" % (path, exc.strerror or exc))
        return parsed
    except yaml.YAMLError as exc:
        problem("%s: not valid YAML: %s" % (path, _yaml_reason(exc)))
        return parsed
    if content is None:
        return parsed
    if not isinstance(content, dict):
        problem("%s: expected a mapping of job names to jobs, got %s"
                % (path, type(content).__name__))
        return parsed

    for key, data in content.items():
        if key == LEGACY_CONFIG_KEY:
            continue
        if key == MAINTENANCE_KEY:
            try:
                parsed.maintenance = _parse_maintenance(data)
            except JobError as exc:
                problem("%s: %s: %s" % (path, MAINTENANCE_KEY, exc))
            continue
        if key == API_ACCESS_KEY:
            try:
                parsed.api_access = _parse_api_access(data)
            except JobError as exc:
                problem("%s: %s: %s" % (path, API_ACCESS_KEY, exc))
            continue
        name = str(key)
        name_problem = _job_name_problem(name)
        if name_problem:
            problem("%s: job %r: %s" % (path, name, name_problem))
            continue
        try:
            parsed.jobs[name] = parse_job(name, group, data)
        except JobError as exc:
            problem("%s: job %r: %s" % (path, name, exc))
    return parsed


# --- the directory -----------------------------------------------------------------------

class ConfigDir:
    """The config directory, re-read cheaply and reported once per problem."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._files: Dict[str, _ParsedFile] = {}
        # job name -> file that owns it, so an established job keeps its file when a
        # newer file repeats the name.
        self._owners: Dict[str, str] = {}
        self._reported_duplicates: set = set()
        self.snapshot: Optional[ConfigSnapshot] = None

    def _scan(self) -> Dict[str, Tuple[int, int, int]]:
        """file path -> (mtime_ns, size, inode) of every config file; raises ConfigError."""
        found = {}
        try:
            entries = list(os.scandir(self.path))
        except OSError as exc:
            raise ConfigError("config directory %s is not usable: %s"
                              % (self.path, exc.strerror or exc)) from None
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(CONFIG_FILE_SUFFIX):
                continue
            try:
                if not entry.is_file():
                    continue
                stat = entry.stat()
            except OSError:
                continue  # vanished between listing and stat: treated as removed
            found[entry.path] = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        return found

    def load(self) -> Optional[ConfigSnapshot]:
        """The new snapshot if any file was added, changed or removed since the last call,
        else None. The first call always returns a snapshot.

        Raises ``ConfigError`` if the directory cannot be listed.
        """
        found = self._scan()
        unchanged = (self.snapshot is not None and found.keys() == self._files.keys()
                     and all(self._files[path].signature == signature
                             for path, signature in found.items()))
        if unchanged:
            return None

        for path in list(self._files):
            if path not in found:
                log.info("config: %s removed", path)
                del self._files[path]
        for path, signature in sorted(found.items()):
            cached = self._files.get(path)
            if cached is None or cached.signature != signature:
                group = os.path.basename(path)[:-len(CONFIG_FILE_SUFFIX)]
                self._files[path] = _parse_file(path, group, signature)

        self.snapshot = self._merge()
        return self.snapshot

    def _merge(self) -> ConfigSnapshot:
        jobs: Dict[str, Job] = {}
        owners: Dict[str, str] = {}
        errors: List[str] = []
        duplicates = set()
        maintenance = {"global": False, "machines": set()}
        api_access = {"read_only": False, "users": {}}

        paths = sorted(self._files)
        for path in paths:
            parsed = self._files[path]
            errors.extend(parsed.errors)
            if parsed.maintenance is not None:
                maintenance["global"] = maintenance["global"] or parsed.maintenance["global"]
                maintenance["machines"].update(parsed.maintenance["machines"])
            if parsed.api_access is not None:
                api_access["read_only"] = api_access["read_only"] or parsed.api_access["read_only"]
                api_access["users"].update(parsed.api_access["users"])

        # Which file owns each name: the one that already did, else the first by file name.
        for path in paths:
            for name in self._files[path].jobs:
                previous = self._owners.get(name)
                if name not in owners or (previous == path and owners[name] != path):
                    owners[name] = path
        for path in paths:
            parsed = self._files[path]
            for name, job in parsed.jobs.items():
                if owners[name] == path:
                    jobs[name] = job
                    continue
                message = ("%s: job %r: duplicate job name, already defined in %s; skipped"
                           % (path, name, owners[name]))
                errors.append(message)
                key = (message, parsed.signature)
                duplicates.add(key)
                if key not in self._reported_duplicates:
                    log.error("config: %s", message)
        self._owners = owners
        self._reported_duplicates = duplicates

        serial = time.time()
        if self.snapshot is not None and serial <= self.snapshot.serial:
            serial = self.snapshot.serial + 1e-6  # keeps serials distinct on coarse clocks
        return ConfigSnapshot(
            jobs=dict(sorted(jobs.items())),
            maintenance={"global": maintenance["global"],
                         "machines": sorted(maintenance["machines"])},
            errors=errors,
            serial=serial,
            api_access=api_access,
        )
