"""The main process: command line, arbiter of every child process, and the scheduler loop.

One place owns child processes, signals and shutdown. The loop sleeps until the next due
fire time, a config check or a command (run-now) arrives, whichever is first: with no job
due it costs nothing but a ``stat`` of the config files once a second.
"""

import argparse
import importlib
import logging
import multiprocessing
import os
import resource
import signal
import socket
import ssl
import sys
import time
from datetime import datetime, timedelta, timezone
from functools import partial
from multiprocessing.managers import SyncManager
from queue import Empty
from typing import Dict, List, Optional, Set, Tuple

from saltpeter import __version__
from saltpeter import state as shared_state
from saltpeter.auth import instance_token, load_or_create_key
from saltpeter.config import ConfigDir, ConfigError, JobError, parse_job
from saltpeter.constants import (CONFIG_CHECK_INTERVAL, DEFAULT_CONNECT_DEADLINE,
                                 DEFAULT_RET_CAP, SHUTDOWN_GRACE)
from saltpeter.joblog import JobLog
from saltpeter.records import FireLedger, load_instances
from saltpeter.run import RunContext, adopt, rehearse, run
from saltpeter.schedule import CronSchedule, DueQueue, ScheduleError, local_zone
from saltpeter.spawner import MAX_IDLE_WORKERS, PREPARE_AHEAD, Spawner
from saltpeter.wsserver import DEFAULT_MAX_FRAME

log = logging.getLogger("saltpeter")

MAX_LOOP_SLEEP = 0.5     # the loop notices a stop request at least this often
MAX_COMMANDS_PER_PASS = 1000   # commands handled before the loop looks at the clock again
MAX_MISSED_COUNTED = 1000  # missed fire times counted one by one, after a long downtime
LOG_FILES_PER_PASS = 100  # log files of jobs due soon made ahead per pass (about 30 ms)
# A fire time later than this (a suspended host, a clock jump) is dropped with a warning
# instead of replayed: an every-second job would otherwise fire thousands of times at once.
MAX_FIRE_LATENESS = 300.0
# Benchmarks and tests only: ``module:Class`` of an executor to use instead of Salt/local.
TEST_EXECUTOR_VARIABLE = "SALTPETER_TEST_EXECUTOR"


class OneLineErrorParser(argparse.ArgumentParser):
    """Wrong flags: one line on stderr and exit code 2."""

    def error(self, message):
        sys.stderr.write("%s: error: %s\n" % (self.prog, message))
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="saltpeter",
                                description="Distributed cron for SaltStack fleets.")
    parser.add_argument("-c", "--configdir", default="/etc/saltpeter",
                        help="directory of job YAML files (default: /etc/saltpeter)")
    parser.add_argument("-l", "--logdir", default="/var/log/saltpeter",
                        help="directory of per-job log files (default: /var/log/saltpeter)")
    parser.add_argument("-a", "--api", action="store_true", help="start the HTTP/WebSocket API")
    parser.add_argument("-p", "--port", type=int, default=8888, help="API port (default: 8888)")
    parser.add_argument("-e", "--elasticsearch", default="", metavar="URL",
                        help="also index log events into Elasticsearch at URL")
    parser.add_argument("-o", "--opensearch", default="", metavar="URL",
                        help="also index log events into OpenSearch at URL")
    parser.add_argument("-i", "--index", default="saltpeter",
                        help="search index prefix (default: saltpeter)")
    parser.add_argument("-v", "--version", action="store_true", help="print the version and exit")
    parser.add_argument("--write-wrapper", default=None, metavar="FILE",
                        help="write the single-file wrapper (Python 3.9+, no packages "
                             "needed) to FILE, for deploying it by hand, and exit")
    parser.add_argument("--hash-password", action="store_true",
                        help="read a password on standard input, print its hash for the "
                             "users of the saltpeter_api config section, and exit")
    parser.add_argument("-w", "--websocket-port", type=int, default=8889,
                        help="port of the wrappers' WebSocket server (default: 8889)")
    parser.add_argument("--websocket-host", default="0.0.0.0",
                        help="bind address of the WebSocket server (default: 0.0.0.0)")
    parser.add_argument("--websocket-url", default=None,
                        help="URL the wrappers dial back to (default: ws://<FQDN>:<port>)")
    parser.add_argument("--legacy", action="store_true",
                        help="run every job through Salt cmd.run, without wrapper")
    parser.add_argument("--salt-config", default="/etc/salt/master",
                        help="Salt master config file (default: /etc/salt/master)")
    parser.add_argument("--local", action="store_true",
                        help="run every job on this host only; no Salt needed")
    parser.add_argument("--state-dir", default=None,
                        help="where run records and output spools live "
                             "(default: <logdir>/state)")
    parser.add_argument("--wrapper-connect-timeout", type=float,
                        default=DEFAULT_CONNECT_DEADLINE,
                        help="seconds a launched wrapper has to connect before its result is "
                             "255 (default: %d)" % DEFAULT_CONNECT_DEADLINE)
    parser.add_argument("--output-cap", type=int, default=DEFAULT_RET_CAP,
                        help="characters of output kept in the live state per machine; the "
                             "log file always has all of it (default: %d)" % DEFAULT_RET_CAP)
    parser.add_argument("--websocket-max-frame", type=int, default=DEFAULT_MAX_FRAME,
                        metavar="BYTES",
                        help="largest message a wrapper may send; a larger one closes its "
                             "connection (default: %d)" % DEFAULT_MAX_FRAME)
    parser.add_argument("--websocket-cert", default=None, metavar="FILE",
                        help="serve wss:// with this certificate (PEM; needs --websocket-key)")
    parser.add_argument("--websocket-key", default=None, metavar="FILE",
                        help="private key of --websocket-cert (PEM)")
    parser.add_argument("--wrapper-ca-file", default=None, metavar="FILE",
                        help="CA file, as a path on the minions, that wrappers verify the "
                             "server against (default: the system store)")
    parser.add_argument("--wrapper-dir", default="/var/lib/saltpeter", metavar="DIR",
                        help="where Saltpeter puts the wrapper on each minion "
                             "(default: /var/lib/saltpeter)")
    parser.add_argument("--wrapper-python", default="python3", metavar="PATH",
                        help="the Python 3.9+ that runs the wrapper on minions "
                             "(default: python3 from the minion's PATH)")
    parser.add_argument("--no-wrapper-auth", action="store_true",
                        help="accept wrapper messages without the per-instance token "
                             "(for wrappers that speak only the seed protocol)")
    parser.add_argument("--ui-dir", default=None,
                        help="serve this directory (e.g. a saltpeter-ui build) instead of "
                             "the built-in UI")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="daemon log level (default: INFO)")
    args = parser.parse_args(argv)
    for name in ("port", "websocket_port"):
        value = getattr(args, name)
        if not 0 < value < 65536:
            parser.error("argument --%s: %d is not a TCP port" % (name.replace("_", "-"), value))
    if args.wrapper_connect_timeout <= 0:
        parser.error("argument --wrapper-connect-timeout: must be positive")
    if args.websocket_max_frame < 64 * 1024:
        parser.error("argument --websocket-max-frame: must be at least 65536")
    if args.output_cap < 1024:
        parser.error("argument --output-cap: must be at least 1024")
    if args.local and args.legacy:
        parser.error("--local and --legacy cannot be combined: --legacy needs Salt")
    if bool(args.websocket_cert) != bool(args.websocket_key):
        parser.error("--websocket-cert and --websocket-key go together")
    return args


def server_ssl_context(args) -> Optional[ssl.SSLContext]:
    """The TLS context of the WebSocket server, or None for plain ws://."""
    if not args.websocket_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.websocket_cert, args.websocket_key)
    return context


def default_websocket_url(args) -> str:
    scheme = "wss" if args.websocket_cert else "ws"
    if args.local:
        host = args.websocket_host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = "[%s]" % host
        return "%s://%s:%d" % (scheme, host, args.websocket_port)
    return "%s://%s:%d" % (scheme, socket.getfqdn(), args.websocket_port)


def raise_open_files_limit() -> None:
    """Raise the soft open-files limit to the hard one: each wrapper is a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    log.info("open-files limit: %s", soft)


def _ignore_signals() -> None:
    """The Manager process outlives the children that use it: main shuts it down last."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _child_signals() -> None:
    """A child stops on SIGTERM (its default); Ctrl-C is main's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _wsserver_main(shared, host: str, port: int, max_frame: int, key, ssl_context) -> None:
    _child_signals()
    from saltpeter.wsserver import run_websocket_server
    run_websocket_server(shared, host, port, max_frame, key=key, ssl_context=ssl_context)


def _api_main(shared, host: str, port: int, options: dict) -> None:
    _child_signals()
    from saltpeter.api import run_api
    run_api(shared, host, port, options)


class Daemon:
    """Owns the schedule, the config and every child process."""

    def __init__(self, args: argparse.Namespace, config_dir: ConfigDir,
                 ssl_context: Optional[ssl.SSLContext] = None):
        self.args = args
        self.ssl_context = ssl_context
        self.statedir = args.state_dir or os.path.join(args.logdir, "state")
        self.config_dir = config_dir
        self.tz = local_zone()
        self.due = DueQueue()
        self.jobs: Dict[str, object] = {}
        self.schedules: Dict[str, CronSchedule] = {}
        self.maintenance = {"global": False, "machines": []}
        self.api_access = {"read_only": False, "users": {}}
        self.schedule_info: Dict[str, dict] = {}     # job -> next_run, last_run, overlap
        self.schedule_dirty: Set[str] = set()
        self.workers: Dict[str, str] = {}      # running instance -> job name
        self.spawner: Optional[Spawner] = None
        self.instances_by_job: Dict[str, Set[str]] = {}
        self.services: Dict[str, multiprocessing.Process] = {}
        self.stopping = False
        self.ledger = FireLedger(self.statedir)
        self.manager: Optional[SyncManager] = None
        self.shared = None
        self.joblog: Optional[JobLog] = None
        self.logs_made: Set[str] = set()     # jobs whose log file main made sure of
        self.fired: List[Tuple[str, str, bool]] = []    # (job, instance, scheduled) to log
        self.ctx: Optional[RunContext] = None

    # ------------------------------------------------------------ start and stop

    def start(self) -> None:
        """Start the Manager and the spawner (while main is still small), load and apply
        the first config (so that API access control is in force before the API serves
        anyone), then start the service processes. Raises ``ConfigError``."""
        args = self.args
        self.manager = SyncManager()
        self.manager.start(_ignore_signals)
        self.shared = shared_state.make_shared(self.manager, self.statedir, args.output_cap)
        self.joblog = JobLog(args.logdir, self.statedir, self._search_indexes())
        key = load_or_create_key(self.statedir)
        wrapper_options = {"SP_CA_FILE": args.wrapper_ca_file} if args.wrapper_ca_file else {}
        self.ctx = RunContext(shared=self.shared, executor=self._executor(),
                              joblog=self.joblog,
                              websocket_url=args.websocket_url or default_websocket_url(args),
                              connect_deadline=args.wrapper_connect_timeout,
                              legacy=args.legacy, token_for=partial(instance_token, key),
                              wrapper_options=wrapper_options)
        # forked while main is small: every worker is forked from it, not from main
        self.spawner = Spawner(self.ctx, run, adopt, rehearse)
        self.spawner.start()
        self.apply_config(self.config_dir.load())
        if not args.legacy:
            server_key = None if args.no_wrapper_auth else key
            self._start_service("websocket", _wsserver_main,
                                (self.shared, args.websocket_host, args.websocket_port,
                                 args.websocket_max_frame, server_key, self.ssl_context))
            log.info("wrappers dial back to %s%s", self.ctx.websocket_url,
                     "" if server_key else " (wrapper authentication off)")
        if args.api:
            self._start_service("api", _api_main, (self.shared, "0.0.0.0", args.port,
                                                   self._api_options()))
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        self.adopt_instances()
        self.account_for_downtime()
        self.flush_schedule_info()

    def adopt_instances(self) -> None:
        """Carry on with the instances a previous run of the daemon left running."""
        for record in load_instances(self.statedir):
            instance, job_name = record["instance"], record["job_name"]
            job = self.jobs.get(job_name)
            if job is None:
                try:
                    job = parse_job(job_name, record.get("group", ""), record.get("job") or {})
                except JobError as exc:
                    log.error("instance %s: cannot adopt it, its job is gone and its record "
                              "is unusable: %s", instance, exc)
                    continue
            self.spawner.adopt(job, record)
            self.workers[instance] = job_name
            self.instances_by_job.setdefault(job_name, set()).add(instance)

    def account_for_downtime(self) -> None:
        """Log the fire times missed while the daemon was down; run a ``catch_up`` job
        once now for them."""
        now = datetime.now(timezone.utc)
        for job_name, job in self.jobs.items():
            last = self.ledger.get(job_name)
            schedule = self.schedules.get(job_name)
            if last is None or schedule is None:
                continue
            after = datetime.fromtimestamp(last, timezone.utc)
            missed = []
            while len(missed) < MAX_MISSED_COUNTED:
                fire_time = schedule.next_after(after, self.tz)
                if fire_time is None or fire_time >= now - timedelta(seconds=1):
                    break
                missed.append(fire_time)
                after = fire_time
            if not missed:
                continue
            more = "+" if len(missed) == MAX_MISSED_COUNTED else ""
            log.warning("job %s: missed %d%s scheduled run(s) while the daemon was down "
                        "(first %s, last %s)%s", job_name, len(missed), more, missed[0],
                        missed[-1], "; catching up once now" if job.catch_up else "")
            self.joblog.missed(job_name, job.group, len(missed), missed[0], missed[-1])
            if job.catch_up:
                self.fire(job_name, missed[-1], scheduled=False)
        self.start_fired()

    def _search_indexes(self):
        indexes = []
        for flavor in ("elasticsearch", "opensearch"):
            url = getattr(self.args, flavor)
            if url:
                from saltpeter.search_index import SearchIndex
                indexes.append(SearchIndex(url, self.args.index, flavor))
        return indexes

    def _api_options(self) -> dict:
        return {"ui_dir": self.args.ui_dir, "elasticsearch": self.args.elasticsearch,
                "opensearch": self.args.opensearch, "index": self.args.index}

    def _executor(self):
        test_executor = os.environ.get(TEST_EXECUTOR_VARIABLE)
        if test_executor:
            return self._test_executor(test_executor)
        if self.args.local:
            from saltpeter.executors.local import LocalExecutor
            return LocalExecutor(wrapper_log_dir=os.path.join(self.statedir, "wrapper-logs"))
        from saltpeter.executors.salt import SaltExecutor
        return SaltExecutor(self.args.salt_config,
                            {"wrapper_dir": self.args.wrapper_dir,
                             "wrapper_python": self.args.wrapper_python})

    def _test_executor(self, spec: str):
        """Benchmarks and tests only: ``module:Class`` from ``SALTPETER_TEST_EXECUTOR``,
        built as ``Class(statedir=..., shared=...)`` (e.g. ``bench.simexec:SimExecutor``)."""
        module_name, _, class_name = spec.partition(":")
        executor_class = getattr(importlib.import_module(module_name), class_name)
        log.warning("using the test executor %s (from %s)", spec, TEST_EXECUTOR_VARIABLE)
        return executor_class(statedir=self.statedir, shared=self.shared)

    def _start_service(self, name: str, target, args) -> None:
        process = multiprocessing.Process(target=target, args=args, name=name)
        process.start()
        self.services[name] = process

    def _request_stop(self, signum, frame) -> None:
        if not self.stopping:
            log.info("signal %d: stopping; no new job will fire", signum)
        self.stopping = True

    def shutdown(self) -> None:
        """Stop every child: SIGTERM, a grace period, then SIGKILL; reap them all. The
        workers go first, through the spawner that owns them."""
        if self.spawner is not None:
            self.spawner.stop()
        children = list(self.services.values())
        for process in children:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for process in children:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in children:
            if process.is_alive():
                log.warning("child %s did not stop in %ss; killing it", process.name,
                            SHUTDOWN_GRACE)
                process.kill()
                process.join()
        self.ledger.save()
        if self.manager is not None:
            self.manager.shutdown()
        log.info("stopped")

    # ------------------------------------------------------------ the loop

    def loop(self) -> None:
        next_config_check = 0.0
        while not self.stopping:
            now = time.time()
            if now >= next_config_check:
                self.reload_config()
                next_config_check = now + CONFIG_CHECK_INTERVAL
            now_dt = datetime.now(timezone.utc)
            for job_name, fire_time in self.due.pop_due(now_dt, MAX_FIRE_LATENESS):
                self.fire(job_name, fire_time)
            self.start_fired()
            self.flush_schedule_info()
            self.ledger.save()
            self.reap()
            more_to_prepare = self.prepare(now_dt)
            next_fire = self.due.next_fire_time()
            wait = min(next_config_check - time.time(), MAX_LOOP_SLEEP)
            if next_fire is not None:
                wait = min(wait, (next_fire - datetime.now(timezone.utc)).total_seconds())
            if more_to_prepare:
                wait = 0.0
            self._wait_for_command(max(0.0, wait))

    def _wait_for_command(self, timeout: float) -> None:
        """Sleep until a command comes or ``timeout`` passes; handle every command queued."""
        try:
            command = self.shared.scheduler_commands.get(timeout=timeout)
            for _ in range(MAX_COMMANDS_PER_PASS):
                self._handle_command(command)
                command = self.shared.scheduler_commands.get_nowait()
        except Empty:
            return
        except (EOFError, OSError, InterruptedError):
            return

    def _handle_command(self, command) -> None:
        if command and command[0] == "exited":
            self.worker_exited(command[1], command[2])
        elif command and command[0] == "run":
            job_name = command[1]
            if job_name in self.jobs:
                log.info("job %s: run requested", job_name)
                self.fire(job_name, datetime.now(timezone.utc), scheduled=False)
                self.start_fired()
                self.flush_schedule_info()
            else:
                log.warning("run requested for unknown job %r", job_name)
        else:
            log.error("unknown scheduler command %r", command)

    def reload_config(self) -> None:
        try:
            snapshot = self.config_dir.load()
        except ConfigError as exc:
            log.error("%s; keeping the jobs loaded before", exc)
            return
        if snapshot is not None:
            self.apply_config(snapshot)

    def apply_config(self, snapshot) -> None:
        """Make the scheduler, the state and the API's config match ``snapshot``."""
        now = datetime.now(timezone.utc)
        for job_name in set(self.jobs) - set(snapshot.jobs):
            log.info("job %s: removed from the config", job_name)
            self.due.remove(job_name)
            self.schedules.pop(job_name, None)
            self.schedule_info.pop(job_name, None)
            self.schedule_dirty.discard(job_name)
            self.logs_made.discard(job_name)
            if not self.instances_by_job.get(job_name):
                shared_state.remove_job(self.shared, job_name)
        for job_name, job in snapshot.jobs.items():
            previous = self.jobs.get(job_name)
            if previous == job:
                continue
            try:
                schedule = CronSchedule.from_job(job)
            except ScheduleError as exc:    # config.py validated it; belt and braces
                log.error("job %s: %s", job_name, exc)
                continue
            log.info("job %s: %s", job_name, "changed" if previous else "loaded")
            if schedule == self.schedules.get(job_name):
                continue    # same schedule: a fire time already due must not be lost
            self.schedules[job_name] = schedule
            last_fired = self.ledger.get(job_name)
            after = now
            if last_fired is not None:    # a clock set back must not fire a time twice
                after = max(now, datetime.fromtimestamp(last_fired, timezone.utc))
            self.due.schedule(job_name, schedule, self.tz, after)
            self._set_schedule_info(job_name, next_run=self.due.peek(job_name) or "")
        self.jobs = dict(snapshot.jobs)
        self.maintenance = snapshot.maintenance
        shared_state.publish_config(self.shared,
                                    {name: job.raw for name, job in self.jobs.items()},
                                    self.maintenance, snapshot.serial)
        if snapshot.api_access != self.api_access:
            self.api_access = snapshot.api_access
            shared_state.publish_access(self.shared, snapshot.api_access, snapshot.serial)

    def fire(self, job_name: str, fire_time: datetime, scheduled: bool = True) -> None:
        job = self.jobs.get(job_name)
        if job is None:
            return
        instance = "%s_%d" % (job_name, int(fire_time.timestamp()))
        now = datetime.now(timezone.utc)
        if scheduled:
            self.ledger.record(job_name, int(fire_time.timestamp()))
        next_run = self.due.peek(job_name) or ""
        if self.maintenance.get("global"):
            log.info("job %s: global maintenance; %s not started", job_name, instance)
            self._set_schedule_info(job_name, next_run=next_run)
            return
        live = self.instances_by_job.get(job_name, set())
        if live and not job.allow_overlap:
            log.warning("job %s: overlap detected; %s skipped while %s runs", job_name,
                        instance, ", ".join(sorted(live)))
            self.joblog.overlap(job_name, job.group, instance, now)
            self._set_schedule_info(job_name, overlap=True, next_run=next_run)
            return
        suffix = 1
        while instance in self.workers:
            suffix += 1
            instance = "%s_%d_%d" % (job_name, int(fire_time.timestamp()), suffix)
        self._set_schedule_info(job_name, overlap=False, last_run=now, next_run=next_run)
        self.fired.append((job_name, instance, scheduled))
        self.spawner.run(job, instance)
        self.workers[instance] = job_name
        self.instances_by_job.setdefault(job_name, set()).add(instance)

    def prepare(self, now: datetime) -> bool:
        """Get ready for what fires within ``PREPARE_AHEAD`` seconds: the spawner keeps
        an idle worker ready for each instance, and each job's log file exists (so that
        a new job's first run does not create it in the second it fires: with 1,000 new
        jobs due at once, the file system's inode allocation made their start times
        vary by half a second from one run to the next). Makes at most
        ``LOG_FILES_PER_PASS`` files, so that a due job is not held up; True if more are
        left for the next pass."""
        due_soon = self.due_soon(now)
        self.spawner.prepare(len(due_soon))
        missing = [job_name for job_name in due_soon if job_name not in self.logs_made]
        for job_name in missing[:LOG_FILES_PER_PASS]:
            self.joblog.make_file(job_name)
            self.logs_made.add(job_name)
        return len(missing) > LOG_FILES_PER_PASS

    def start_fired(self) -> None:
        """Hand every instance fired since the last call to the spawner, then log them
        (logging first made the last of 1,000 instances wait 20 ms for 1,000 lines)."""
        self.spawner.start_queued()
        fired, self.fired = self.fired, []
        for job_name, instance, scheduled in fired:
            log.info("job %s: firing %s%s", job_name, instance, "" if scheduled else " (run now)")

    def due_soon(self, now: datetime) -> List[str]:
        """The jobs that fire within ``PREPARE_AHEAD`` seconds as things stand, less those
        that maintenance or the overlap rule would skip; at most ``MAX_IDLE_WORKERS``."""
        if self.maintenance.get("global"):
            return []
        return self.due.due_before(now + timedelta(seconds=PREPARE_AHEAD),
                                   limit=MAX_IDLE_WORKERS, include=self._would_start)

    def _would_start(self, job_name: str) -> bool:
        job = self.jobs.get(job_name)
        return job is not None and (job.allow_overlap
                                    or not self.instances_by_job.get(job_name))

    def _set_schedule_info(self, job_name: str, **fields) -> None:
        """Change a job's next_run/last_run/overlap; written to the shared state for all
        changed jobs at once, at the end of the loop pass (``flush_schedule_info``)."""
        info = self.schedule_info.setdefault(job_name, {"next_run": "", "last_run": "",
                                                        "overlap": False})
        info.update(fields)
        self.schedule_dirty.add(job_name)

    def flush_schedule_info(self) -> None:
        if self.schedule_dirty:
            shared_state.update_schedule(self.shared, {name: dict(self.schedule_info[name])
                                                       for name in self.schedule_dirty
                                                       if name in self.schedule_info})
            self.schedule_dirty.clear()

    def worker_exited(self, instance: str, exit_code: int) -> None:
        """The spawner reaped the worker of ``instance``."""
        job_name = self.workers.pop(instance, None)
        if job_name is None:
            return
        self.instances_by_job.get(job_name, set()).discard(instance)
        if exit_code != 0:
            log.error("instance %s: worker exited with %s", instance, exit_code)
            shared_state.end_instance(self.shared, job_name, instance)

    def reap(self) -> None:
        """Restart a service (or the spawner) that died."""
        if not self.stopping and self.spawner is not None and not self.spawner.alive():
            log.error("the spawner died; starting a new one (workers it had run on alone)")
            self.spawner.start()
        for name, process in list(self.services.items()):
            if not process.is_alive() and not self.stopping:
                process.join()
                log.error("%s process exited with %s; restarting it", name, process.exitcode)
                self._start_service(name, process._target, process._args)


def _check_dirs(args) -> Optional[str]:
    """A one-line reason why the configured directories are unusable, or None."""
    if not os.path.isdir(args.configdir):
        return "config directory %s does not exist or is not a directory" % args.configdir
    if not os.access(args.configdir, os.R_OK | os.X_OK):
        return "config directory %s is not readable" % args.configdir
    for path in (args.logdir, args.state_dir or os.path.join(args.logdir, "state")):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            return "cannot create directory %s: %s" % (path, exc.strerror)
        if not os.access(path, os.W_OK):
            return "directory %s is not writable" % path
    return None


def _print_password_hash() -> int:
    from getpass import getpass
    from saltpeter.api import hash_password
    password = getpass("Password: ") if sys.stdin.isatty() else sys.stdin.readline()
    password = password.rstrip("\n")
    if not password:
        sys.stderr.write("saltpeter: error: empty password\n")
        return 2
    print(hash_password(password))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.version:
        print("saltpeter %s" % __version__)
        return 0
    if args.hash_password:
        return _print_password_hash()
    if args.write_wrapper:
        from saltpeter.deploy import wrapper_bundle
        bundle = wrapper_bundle()
        try:
            bundle.write(args.write_wrapper)
        except OSError as exc:
            sys.stderr.write("saltpeter: error: cannot write %s: %s\n"
                             % (args.write_wrapper, exc.strerror))
            return 2
        print("%s (version %s)" % (args.write_wrapper, bundle.version))
        return 0
    problem = _check_dirs(args)
    if problem:
        sys.stderr.write("saltpeter: error: %s\n" % problem)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s [%(processName)s] %(message)s")
    try:
        ssl_context = server_ssl_context(args)
    except (OSError, ssl.SSLError) as exc:
        sys.stderr.write("saltpeter: error: cannot load the WebSocket certificate: %s\n" % exc)
        return 2
    multiprocessing.set_start_method("fork", force=True)
    raise_open_files_limit()
    daemon = Daemon(args, ConfigDir(args.configdir), ssl_context)
    try:
        daemon.start()
    except ConfigError as exc:
        daemon.shutdown()
        sys.stderr.write("saltpeter: error: %s\n" % exc)
        return 2
    log.info("saltpeter %s started (config %s, logs %s, %s mode)", __version__,
             args.configdir, args.logdir,
             "local" if args.local else ("legacy" if args.legacy else "salt"))
    try:
        daemon.loop()
    finally:
        daemon.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
