"""Benchmark 4, output: aggregate throughput of streamed output into the results and the
log files, with many wrappers printing ordinary 100-byte lines batched into 64 KiB frames,
and one wrapper streaming a lot (1 GB by default), with the daemon's RSS growth.

Throughput = bytes printed / (first output frame sent -> the worker's ``Finished`` line,
which comes after every machine's output is copied into the job's log file). RSS is the
peak sum over all saltpeter processes minus the sum just before the job fired.

Usage: python bench/output.py --wrappers 100 --mb-each 10 --single-mb 1024 --runs 3
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (ProcessMeter, log_times, stop_run,  # noqa: E402
                          next_whole_second, once_at, print_table, read_reports, spread,
                          start_daemon, write_jobs)

COLUMNS = ["case", "MB printed", "MB/s recorded", "seconds", "RSS growth MB",
           "log file complete"]
MB = 1000 * 1000


def run_once(wrappers: int, bytes_each: int, tmp: Path, timeout: float) -> dict:
    daemon = start_daemon(tmp)
    instance = None
    try:
        daemon.start()
        meter = ProcessMeter(daemon.proc.pid)
        fire_time = next_whole_second(2)
        instance = "out_%d" % int(fire_time.timestamp())
        procs = 2 if wrappers > 1 else 1
        write_jobs(daemon.config_dir, "out", {"out": dict(
            once_at(fire_time), targets="sim:%d" % wrappers,
            command="mode=wrappers procs=%d hold=1 heartbeat=5 output_bytes=%d "
                    "line_bytes=100 batch_bytes=65536 protocol=extended"
                    % (procs, bytes_each))})
        while time.time() < fire_time.timestamp() - 0.3:
            meter.sample()
            time.sleep(0.1)
        baseline = meter.peak_rss
        meter.peak_rss = 0
        deadline = time.monotonic() + timeout
        finished = None
        while time.monotonic() < deadline:
            meter.sample()
            finished = log_times(daemon.log("out"), "Finished").get(instance)
            if finished:
                break
            time.sleep(0.25)
        reports = read_reports(daemon.tmp / "reports", "%s.*.json" % instance)
        first_output = min((r["first_output"] for r in reports if r.get("first_output")),
                            default=None)
        total = wrappers * bytes_each
        log_size = os.path.getsize(daemon.log_dir / "out.log")
        if not finished or first_output is None:
            return {"rate": None, "seconds": None, "rss": (meter.peak_rss - baseline) / 1e6,
                    "complete": False}
        seconds = finished.timestamp() - first_output
        return {"rate": total / MB / seconds, "seconds": seconds,
                "rss": (meter.peak_rss - baseline) / 1e6, "complete": log_size >= total}
    finally:
        stop_run(daemon, instance)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wrappers", type=int, default=100)
    parser.add_argument("--mb-each", type=float, default=10.0)
    parser.add_argument("--single-mb", type=float, default=1000.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    rows = []
    cases = [("%d wrappers" % args.wrappers, args.wrappers, int(args.mb_each * MB)),
             ("1 wrapper", 1, int(args.single_mb * MB))]
    with tempfile.TemporaryDirectory(prefix="sp-bench-out-") as tmp_name:
        for name, wrappers, bytes_each in cases:
            runs = [run_once(wrappers, bytes_each,
                             Path(tmp_name) / ("w%d_%d" % (wrappers, run)), args.timeout)
                    for run in range(args.runs)]
            print("%s: %s" % (name, runs), file=sys.stderr, flush=True)
            rows.append([name, "%.0f" % (wrappers * bytes_each / MB),
                         spread([r["rate"] for r in runs], "%.1f"),
                         spread([r["seconds"] for r in runs], "%.1f"),
                         spread([r["rss"] for r in runs], "%.0f"),
                         "%d/%d" % (sum(bool(r["complete"]) for r in runs), len(runs))])
    print_table("Output, 100-byte lines in 64 KiB frames; min / median / max of %d runs"
                % args.runs, COLUMNS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
