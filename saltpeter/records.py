"""Small on-disk records that let a restarted daemon carry on where it stopped.

- ``<statedir>/instances/<instance>.json``: one per running instance, written by its
  worker (targets, which machines were launched when, which results are already logged).
  A restarted daemon re-adopts these instances: their wrappers reconnect and finish.
- ``<statedir>/ledger.json``: the last fire time of every job, so that no scheduled time
  fires twice across a restart and the times missed while the daemon was down are known.

Every write is a write to a temp file and a rename: a crash leaves the old or the new
record, never half of one.
"""

import json
import logging
import os
from typing import Dict, List, Optional
from urllib.parse import quote

log = logging.getLogger(__name__)

INSTANCES_DIR = "instances"
LEDGER_FILE = "ledger.json"


def _write_atomically(path: str, value) -> None:
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w") as handle:
        json.dump(value, handle)
    os.replace(tmp, path)


def _record_path(statedir: str, instance: str) -> str:
    return os.path.join(statedir, INSTANCES_DIR, quote(instance, safe="") + ".json")


def save_instance(statedir: str, record: Dict) -> None:
    """Write the record of a running instance (``record['instance']`` names it)."""
    os.makedirs(os.path.join(statedir, INSTANCES_DIR), exist_ok=True)
    _write_atomically(_record_path(statedir, record["instance"]), record)


def remove_instance_record(statedir: str, instance: str) -> None:
    try:
        os.unlink(_record_path(statedir, instance))
    except FileNotFoundError:
        pass


def load_instances(statedir: str) -> List[Dict]:
    """Every instance record left on disk; unreadable ones are logged and skipped."""
    directory = os.path.join(statedir, INSTANCES_DIR)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    records = []
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path) as handle:
                record = json.load(handle)
            if not isinstance(record, dict) or "instance" not in record:
                raise ValueError("not an instance record")
            records.append(record)
        except (OSError, ValueError) as exc:
            log.error("cannot read instance record %s: %s; ignoring it", path, exc)
    return records


class FireLedger:
    """The last fire time (unix seconds) of each job, persisted."""

    def __init__(self, statedir: str):
        self.path = os.path.join(statedir, LEDGER_FILE)
        self.last_fired: Dict[str, int] = {}
        self.dirty = False
        try:
            with open(self.path) as handle:
                loaded = json.load(handle)
            self.last_fired = {str(k): int(v) for k, v in loaded.items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            log.error("cannot read fire ledger %s: %s; starting a new one", self.path, exc)

    def get(self, job_name: str) -> Optional[int]:
        return self.last_fired.get(job_name)

    def record(self, job_name: str, fire_second: int) -> None:
        if self.last_fired.get(job_name, -1) < fire_second:
            self.last_fired[job_name] = fire_second
            self.dirty = True

    def forget_except(self, job_names) -> None:
        keep = set(job_names)
        for name in [name for name in self.last_fired if name not in keep]:
            del self.last_fired[name]
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            _write_atomically(self.path, self.last_fired)
            self.dirty = False
        except OSError as exc:
            log.error("cannot write fire ledger %s: %s", self.path, exc)
