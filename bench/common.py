"""Shared plumbing of the benchmarks: process accounting from /proc, statistics, tables,
one-shot job YAML and a real daemon on temp dirs (through ``tests.helpers.Daemon``).

Every benchmark prints one table; each measured value is given as min/median/max over
its runs. Nothing here talks to anything but 127.0.0.1.
"""

import json
import os
import signal
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.helpers import Daemon, free_port, wait_for  # noqa: E402  (after sys.path)

PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
SIM_MARKER = "bench/simwrapper.py"   # load-generator processes: never counted as saltpeter

__all__ = ["Daemon", "free_port", "wait_for", "REPO", "PYTHON"]


# ---------------------------------------------------------------- /proc accounting

def _stat_fields(pid: int):
    with open("/proc/%d/stat" % pid) as handle:
        text = handle.read()
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds of ``pid`` itself (not its children)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cmdline(pid: int) -> str:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int):
    """``root`` and every live process below it, load generators left out."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry))
        except (OSError, IndexError):
            continue
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if SIM_MARKER in cmdline(pid):
            continue
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


class ProcessMeter:
    """CPU and RSS of a process tree (the daemon and all its children, or one server),
    sampled by ``sample()``: CPU is summed per pid from its first sample, RSS is the
    peak of the per-sample sum."""

    def __init__(self, root: int):
        self.root = root
        self.first_cpu = {}
        self.last_cpu = {}
        self.peak_rss = 0
        self.names = {}
        self.exclude = set()      # pids not counted (a measuring probe)

    def sample(self) -> None:
        total_rss = 0
        for pid in descendants(self.root):
            if pid in self.exclude:
                continue
            try:
                cpu = cpu_seconds(pid)
                total_rss += rss_bytes(pid)
            except (OSError, IndexError):
                continue
            self.first_cpu.setdefault(pid, cpu)
            self.last_cpu[pid] = cpu
            self.names.setdefault(pid, cmdline(pid)[:60])
        self.peak_rss = max(self.peak_rss, total_rss)

    def start_window(self) -> None:
        """Forget CPU so far: count from now (new pids count from their first sample,
        which is close to zero for a fresh process)."""
        self.first_cpu, self.last_cpu = {}, {}
        self.sample()
        self.window_started = time.monotonic()

    def cpu_used(self) -> float:
        return sum(self.last_cpu[pid] - self.first_cpu[pid] for pid in self.last_cpu)

    def cpu_percent(self) -> float:
        """CPU over the window as percent of one core."""
        elapsed = time.monotonic() - self.window_started
        return 100.0 * self.cpu_used() / elapsed if elapsed > 0 else 0.0


def measure_window(meter: ProcessMeter, seconds: float, interval: float = 0.5):
    meter.start_window()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        meter.sample()
    return meter.cpu_percent()


def kill_marked(marker: str) -> None:
    """Stop load generators this benchmark started (their command line has ``marker``)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            text = cmdline(int(entry))
            if SIM_MARKER in text and marker in text:
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def stop_run(daemon, instance) -> None:
    """End one benchmark run: the daemon, then the load generators of ``instance``."""
    daemon.stop(timeout=60)
    daemon.kill_everything()
    if instance:
        kill_marked(instance)


# ---------------------------------------------------------------- statistics and tables

def percentile(values, pct: float):
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(pct / 100.0 * (len(ordered) - 1)))))
    return ordered[index]


def spread(values, fmt="%.3g"):
    """``min / median / max`` of the runs' values."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return " / ".join(fmt % v for v in (min(values), statistics.median(values), max(values)))


def print_table(title: str, columns, rows) -> str:
    """Print (and return) a Markdown table."""
    lines = ["", "### " + title, "",
             "| " + " | ".join(columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


# ---------------------------------------------------------------- jobs and daemons

def once_at(moment: datetime) -> dict:
    """Cron fields (UTC) that match ``moment`` to the second (once a year)."""
    moment = moment.astimezone(timezone.utc)
    return {"sec": str(moment.second), "min": str(moment.minute), "hour": str(moment.hour),
            "dom": str(moment.day), "mon": str(moment.month), "dow": "*", "utc": True}


def next_whole_second(after_seconds: float) -> datetime:
    moment = datetime.now(timezone.utc) + timedelta(seconds=after_seconds)
    return moment.replace(microsecond=0) + timedelta(seconds=1)


def write_jobs(config_dir: Path, group: str, jobs: dict) -> Path:
    """``<group>.yaml`` holding ``jobs`` (JSON is YAML), written atomically."""
    path = Path(config_dir) / ("%s.yaml" % group)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(jobs, indent=0))
    os.replace(tmp, path)
    return path


def start_daemon(tmp: Path, extra_args=(), env=None, api=False) -> Daemon:
    """The real daemon (not ``--local``) with the simulated executor of ``bench/simexec.py``."""
    tmp.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(tmp, local=False, api=api, extra_args=list(extra_args),
                    env=dict(env or {}, SALTPETER_TEST_EXECUTOR="bench.simexec:SimExecutor",
                             SALTPETER_SIM_REPORT_DIR=str(tmp / "reports")))
    daemon.extra_args += ["--websocket-url", "ws://127.0.0.1:%d" % daemon.ws_port]
    (tmp / "reports").mkdir(exist_ok=True)
    return daemon


def parse_utc(text: str) -> datetime:
    return datetime.fromisoformat(text.strip())


def log_times(log_text: str, prefix: str):
    """{instance: datetime} of the legacy lines ``###### <prefix> <instance> at <time> ###``."""
    found = {}
    marker = "###### %s " % prefix
    for line in log_text.splitlines():
        if line.startswith(marker) and " at " in line and " on " not in line.split(" at ")[0]:
            body = line[len(marker):].rstrip("#").strip()
            instance, _, when = body.partition(" at ")
            try:
                found[instance] = parse_utc(when)
            except ValueError:
                continue
    return found


def read_reports(report_dir: Path, pattern: str = "*.json"):
    reports = []
    for path in sorted(Path(report_dir).glob(pattern)):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return reports


def machine_info() -> str:
    model = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        mem_kb = int(handle.readline().split()[1])
    return "nproc %d, CPU %s, RAM %.1f GiB, Python %s" % (
        os.cpu_count(), model, mem_kb / 1024 / 1024, sys.version.split()[0])
