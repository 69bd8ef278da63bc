"""Per-machine output spool: every byte a job prints, on disk, appended in O(1) per chunk.

The WebSocket server appends to ``<statedir>/spool/<instance>/<machine>`` as output
arrives and keeps only a capped tail in memory for ``state[...]['ret']``; the per-run
worker copies the spool into the job's log file when the machine's result is final, then
removes it. Memory stays bounded whatever a job prints.
"""

import json
import logging
import os
import shutil
from collections import deque
from typing import Deque, Dict, Optional
from urllib.parse import quote

from saltpeter.constants import TRUNCATION_MARKER

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"


def instance_dir(statedir: str, instance: str) -> str:
    return os.path.join(statedir, SPOOL_DIR, quote(instance, safe=""))


def spool_path(statedir: str, instance: str, machine: str) -> str:
    """Where the output of ``machine`` in ``instance`` is spooled."""
    return os.path.join(instance_dir(statedir, instance), quote(machine, safe=""))


def remove_instance(statedir: str, instance: str) -> None:
    shutil.rmtree(instance_dir(statedir, instance), ignore_errors=True)


# ---------------------------------------------------------------- final outputs
# The final ``ret`` of each machine of a job's last run, kept out of the shared state:
# the Manager's copy of a job's state is read and written whole, and 100 machines of
# 1 MiB each made every result recorded copy 100 MB through it. One file per job, a JSON
# line per machine appended as its result is recorded (a file per machine cost 0.06-0.4
# ms each to create here, 5,000 of them in a large fan-out); the job's lock serialises
# the writers, and the file is removed when the next run starts.

FINAL_OUTPUT_DIR = "final-output"


def final_output_path(statedir: str, job_name: str) -> str:
    """Where the final outputs of the job's last run are kept."""
    return os.path.join(statedir, FINAL_OUTPUT_DIR, quote(job_name, safe="") + ".jsonl")


def append_final_outputs(statedir: str, job_name: str, outputs: Dict[str, str]) -> None:
    """Keep ``{machine: ret}`` (machines without output are left out: nothing to show).
    The caller holds the job's lock. Raises ``OSError``."""
    outputs = {machine: text for machine, text in outputs.items() if text}
    if not outputs:
        return
    path = final_output_path(statedir, job_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "ab") as handle:
        for machine, text in outputs.items():     # one at a time: each may be 1 MiB
            handle.write(json.dumps({"machine": machine, "ret": text}).encode("ascii"))
            handle.write(b"\n")


def load_final_outputs(statedir: str, job_name: str) -> Dict[str, str]:
    """``{machine: ret}`` kept for the job's last run ({} if none). A line being
    appended while this reads is left out."""
    outputs: Dict[str, str] = {}
    try:
        with open(final_output_path(statedir, job_name), "rb") as handle:
            data = handle.read()
    except OSError:
        return outputs
    for line in data.splitlines():
        try:
            entry = json.loads(line)
            outputs[entry["machine"]] = entry["ret"]
        except (ValueError, KeyError, TypeError):
            continue
    return outputs


def remove_final_outputs(statedir: str, job_name: str) -> None:
    path = final_output_path(statedir, job_name)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("job %s: cannot remove the last run's outputs %s: %s", job_name, path, exc)


class OutputTail:
    """The last ``cap`` characters of a stream of text chunks, and how many came in all."""

    def __init__(self, cap: int):
        self.cap = cap
        self.chunks: Deque[str] = deque()
        self.kept = 0
        self.total = 0

    def append(self, text: str) -> None:
        self.chunks.append(text)
        self.kept += len(text)
        self.total += len(text)
        while self.kept - len(self.chunks[0]) >= self.cap:
            self.kept -= len(self.chunks.popleft())

    def text(self) -> str:
        """The tail, with a truncation marker in front when output was dropped."""
        joined = "".join(self.chunks)
        if self.total <= self.cap:
            return joined
        joined = joined[-self.cap:]
        return TRUNCATION_MARKER.format(kept=len(joined), total=self.total) + joined


class SpoolFile:
    """One machine's spool file, opened lazily (heartbeat-only wrappers cost no fd)."""

    def __init__(self, path: str):
        self.path = path
        self.handle = None
        self.size = os.path.getsize(path) if os.path.exists(path) else 0

    def write(self, data: bytes) -> None:
        if self.handle is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.handle = open(self.path, "ab", buffering=256 * 1024)
        self.handle.write(data)
        self.size += len(data)

    def flush(self) -> None:
        if self.handle is not None:
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


# ---------------------------------------------------------------- restart safety
#
# The server acknowledges a wrapper's messages only after their output is on disk, and
# records with each ack the sequence number and the spool size it covers
# (``<spool>.seq``). After a crash the spool is cut back to that size: whatever came
# after it was never acknowledged, so the wrapper sends it again. A final result is
# written to ``<spool>.result`` before the server acknowledges ``complete``.

def _write_json_atomically(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(value, handle)
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def save_checkpoint(spool: "SpoolFile", seq: int) -> None:
    spool.flush()
    _write_json_atomically(spool.path + ".seq", {"seq": seq, "size": spool.size})


def restore_checkpoint(spool: "SpoolFile") -> int:
    """Cut the spool back to its last acknowledged size; return that ack's seq (0 if none)."""
    checkpoint = _read_json(spool.path + ".seq") or {"seq": 0, "size": 0}
    size = int(checkpoint.get("size", 0))
    if os.path.exists(spool.path):
        with open(spool.path, "r+b") as handle:
            handle.truncate(size)
    spool.size = size
    return int(checkpoint.get("seq", 0))


def save_result(spool: "SpoolFile", retcode: int, endtime: str) -> None:
    os.makedirs(os.path.dirname(spool.path), exist_ok=True)
    _write_json_atomically(spool.path + ".result", {"retcode": retcode, "endtime": endtime})


def load_result(statedir: str, instance: str, machine: str) -> Optional[dict]:
    return _read_json(spool_path(statedir, instance, machine) + ".result")


def read_tail(path: str, cap: int) -> OutputTail:
    """An ``OutputTail`` rebuilt from the end of a spool file."""
    tail = OutputTail(cap)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            handle.seek(max(0, size - cap))
            text = handle.read().decode("utf-8", "surrogateescape")
    except OSError:
        return tail
    tail.append(text)
    tail.total = size
    return tail
