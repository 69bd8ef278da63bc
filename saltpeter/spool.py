"""Per-machine output spool: every byte a job prints, on disk, appended in O(1) per chunk.

The WebSocket server appends to ``<statedir>/spool/<instance>/<machine>`` as output
arrives and keeps only a capped tail in memory for ``state[...]['ret']``; the per-run
worker copies the spool into the job's log file when the machine's result is final, then
removes it. Memory stays bounded whatever a job prints.
"""

import os
import shutil
from collections import deque
from typing import Deque
from urllib.parse import quote

from saltpeter.constants import TRUNCATION_MARKER

SPOOL_DIR = "spool"


def instance_dir(statedir: str, instance: str) -> str:
    return os.path.join(statedir, SPOOL_DIR, quote(instance, safe=""))


def spool_path(statedir: str, instance: str, machine: str) -> str:
    """Where the output of ``machine`` in ``instance`` is spooled."""
    return os.path.join(instance_dir(statedir, instance), quote(machine, safe=""))


def remove_instance(statedir: str, instance: str) -> None:
    shutil.rmtree(instance_dir(statedir, instance), ignore_errors=True)


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
        self.size = 0

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
