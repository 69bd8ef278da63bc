"""Job log files in the legacy format, the run history, and optional search-engine indexing.

One file per job, ``<logdir>/<job_name>.log``, appended (SPEC section 8). Several
processes write to the same file (the scheduler for overlaps, each per-run worker for its
instance), so every event is written under an exclusive ``flock`` in one go.

Every event is also appended to ``<statedir>/history.jsonl`` (the API's timeline when no
search engine is configured) and, with ``-e``/``-o``, indexed into ``<index>-YYYY.MM.DD``.
A failing search engine costs one logged error per event and never blocks a job for long.
"""

import fcntl
import json
import logging
import os
import shutil
from datetime import datetime, timezone
from typing import Optional

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
COPY_CHUNK = 1024 * 1024


def _format_time(moment: datetime) -> str:
    """Legacy ``<time>``: ``str()`` of an aware UTC datetime."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return str(moment.astimezone(timezone.utc))


class JobLog:
    """Writes the legacy log events of every job."""

    def __init__(self, logdir: str, statedir: str, search_indexes=()):
        self.logdir = logdir
        self.statedir = statedir
        self.search_indexes = list(search_indexes)
        os.makedirs(logdir, exist_ok=True)
        os.makedirs(statedir, exist_ok=True)

    def path(self, job_name: str) -> str:
        return os.path.join(self.logdir, "%s.log" % job_name)

    def make_file(self, job_name: str) -> None:
        """Create the job's log file if it does not exist yet (empty: nothing is logged)."""
        try:
            with open(self.path(job_name), "ab"):
                pass
        except OSError as exc:
            log.error("job %s: cannot create log file %s: %s", job_name,
                      self.path(job_name), exc)

    # ------------------------------------------------------------ events

    def start(self, job_name: str, group: str, instance: str, moment: datetime) -> None:
        self._write(job_name, _start_line(instance, moment))
        self._record("start", job_name, group, instance, moment)

    def rehearse(self) -> None:
        """Format a start event and append it to ``/dev/null`` the way ``start`` appends
        it to the job's log and the history: nothing anyone reads is written. An idle
        per-run worker does this while it waits (see ``saltpeter.spawner``)."""
        moment = datetime.now(timezone.utc)
        with _LockedAppend(os.devnull) as handle:
            handle.write(_start_line("rehearsal_0", moment).encode("utf-8", "surrogateescape"))
            handle.write(_history_line("start", "rehearsal", "", "rehearsal_0",
                                       moment.isoformat(), "", 0).encode())

    def machine_starts(self, job_name: str, group: str, instance: str, machines,
                       moment: datetime) -> None:
        """The start line of each of ``machines``, in one write."""
        when = _format_time(moment)
        self._write(job_name, "".join("###### Starting %s on %s at %s ################\n"
                                      % (instance, machine, when) for machine in machines))
        self._record_many([("machine_start", job_name, group, instance, moment, machine)
                           for machine in machines])

    def machine_result(self, job_name: str, group: str, instance: str, machine: str,
                       retcode: int, moment: datetime, output_path: Optional[str] = None,
                       output_text: str = "") -> None:
        """The result block of one machine. The output is copied from ``output_path``
        (the spool file, possibly huge) in chunks, then ``output_text`` is appended."""
        header = ("########## %s from %s ################\n**** Exit Code %d ******\n"
                  % (machine, instance, retcode))
        footer = "\n####### END %s from %s at %s #########\n" % (machine, instance,
                                                               _format_time(moment))
        tail = b""
        try:
            with self._locked(job_name) as handle:
                handle.write(header.encode())
                if output_path and os.path.exists(output_path):
                    with open(output_path, "rb") as source:
                        shutil.copyfileobj(source, handle, COPY_CHUNK)
                    tail = _last_bytes(output_path, 64 * 1024)
                if output_text:
                    handle.write(output_text.encode("utf-8", "surrogateescape"))
                    tail = (tail + output_text.encode("utf-8", "surrogateescape"))[-64 * 1024:]
                handle.write(footer.encode())
        except OSError as exc:
            log.error("job %s instance %s machine %s: cannot write log file %s: %s",
                      job_name, instance, machine, self.path(job_name), exc)
        self._record("machine_result", job_name, group, instance, moment, machine=machine,
                     ret_code=retcode, output=tail.decode("utf-8", "replace"))

    def finished(self, job_name: str, group: str, instance: str, moment: datetime) -> None:
        self._write(job_name, "###### Finished %s at %s ################\n"
                    % (instance, _format_time(moment)))
        self._record("end", job_name, group, instance, moment)

    def overlap(self, job_name: str, group: str, instance: str, moment: datetime) -> None:
        self._write(job_name, "###### Overlap detected on %s at %s ################\n"
                    % (instance, _format_time(moment)))
        self._record("overlap", job_name, group, instance, moment)

    def missed(self, job_name: str, group: str, count: int, first: datetime,
               last: datetime) -> None:
        """Fire times that passed while the daemon was down (not a legacy line)."""
        self._write(job_name, "###### Missed %d scheduled run(s) of %s from %s to %s while "
                    "saltpeter was down ################\n"
                    % (count, job_name, _format_time(first), _format_time(last)))
        self._record("missed", job_name, group, "", last)

    def no_targets(self, job_name: str, group: str, instance: str, moment: datetime) -> None:
        self._write(job_name, "!!!!!! No targets matched for %s !!!!!!\n" % instance)
        self._record("no_machines", job_name, group, instance, moment)

    # ------------------------------------------------------------ plumbing

    def _locked(self, job_name: str):
        return _LockedAppend(self.path(job_name))

    def _write(self, job_name: str, text: str) -> None:
        try:
            with self._locked(job_name) as handle:
                handle.write(text.encode("utf-8", "surrogateescape"))
        except OSError as exc:
            log.error("job %s: cannot write log file %s: %s", job_name,
                      self.path(job_name), exc)

    def _record(self, msg_type: str, job_name: str, group: str, instance: str,
                moment: datetime, machine: str = "", ret_code: int = 0,
                output: str = "") -> None:
        self._record_many([(msg_type, job_name, group, instance, moment, machine, ret_code,
                            output)])

    def _record_many(self, events) -> None:
        """Append events ``(msg_type, job, group, instance, moment[, machine[, ret_code[,
        output]]])`` to the run history in one write, and index each if configured."""
        lines, docs = [], []
        for event in events:
            msg_type, job_name, group, instance, moment = event[:5]
            machine, ret_code, output = (tuple(event[5:]) + ("", 0, ""))[:3]
            stamp = moment.astimezone(timezone.utc).isoformat()
            lines.append(_history_line(msg_type, job_name, group, instance, stamp, machine,
                                       ret_code))
            docs.append({"job_name": job_name, "group": group, "job_instance": instance,
                         "@timestamp": stamp, "return_code": ret_code, "machine": machine,
                         "output": output, "msg_type": msg_type})
        try:
            with _LockedAppend(os.path.join(self.statedir, HISTORY_FILE)) as handle:
                handle.write("".join(lines).encode())
        except OSError as exc:
            log.error("cannot append %d event(s) to the run history: %s", len(lines), exc)
        for index in self.search_indexes:
            for doc in docs:
                try:
                    index.index_event(doc)
                except Exception as exc:  # any failure of the engine: one line, job goes on
                    log.error("job %s instance %s: cannot index %s event into %s: %s",
                              doc["job_name"], doc["job_instance"], doc["msg_type"], index,
                              exc)


def _start_line(instance: str, moment: datetime) -> str:
    return "###### Starting %s at %s ################\n" % (instance, _format_time(moment))


def _history_line(msg_type: str, job_name: str, group: str, instance: str, stamp: str,
                  machine: str, ret_code: int) -> str:
    """One event of ``<statedir>/history.jsonl`` (``stamp``: ISO time in UTC)."""
    return json.dumps({"cron": job_name, "group": group, "job_instance": instance,
                       "machine": machine, "msg_type": msg_type, "ret_code": ret_code,
                       "timestamp": stamp}) + "\n"


class _LockedAppend:
    """An append-mode binary file held under an exclusive flock."""

    def __init__(self, path: str):
        self.path = path
        self.handle = None

    def __enter__(self):
        self.handle = open(self.path, "ab")
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)
        return self.handle

    def __exit__(self, *exc_info):
        try:
            self.handle.flush()
        finally:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()


def _last_bytes(path: str, count: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - count))
        return handle.read()
