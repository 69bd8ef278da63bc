"""Smoke run of each benchmark under bench/ at tiny sizes: it completes and prints its
table with the expected columns. The real sizes and results are in bench/RESULTS.md."""

import subprocess
import sys

from tests.helpers import REPO

HEADER_ROW = "| %s |"


def run_bench(script: str, *args: str, timeout: float = 60.0) -> str:
    completed = subprocess.run([sys.executable, str(REPO / "bench" / script)] + list(args),
                               cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def assert_table(output: str, columns) -> None:
    assert HEADER_ROW % " | ".join(columns) in output, output
    rows = [line for line in output.splitlines() if line.startswith("| ")]
    assert len(rows) >= 2, output


def test_fleet_benchmark_runs_tiny():
    from bench.fleet import COLUMNS
    output = run_bench("fleet.py", "--wrappers", "20", "--runs", "1", "--window", "2",
                       "--hold", "8")
    assert_table(output, COLUMNS)
    assert "bare sink" in output and "saltpeter (extended)" in output


def test_scheduler_benchmark_runs_tiny():
    from bench.scheduler import COLUMNS
    output = run_bench("scheduler.py", "--jobs", "20", "--due", "10", "--runs", "1",
                       "--idle-window", "1")
    assert_table(output, COLUMNS)
    assert "fire latency p99" in output


def test_fanout_benchmark_runs_tiny():
    from bench.fanout import COLUMNS
    output = run_bench("fanout.py", "--machines", "10", "--runs", "1", "--hold", "1")
    assert_table(output, COLUMNS)


def test_output_benchmark_runs_tiny():
    from bench.output import COLUMNS
    output = run_bench("output.py", "--wrappers", "4", "--mb-each", "0.2", "--single-mb", "1",
                       "--runs", "1")
    assert_table(output, COLUMNS)
