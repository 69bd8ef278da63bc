"""Benchmark 3, fan-out: one job on N simulated machines (the simulated executor launches
their wrappers in two load-generator processes; each connects, starts, prints a line a
second, and completes ``--hold`` seconds after connecting).

Measured: from the scheduled second to all results recorded (the worker's ``Finished``
line, written after every machine's result block), and from the last ``complete`` sent
by any wrapper to all recorded.

Usage: python bench/fanout.py --machines 1000 5000 --runs 3
"""

import argparse
import re
import sys
from collections import Counter
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (log_times, next_whole_second, once_at,  # noqa: E402
                          print_table, read_reports, spread, start_daemon, stop_run,
                          wait_for, write_jobs)

COLUMNS = ["machines", "fire to all recorded s", "last complete to all recorded s",
           "wrappers connected", "refused", "results in log", "exit codes in log"]
EXIT_CODE = re.compile(r"^\*\*\*\* Exit Code (-?\d+) ", re.M)


def exit_codes(log_text: str) -> str:
    """``0x4998 253x2``: how many result blocks of the log carry each exit code."""
    counts = Counter(int(code) for code in EXIT_CODE.findall(log_text))
    return " ".join("%dx%d" % (code, n) for code, n in sorted(counts.items())) or "-"


def run_once(machines: int, hold: float, tmp: Path) -> dict:
    daemon = start_daemon(tmp)
    instance = None
    try:
        daemon.start()
        fire_time = next_whole_second(3)
        instance = "fan_%d" % int(fire_time.timestamp())
        write_jobs(daemon.config_dir, "fan", {"fan": dict(
            once_at(fire_time), targets="sim:%d" % machines,
            command="mode=wrappers procs=2 hold=%s heartbeat=5 lines_per_sec=1 "
                    "protocol=extended" % hold)})
        finished = wait_for(lambda: log_times(daemon.log("fan"), "Finished").get(instance),
                            timeout=300 + machines / 20, interval=0.2, message="fan-out done")
        reports = wait_for(lambda: (lambda r: r if len(r) == 2 else None)(
            read_reports(daemon.tmp / "reports", "%s.*.json" % instance)),
            timeout=60, message="load generator reports")
        last_complete = max(r["last_complete"] or 0 for r in reports)
        log_text = daemon.log("fan")
        logged = log_text.count("**** Exit Code")
        return {"fire": (finished - fire_time).total_seconds(),
                "after_last": finished.timestamp() - last_complete,
                "connected": sum(r["connected"] for r in reports),
                "refused": sum(r["refused"] for r in reports), "logged": logged,
                "codes": exit_codes(log_text)}
    finally:
        stop_run(daemon, instance)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--machines", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hold", type=float, default=3.0,
                        help="seconds each wrapper runs after connecting")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sp-bench-fan-") as tmp_name:
        for machines in args.machines:
            runs = [run_once(machines, args.hold, Path(tmp_name) / ("m%d_%d" % (machines, run)))
                    for run in range(args.runs)]
            print("fan-out %d: %s" % (machines, runs), file=sys.stderr, flush=True)
            rows.append([machines, spread([r["fire"] for r in runs]),
                         spread([r["after_last"] for r in runs]),
                         spread([r["connected"] for r in runs], "%d"),
                         spread([r["refused"] for r in runs], "%d"),
                         spread([r["logged"] for r in runs], "%d"),
                         " / ".join(r["codes"] for r in runs)])
    print_table("Fan-out, one job, wrappers complete %.0f s after connecting; min / median / "
                "max of %d runs" % (args.hold, args.runs), COLUMNS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
