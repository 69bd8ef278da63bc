"""Benchmark 1, the wrapper fleet: N simulated wrappers (two load-generator processes)
heartbeating every 5 s, against the bare sink and against the real daemon.

For each run: CPU (user+sys, percent of one core) over a steady window once every
wrapper is connected, peak RSS, connection setup rate, refused connections, and for the
daemon the message-to-state latency measured by a probe wrapper inside a per-run worker
(send a numbered output line, poll the state's view of that machine's output every 20 ms
until it shows the line; that probe worker's own CPU is left out, the server's and the
Manager's work for it is not). Heartbeats themselves reach the shared state only as
transitions (a machine seen, a machine lost), so the latency of an ordinary message is
what is measured.

Saltpeter's CPU and RSS are the sums over the daemon's main process and every process
below it (Manager, WebSocket server, per-run workers); the load generators are not
counted. RSS is a plain sum (shared pages of forked processes counted once per process).

Usage: python bench/fleet.py --wrappers 10000 --runs 3 [--protocol seed|extended]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (PYTHON, REPO, ProcessMeter, free_port, kill_marked,  # noqa: E402
                          measure_window, next_whole_second, once_at, percentile,
                          print_table, read_reports, spread, start_daemon, stop_run,
                          wait_for, write_jobs)

SIMWRAPPER = str(REPO / "bench" / "simwrapper.py")
COLUMNS = ["server", "wrappers", "CPU % of one core", "CPU ratio to sink", "peak RSS MB",
           "setup conn/s", "refused", "msg-to-state p50 ms", "msg-to-state p99 ms"]


def established(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (the server's side)."""
    count = 0
    wanted = ":%04X" % port
    with open("/proc/net/tcp") as handle:
        next(handle)
        for line in handle:
            fields = line.split()
            if fields[1].endswith(wanted) and fields[3] == "01":
                count += 1
    return count


def wait_connected(port: int, expected: int, stall: float = 20.0, limit: float = 300.0):
    """Seconds until ``expected`` connections are up (or progress stalls)."""
    started = time.monotonic()
    best, best_at = -1, started
    while time.monotonic() - started < limit:
        now_count = established(port)
        if now_count >= expected:
            return time.monotonic() - started, now_count
        if now_count > best:
            best, best_at = now_count, time.monotonic()
        elif time.monotonic() - best_at > stall:
            break
        time.sleep(0.2)
    return time.monotonic() - started, established(port)


def setup_rate(reports):
    firsts = [r["first_attempt"] for r in reports if r.get("first_attempt")]
    lasts = [r["last_connected"] for r in reports if r.get("last_connected")]
    connected = sum(r["connected"] for r in reports)
    if not firsts or not lasts:
        return None
    return connected / max(1e-3, max(lasts) - min(firsts))


def run_sink(args, tmp: Path, tag: str):
    port = free_port()
    sink = subprocess.Popen([PYTHON, str(REPO / "bench" / "sink.py"), "--port", str(port),
                             "--max-seconds", str(args.hold + 300)])
    gens = []
    try:
        time.sleep(0.5)
        meter = ProcessMeter(sink.pid)
        per_proc = (args.wrappers + args.procs - 1) // args.procs
        for index in range(args.procs):
            first = index * per_proc
            count = min(per_proc, args.wrappers - first)
            gens.append(subprocess.Popen(
                [PYTHON, SIMWRAPPER, "--url", "ws://127.0.0.1:%d" % port, "--first",
                 str(first), "--count", str(count), "--hold", str(args.hold),
                 "--protocol", "seed", "--report", str(tmp / ("sink.%d.json" % index)),
                 "--tag", tag]))
        meter.sample()
        wait_connected(port, args.wrappers)
        cpu = measure_window(meter, args.window)
        for gen in gens:
            gen.wait(timeout=args.hold + 120)
        reports = read_reports(tmp, "sink.*.json")
        return {"cpu": cpu, "rss": meter.peak_rss / 1e6, "rate": setup_rate(reports),
                "refused": sum(r["refused"] for r in reports),
                "errors": [r["errors"] for r in reports]}
    finally:
        sink.terminate()
        sink.wait(timeout=10)
        for gen in gens:
            if gen.poll() is None:
                gen.kill()
                gen.wait()
        kill_marked(tag)


def run_saltpeter(args, tmp: Path):
    extra = ["--no-wrapper-auth"] if args.protocol == "seed" else []
    daemon = start_daemon(tmp, extra_args=extra)
    instance = None
    try:
        daemon.start()
        meter = ProcessMeter(daemon.proc.pid)
        fire_time = next_whole_second(3)
        instance = "fleet_%d" % int(fire_time.timestamp())
        write_jobs(daemon.config_dir, "fleet", {
            "fleet": dict(once_at(fire_time), targets="sim:%d" % args.wrappers,
                          command="mode=wrappers procs=%d hold=%s heartbeat=5 protocol=%s"
                          % (args.procs, args.hold, args.protocol)),
            "probe": dict(once_at(fire_time), targets="sim:1",
                          command="mode=probe hold=%s" % (args.hold - 5)),
        })
        while time.time() < fire_time.timestamp():
            meter.sample()
            time.sleep(0.2)
        wait_connected(daemon.ws_port, args.wrappers + 1)
        for pid_file in (daemon.tmp / "reports").glob("probe_*.probe.pid"):
            meter.exclude.add(int(pid_file.read_text()))
        window_start = time.time()
        cpu = measure_window(meter, args.window)
        window_end = time.time()
        time.sleep(2)   # the probe rewrites its report every 3 samples
        probes = read_reports(daemon.tmp / "reports", "probe_*.probe.json")
        samples = [lat for p in probes for sent, lat in p["samples"]
                   if window_start <= sent <= window_end]
        # no need to wait for the run's end: stopping the daemon closes every connection
        # and the load generators write their reports
        daemon.stop(timeout=60)
        reports = wait_for(lambda: (lambda r: r if len(r) == args.procs else None)(
            read_reports(daemon.tmp / "reports", "fleet_*.json")), timeout=60,
            message="load generator reports")
        return {"cpu": cpu, "rss": meter.peak_rss / 1e6, "rate": setup_rate(reports),
                "refused": sum(r["refused"] for r in reports) if reports else None,
                "p50": percentile(samples, 50) * 1000, "p99": percentile(samples, 99) * 1000,
                "samples": len(samples), "errors": [r["errors"] for r in reports]}
    finally:
        stop_run(daemon, instance)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wrappers", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window", type=float, default=30.0,
                        help="seconds of steady state measured")
    parser.add_argument("--hold", type=float, default=None,
                        help="seconds each wrapper stays (default: window + setup allowance)")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--protocol", choices=("seed", "extended"), default="extended",
                        help="protocol of the wrappers against saltpeter (the sink gets seed)")
    parser.add_argument("--no-sink", action="store_true")
    args = parser.parse_args(argv)
    if args.hold is None:
        args.hold = args.window + 20 + args.wrappers / 400
    sink_runs, sp_runs = [], []
    with tempfile.TemporaryDirectory(prefix="sp-bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        for run in range(args.runs):
            if not args.no_sink:
                sink_runs.append(run_sink(args, tmp / ("sink%d" % run) if False else tmp,
                                          "sinkrun%d-%s" % (run, tmp.name)))
                for path in tmp.glob("sink.*.json"):
                    path.unlink()
            sp_runs.append(run_saltpeter(args, tmp / ("sp%d" % run)))
            print("run %d: sink %s saltpeter %s" % (run + 1, sink_runs[-1:] or "-",
                                                    sp_runs[-1]), file=sys.stderr, flush=True)
    sink_cpu = sorted(r["cpu"] for r in sink_runs)
    rows = []
    if sink_runs:
        rows.append(["bare sink", args.wrappers, spread([r["cpu"] for r in sink_runs]),
                     "1", spread([r["rss"] for r in sink_runs], "%.0f"),
                     spread([r["rate"] for r in sink_runs], "%.0f"),
                     spread([r["refused"] for r in sink_runs], "%d"), "n/a", "n/a"])
    sink_median = sink_cpu[len(sink_cpu) // 2] if sink_cpu else 0.0
    ratio = [r["cpu"] / sink_median for r in sp_runs] if sink_median > 0 else []
    rows.append(["saltpeter (%s)" % args.protocol, args.wrappers,
                 spread([r["cpu"] for r in sp_runs]), spread(ratio, "%.2f") if ratio else "n/a",
                 spread([r["rss"] for r in sp_runs], "%.0f"),
                 spread([r["rate"] for r in sp_runs], "%.0f"),
                 spread([r["refused"] for r in sp_runs], "%d"),
                 spread([r["p50"] for r in sp_runs], "%.0f"),
                 spread([r["p99"] for r in sp_runs], "%.0f")])
    print_table("Wrapper fleet: %d wrappers, heartbeat 5 s, %.0f s window, min / median / max "
                "of %d runs" % (args.wrappers, args.window, args.runs), COLUMNS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
