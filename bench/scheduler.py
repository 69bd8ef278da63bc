"""Benchmark 2, the scheduler: idle CPU with many jobs and none due, fire latency with
many jobs due in the same second and with one due job among many, and config reload time.

Fire latency is measured from the scheduled second to the per-run worker's own
``###### Starting <instance> at <time>`` line in the job's log file (written first
thing in ``run()``). Jobs use ``targets: sim:0`` of the simulated executor, so each run
ends at once after its start ("No targets matched").

Usage: python bench/scheduler.py --jobs 1000 10000 --due 1000 --runs 3
"""

import argparse
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (ProcessMeter, log_times, measure_window,  # noqa: E402
                          next_whole_second, once_at, percentile, print_table, spread,
                          start_daemon, wait_for, write_jobs)
from saltpeter.config import ConfigDir  # noqa: E402

COLUMNS = ["jobs configured", "measure", "value (min / median / max)", "unit"]
FILES = 10


def daemon_log_time(line: str) -> float:
    """Epoch seconds of a daemon log line (``asctime`` is local time, ms precision)."""
    stamp = line[:23]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def log_line(daemon, needle: str):
    for line in daemon.output().splitlines():
        if needle in line:
            return line
    return None


def idle_jobs(count: int, command="mode=none", prefix="job"):
    """``count`` jobs whose one yearly fire time is a day ago (so none is due)."""
    fields = once_at(datetime.now(timezone.utc) - timedelta(days=1))
    return {"%s%05d" % (prefix, i): dict(fields, targets="sim:0", command=command)
            for i in range(count)}


def write_split(config_dir: Path, jobs: dict, files: int = FILES) -> None:
    names = sorted(jobs)
    for index in range(files):
        write_jobs(config_dir, "group%02d" % index,
                   {name: jobs[name] for name in names[index::files]})


def run_configured(count: int, idle_window: float, tmp: Path) -> dict:
    """Idle CPU, single-due-job latency and reload time with ``count`` jobs."""
    daemon = start_daemon(tmp)
    jobs = idle_jobs(count)
    write_split(daemon.config_dir, jobs)
    written = time.time()
    try:
        daemon.start()
        loaded_line = wait_for(lambda: log_line(daemon, "job job%05d: loaded" % (count - 1)),
                               timeout=300, interval=0.2, message="jobs loaded")
        load_seconds = daemon_log_time(loaded_line) - written
        time.sleep(3)
        meter = ProcessMeter(daemon.proc.pid)
        meter.start_window()
        main_cpu_start = _main_cpu(daemon)
        total_cpu = measure_window(meter, idle_window)
        main_cpu = 100.0 * (_main_cpu(daemon) - main_cpu_start) / idle_window
        # reload: one job changed in one file of count/FILES jobs
        changed = "job%05d" % 0
        jobs[changed] = dict(jobs[changed], command="mode=none changed=1")
        names = sorted(jobs)
        reload_written = time.time()
        write_jobs(daemon.config_dir, "group00", {name: jobs[name] for name in names[0::FILES]})
        changed_line = wait_for(lambda: log_line(daemon, "job %s: changed" % changed),
                                timeout=120, interval=0.05, message="reload")
        reload_seconds = daemon_log_time(changed_line) - reload_written
        # one due job among ``count``
        fire_time = next_whole_second(2.5)
        write_jobs(daemon.config_dir, "single", {"single": dict(
            once_at(fire_time), targets="sim:0", command="mode=none")})
        instance = "single_%d" % int(fire_time.timestamp())
        started = wait_for(lambda: log_times(daemon.log("single"), "Starting").get(instance),
                           timeout=60, interval=0.05, message="single job start")
        single_ms = (started - fire_time).total_seconds() * 1000
        return {"load": load_seconds, "idle_total": total_cpu, "idle_main": main_cpu,
                "reload": reload_seconds, "single": single_ms}
    finally:
        daemon.stop(timeout=60)
        daemon.kill_everything()


def _main_cpu(daemon) -> float:
    from bench.common import cpu_seconds
    return cpu_seconds(daemon.proc.pid)


def run_due(count: int, tmp: Path) -> dict:
    """``count`` jobs all due in the same second: latency to each worker's start."""
    daemon = start_daemon(tmp)
    try:
        daemon.start()
        fire_time = next_whole_second(4 + count / 1000)
        fields = once_at(fire_time)
        jobs = {"due%05d" % i: dict(fields, targets="sim:0", command="mode=none")
                for i in range(count)}
        write_split(daemon.config_dir, jobs)
        stamp = int(fire_time.timestamp())

        def all_started():
            found = []
            for name in jobs:
                when = log_times(daemon.log(name), "Starting").get("%s_%d" % (name, stamp))
                if when is None:
                    return None
                found.append((when - fire_time).total_seconds())
            return found

        latencies = wait_for(all_started, timeout=300, interval=0.5, message="all started")
        return {"p50": percentile(latencies, 50) * 1000, "p99": percentile(latencies, 99) * 1000,
                "max": max(latencies) * 1000}
    finally:
        daemon.stop(timeout=120)
        daemon.kill_everything()


def parse_cost(count: int, tmp: Path) -> float:
    """In-process: seconds for ``ConfigDir.load()`` of ``count`` jobs, cold."""
    config_dir = tmp / "parse"
    config_dir.mkdir(parents=True, exist_ok=True)
    write_split(config_dir, idle_jobs(count))
    started = time.perf_counter()
    ConfigDir(str(config_dir)).load()
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--due", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle-window", type=float, default=20.0)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sp-bench-sched-") as tmp_name:
        tmp = Path(tmp_name)
        for count in args.jobs:
            runs = [run_configured(count, args.idle_window, tmp / ("c%d_%d" % (count, run)))
                    for run in range(args.runs)]
            parses = [parse_cost(count, tmp / ("p%d_%d" % (count, run)))
                      for run in range(args.runs)]
            print("configured %d: %s" % (count, runs), file=sys.stderr, flush=True)
            rows += [
                [count, "startup: files written to last job loaded", spread(
                    [r["load"] for r in runs]), "s"],
                [count, "config parse, cold, in-process (ConfigDir.load)", spread(parses), "s"],
                [count, "idle CPU, daemon main process", spread(
                    [r["idle_main"] for r in runs]), "% of one core"],
                [count, "idle CPU, all saltpeter processes", spread(
                    [r["idle_total"] for r in runs]), "% of one core"],
                [count, "reload: one job changed, file written to applied (incl. <=1 s poll)",
                 spread([r["reload"] for r in runs]), "s"],
                [count, "fire latency, the single due job", spread(
                    [r["single"] for r in runs], "%.0f"), "ms"],
            ]
        due_runs = [run_due(args.due, tmp / ("d%d" % run)) for run in range(args.runs)]
        print("due: %s" % due_runs, file=sys.stderr, flush=True)
        rows += [
            [args.due, "fire latency p50, %d due in the same second" % args.due,
             spread([r["p50"] for r in due_runs], "%.0f"), "ms"],
            [args.due, "fire latency p99, %d due in the same second" % args.due,
             spread([r["p99"] for r in due_runs], "%.0f"), "ms"],
            [args.due, "fire latency max, %d due in the same second" % args.due,
             spread([r["max"] for r in due_runs], "%.0f"), "ms"],
        ]
    print_table("Scheduler, min / median / max of %d runs" % args.runs, COLUMNS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
