"""User stories of the core daemon in ``--local`` mode: real daemon, real wrappers, real
WebSocket connections; outcomes observed in log files, processes and exit codes."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, free_port, pids_with_marker, wait_for, write_job

RESULT_BLOCK = re.compile(
    r"########## (?P<machine>\S+) from (?P<instance>\S+) ################\n"
    r"\*\*\*\* Exit Code (?P<code>-?\d+) \*\*\*\*\*\*\n"
    r"(?P<output>.*?)\n"
    r"####### END (?P=machine) from (?P=instance) at (?P<end>[^#]+) #########\n",
    re.S)


def results(log_text):
    """Every machine result block of a log file, in order."""
    return [match.groupdict() for match in RESULT_BLOCK.finditer(log_text)]


def job_yaml(name, command, sec="*", **extra):
    lines = ["%s:" % name, "  sec: '%s'" % sec]
    for key in ("min", "hour", "dom", "mon", "dow"):
        lines.append("  %s: '*'" % key)
    lines.append("  command: %s" % _quote(command))
    for key, value in extra.items():
        lines.append("  %s: %s" % (key, value if not isinstance(value, str) else _quote(value)))
    return "\n".join(lines) + "\n"


def _quote(text):
    return "'%s'" % text.replace("'", "''")


def sleeper(seconds, marker):
    """A command that sleeps and carries ``marker`` in its argv, to be found in /proc."""
    return "%s -c 'import time; time.sleep(%s)' %s" % (sys.executable, seconds, marker)


def pids_running(marker):
    """PIDs of live, non-zombie processes with ``marker`` in their argv."""
    found = []
    for pid in pids_with_marker(str(marker)):
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                if str(marker).encode() in handle.read() and not _is_zombie(pid):
                    found.append(pid)
        except OSError:
            pass
    return found


def parent_of(pid):
    with open("/proc/%d/stat" % pid) as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def cmdline(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode(errors="replace")


def first_result(daemon, job, timeout=20):
    return wait_for(lambda: results(daemon.log(job)), timeout=timeout,
                    message="a result of %s in its log file" % job)[0]


def test_job_fires_and_output_and_exit_code_land_in_the_log(daemon_factory):
    daemon = daemon_factory()
    write_job(daemon.config_dir, "demo", job_yaml(
        "hello", "echo out-line; echo err-line >&2; exit 3"))
    daemon.start()
    result = first_result(daemon, "hello")
    assert result["code"] == "3"
    assert "out-line" in result["output"] and "err-line" in result["output"]
    assert result["machine"] == socket.gethostname()
    assert re.fullmatch(r"hello_\d+", result["instance"])
    text = daemon.log("hello")
    instance = result["instance"]
    assert "###### Starting %s at " % instance in text
    assert "###### Starting %s on %s at " % (instance, result["machine"]) in text
    wait_for(lambda: "###### Finished %s at " % instance in daemon.log("hello"),
             message="Finished line")
    # <time> is str() of an aware UTC datetime
    assert re.search(r"Finished %s at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\+00:00 #" % instance,
                     daemon.log("hello"))


def test_fire_times_are_each_second_none_skipped(daemon_factory):
    daemon = daemon_factory()
    write_job(daemon.config_dir, "demo", job_yaml("tick", "true"))
    daemon.start()
    wait_for(lambda: len(results(daemon.log("tick"))) >= 4, timeout=20, message="4 runs")
    seconds = sorted(int(r["instance"].rsplit("_", 1)[1]) for r in results(daemon.log("tick")))
    assert seconds == list(range(seconds[0], seconds[0] + len(seconds)))


def test_timeout_gives_124_and_leaves_no_process(daemon_factory, tmp_path):
    marker = tmp_path / "timeout-marker"
    daemon = daemon_factory()
    # a child and a grandchild that ignore nothing but would run for 5 minutes
    write_job(daemon.config_dir, "demo", job_yaml(
        "slow", "echo started; %s & %s; wait" % (sleeper(300, marker), sleeper(301, marker)),
        sec="*/30",
        timeout=2))
    daemon.start()
    result = first_result(daemon, "slow", timeout=45)
    assert result["code"] == "124"
    assert "started" in result["output"]
    wait_for(lambda: not pids_running(marker), timeout=5,
             message="no process of the timed-out job left")


def test_killed_wrapper_ends_as_253_within_20_seconds(daemon_factory, tmp_path):
    marker = tmp_path / "lost-marker"
    daemon = daemon_factory()
    write_job(daemon.config_dir, "demo", job_yaml("lost", sleeper(120, marker), sec="*/30"))
    daemon.start()
    job_pid = wait_for(lambda: pids_running(marker), timeout=40,
                       message="the job's command running")[0]
    wrapper_pid = parent_of(job_pid)
    while "wrapper" not in cmdline(wrapper_pid):
        wrapper_pid = parent_of(wrapper_pid)
    os.kill(wrapper_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    result = first_result(daemon, "lost", timeout=25)
    assert result["code"] == "253"
    assert time.monotonic() - killed_at < 20
    # the command died with its wrapper (parent-death signal)
    wait_for(lambda: not pids_running(marker), timeout=5, message="orphan gone")


def test_broken_yaml_is_reported_and_skipped_while_good_job_fires(daemon_factory):
    daemon = daemon_factory()
    write_job(daemon.config_dir, "broken", "this: is: not: yaml: [\n")
    write_job(daemon.config_dir, "badjob", job_yaml("badcron", "true", sec="99"))
    write_job(daemon.config_dir, "good", job_yaml("fine", "echo fine"))
    daemon.start()
    wait_for(lambda: len(results(daemon.log("fine"))) >= 2, message="good job fires twice")
    output = daemon.output()
    assert "broken.yaml" in output
    assert "badcron" in output and "badjob.yaml" in output
    assert output.count("broken.yaml") == 1, "a bad file is reported once"
    assert not os.path.exists(daemon.log_dir / "badcron.log")


def test_hot_reload_adds_and_removes_a_job(daemon_factory):
    daemon = daemon_factory()
    write_job(daemon.config_dir, "first", job_yaml("alpha", "echo alpha"))
    daemon.start()
    first_result(daemon, "alpha")
    added = write_job(daemon.config_dir, "second", job_yaml("beta", "echo beta"))
    first_result(daemon, "beta", timeout=8)
    added.unlink()
    wait_for(lambda: "removed" in daemon.output() and "beta" in daemon.output(), timeout=5,
             message="beta removed")
    count = len(results(daemon.log("beta")))
    deadline = time.monotonic() + 3
    wait_for(lambda: time.monotonic() > deadline, timeout=5, message="3 quiet seconds")
    assert len(results(daemon.log("beta"))) <= count + 1


def test_overlapping_run_is_skipped_and_logged(daemon_factory, tmp_path):
    daemon = daemon_factory()
    write_job(daemon.config_dir, "demo", job_yaml("long", sleeper(3, tmp_path / "long")))
    daemon.start()
    wait_for(lambda: "###### Overlap detected on long_" in daemon.log("long"), timeout=15,
             message="overlap line")
    first_result(daemon, "long", timeout=15)
    starts = re.findall(r"###### Starting (long_\d+) at", daemon.log("long"))
    overlaps = re.findall(r"###### Overlap detected on (long_\d+) at", daemon.log("long"))
    assert not set(starts) & set(overlaps)


def test_sigterm_stops_daemon_quickly_without_orphans(daemon_factory, tmp_path):
    daemon = daemon_factory()
    write_job(daemon.config_dir, "demo", job_yaml("busy", "sleep 1; echo done"))
    daemon.start()
    first_result(daemon, "busy")
    children = _descendants(daemon.proc.pid)
    assert children, "the daemon runs child processes"
    took = daemon.stop(signal.SIGTERM, timeout=10)
    assert took < 10
    assert daemon.proc.returncode == 0
    for pid in children:
        assert not os.path.exists("/proc/%d" % pid) or _is_zombie(pid) is False


def _descendants(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout.split()
    found = [int(p) for p in out]
    for child in list(found):
        found += _descendants(child)
    return found


def _is_zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def test_wrapper_that_never_connects_gives_255(daemon_factory):
    closed_port = free_port()
    daemon = daemon_factory(extra_args=["--websocket-url", "ws://127.0.0.1:%d" % closed_port,
                                        "--wrapper-connect-timeout", "3"])
    write_job(daemon.config_dir, "demo", job_yaml("nowhere", "echo never", sec="*/30"))
    daemon.start()
    result = first_result(daemon, "nowhere", timeout=45)
    assert result["code"] == "255"
    assert "never connected" in result["output"]
    assert "never" not in result["output"].replace("never connected", "")


def test_env_cwd_and_soft_timeout(daemon_factory, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    daemon = daemon_factory()
    write_job(daemon.config_dir, "demo", job_yaml(
        "envjob", 'pwd; echo "$GREETING"; env | grep -c "^SP_" || true; sleep 2',
        sec="*/30", cwd=str(workdir), soft_timeout=1) + "  env:\n    GREETING: hi there\n")
    daemon.start()
    result = first_result(daemon, "envjob", timeout=45)
    lines = result["output"].splitlines()
    assert lines[:3] == [str(workdir), "hi there", "0"]
    assert result["code"] == "0"
    assert "soft timeout" in daemon.output()


def test_user_is_a_full_privilege_drop(daemon_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    daemon = daemon_factory()
    write_job(daemon.config_dir, "demo",
              job_yaml("asnobody", 'id -u; id -G; echo "$HOME $USER $LOGNAME"', sec="*/30",
                       user="nobody")
              + job_yaml("asghost", "echo should-not-run", sec="*/30",
                         user="no-such-user-xyz"))
    daemon.start()
    import pwd
    nobody = pwd.getpwnam("nobody")
    result = first_result(daemon, "asnobody", timeout=45)
    uid, groups, names = result["output"].splitlines()[:3]
    assert uid == str(nobody.pw_uid)
    assert "0" not in groups.split(), "root's groups must be dropped"
    assert names == "%s nobody nobody" % nobody.pw_dir
    ghost = first_result(daemon, "asghost", timeout=45)
    assert ghost["code"] == "255"
    assert "no-such-user-xyz" in ghost["output"]
    assert "should-not-run" not in ghost["output"]


def test_maintenance_global_and_per_machine(daemon_factory):
    daemon = daemon_factory()
    write_job(daemon.config_dir, "demo", job_yaml("maint", "echo ran"))
    write_job(daemon.config_dir, "zz_maintenance",
              "saltpeter_maintenance:\n  global: false\n  machines: ['%s']\n"
              % socket.gethostname())
    daemon.start()
    wait_for(lambda: "!!!!!! No targets matched for maint_" in daemon.log("maint"),
             message="no targets line")
    assert "Target under maintenance" in daemon.output()
    assert not results(daemon.log("maint"))
    write_job(daemon.config_dir, "zz_maintenance", "saltpeter_maintenance:\n  global: true\n")
    wait_for(lambda: "global maintenance" in daemon.output(), timeout=8,
             message="global maintenance noticed")
    size = len(daemon.log("maint"))
    deadline = time.monotonic() + 2.5
    wait_for(lambda: time.monotonic() > deadline, timeout=5, message="quiet period")
    assert len(daemon.log("maint")) == size, "no job starts under global maintenance"


def test_fifty_megabytes_of_output_all_in_the_log(daemon_factory):
    daemon = daemon_factory(api=True, extra_args=["--output-cap", "65536"])
    # 50 MB: 500,000 lines of 100 bytes, numbered so that loss or reordering shows
    command = ("%s -c \"import sys; w=sys.stdout.write; "
               "[w('%%09d' %% i + 'x' * 90 + '\\\\n') for i in range(500000)]\"" % sys.executable)
    write_job(daemon.config_dir, "demo", job_yaml("big", command, sec="*/30"))
    daemon.start()
    result = first_result(daemon, "big", timeout=90)
    assert result["code"] == "0"
    lines = result["output"].split("\n")
    assert len(lines) == 500001 and lines[-1] == ""
    assert lines[0] == "000000000" + "x" * 90
    assert lines[499999] == "000499999" + "x" * 90
    assert all(len(line) == 99 for line in lines[:-1])
    # the live state keeps only the capped tail, behind a truncation marker
    ret = daemon.http_get("/status")["state"]["big"]["results"][socket.gethostname()]["ret"]
    marker, _, kept = ret.partition("\n")
    assert "truncated" in marker and "50000000" in marker
    assert len(kept) <= 65536 and kept.endswith("000499999" + "x" * 90 + "\n")
    # and no daemon process holds the output in memory
    for pid in [daemon.proc.pid] + _descendants(daemon.proc.pid):
        with open("/proc/%d/status" % pid) as handle:
            rss_kb = int([l for l in handle if l.startswith("VmRSS")][0].split()[1])
        assert rss_kb < 150 * 1024, "process %d uses %d MB" % (pid, rss_kb // 1024)


def test_examples_load_cleanly_and_hello_fires(daemon_factory):
    daemon = daemon_factory()
    for example in (REPO / "examples").glob("*.yaml"):
        (daemon.config_dir / example.name).write_text(example.read_text())
    daemon.start()
    result = first_result(daemon, "hello", timeout=15)
    assert result["code"] == "0" and result["output"].startswith("hello from ")
    assert " ERROR " not in daemon.output()


def test_cli_version_and_errors(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "saltpeter", *args], cwd=REPO,
                                       capture_output=True, text=True, timeout=30)
    version = run("-v")
    assert version.returncode == 0 and re.search(r"\d+\.\d+", version.stdout)
    bad_flag = run("--no-such-flag")
    assert bad_flag.returncode == 2
    assert len(bad_flag.stderr.strip().splitlines()) == 1
    assert "--no-such-flag" in bad_flag.stderr
    missing = run("-c", str(tmp_path / "missing"), "-l", str(tmp_path / "log"), "--local")
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "missing" in missing.stderr
    bad_port = run("-w", "70000")
    assert bad_port.returncode == 2 and len(bad_port.stderr.strip().splitlines()) == 1


def test_write_wrapper_gives_a_single_file_that_runs_without_packages(tmp_path):
    target = tmp_path / "sp-wrapper.py"
    done = subprocess.run([sys.executable, "-m", "saltpeter", "--write-wrapper", str(target)],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and str(target) in done.stdout
    usage = subprocess.run([sys.executable, "-I", "-S", str(target)], capture_output=True,
                           text=True, timeout=30, cwd=str(tmp_path))
    assert usage.returncode == 2
    assert "SP_WEBSOCKET_URL" in usage.stderr and len(usage.stderr.strip().splitlines()) == 1


def test_websocket_listen_queue_holds_a_fleet_dialling_back_at_once(daemon_factory):
    """A job launched on thousands of machines has all their wrappers dial back at once;
    with asyncio's default listen backlog of 100 the kernel dropped the overflow and some
    wrappers were still not connected a minute later. ``ss`` shows a listening socket's
    backlog as its Send-Q."""
    daemon = daemon_factory()
    daemon.start()
    with open("/proc/sys/net/core/somaxconn") as handle:
        expected = min(4096, int(handle.read()))
    out = subprocess.run(["ss", "-ltnH", "sport = :%d" % daemon.ws_port],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out, "no listening socket on the WebSocket port"
    assert int(out[2]) == expected
