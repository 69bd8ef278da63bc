"""User stories of the daemon on a real Salt master with minion-a and minion-b: jobs run
on the minions through the deployed wrapper (or the legacy cmd.run path); outcomes are
observed in the job log files, the API and the processes."""

import re

import pytest

from tests.helpers import wait_for, write_job
from tests.salt_cluster import salt_cluster_fixture  # noqa: F401  (fixture "salt_cluster")

BOTH = ["minion-a", "minion-b"]

RESULT_BLOCK = re.compile(
    r"########## (?P<machine>\S+) from (?P<instance>\S+) ################\n"
    r"\*\*\*\* Exit Code (?P<code>-?\d+) \*\*\*\*\*\*\n"
    r"(?P<output>.*?)\n?"
    r"####### END (?P=machine) from (?P=instance) at (?P<end>[^#]+) #########\n",
    re.S)


def job_yaml(name, command, **extra):
    lines = ["%s:" % name, "  sec: '*'"]
    lines += ["  %s: '*'" % key for key in ("min", "hour", "dom", "mon", "dow")]
    lines.append("  command: '%s'" % command.replace("'", "''"))
    for key, value in extra.items():
        lines.append("  %s: %s" % (key, value))
    return "\n".join(lines) + "\n"


def first_run(daemon, job, machines=BOTH, timeout=40):
    """{machine: (exit code, output)} of the job's first instance, once every machine of
    ``machines`` has its result block in the log file."""
    def complete():
        blocks = [m.groupdict() for m in RESULT_BLOCK.finditer(daemon.log(job))]
        if not blocks:
            return None
        instance = blocks[0]["instance"]
        found = {b["machine"]: (int(b["code"]), b["output"].rstrip("\n")) for b in blocks
                 if b["instance"] == instance}
        return found if sorted(found) == sorted(machines) else None
    return wait_for(complete, timeout=timeout,
                    message="results of %s on %s in its log" % (job, machines))


def start_legacy(daemon):
    """Start a ``--legacy`` daemon (``Daemon.start`` knows it has no WebSocket port)."""
    return daemon.start()


@pytest.fixture
def salt_daemon(daemon_factory, salt_cluster):
    """Make a daemon on the test Salt master whose wrappers dial back to 127.0.0.1."""
    def make(*extra_args, api=False):
        daemon = daemon_factory(local=False, api=api, extra_args=[
            "--salt-config", salt_cluster.master_config,
            "--wrapper-dir", str(salt_cluster.root / "wrapper")] + list(extra_args))
        daemon.extra_args += ["--websocket-url", "ws://127.0.0.1:%d" % daemon.ws_port]
        return daemon
    return make


def test_job_runs_on_both_minions_through_the_wrapper(salt_daemon):
    daemon = salt_daemon()
    write_job(daemon.config_dir, "fleet", job_yaml(
        "hello", 'echo "out $GREETING"; echo err >&2; exit 3',
        env="{GREETING: salt}", targets="'minion-*'"))
    daemon.start()
    results = first_run(daemon, "hello")
    for machine in BOTH:
        code, output = results[machine]
        assert code == 3
        assert "out salt" in output and "err" in output
    log_text = daemon.log("hello")
    assert "###### Starting hello_" in log_text
    assert re.search(r"###### Starting hello_\d+ on minion-a at ", log_text)
    assert "Wrapper execution failed" not in log_text


def test_job_longer_than_salts_timeout_completes_with_full_output(salt_daemon):
    daemon = salt_daemon()
    # The master's own timeout is 5 s; the job takes longer and still streams to the end.
    write_job(daemon.config_dir, "fleet", job_yaml(
        "long", "echo begin; sleep 9; echo finished"))
    daemon.start()
    results = first_run(daemon, "long", timeout=60)
    assert {m: r[0] for m, r in results.items()} == {"minion-a": 0, "minion-b": 0}
    assert all(r[1].split() == ["begin", "finished"] for r in results.values())


def test_timeout_gives_124_on_every_minion(salt_daemon):
    daemon = salt_daemon()
    write_job(daemon.config_dir, "fleet", job_yaml("slow", "sleep 60", timeout=2))
    daemon.start()
    results = first_run(daemon, "slow", timeout=60)
    assert {m: r[0] for m, r in results.items()} == {"minion-a": 124, "minion-b": 124}


def test_kill_through_the_api_gives_143_on_every_minion(salt_daemon):
    daemon = salt_daemon(api=True)
    write_job(daemon.config_dir, "fleet", job_yaml("killme", "echo up; sleep 120"))
    daemon.start()

    def both_started():
        status = daemon.http_get("/status")
        results = (status.get("state", {}).get("killme") or {}).get("results", {})
        return sorted(m for m, r in results.items() if "up" in (r.get("ret") or ""))
    wait_for(lambda: both_started() == BOTH, timeout=40, message="both minions running")
    code, _ = daemon.http_post("/kill", {"job": "killme"})
    assert code == 200
    results = first_run(daemon, "killme", timeout=40)
    assert {m: r[0] for m, r in results.items()} == {"minion-a": 143, "minion-b": 143}


def test_batch_size_one_runs_one_minion_after_the_other(salt_daemon):
    daemon = salt_daemon()
    write_job(daemon.config_dir, "fleet", job_yaml(
        "batched", "date +%s.%N; sleep 2; date +%s.%N", batch_size=1))
    daemon.start()
    results = first_run(daemon, "batched", timeout=60)
    spans = sorted(tuple(float(x) for x in r[1].split()) for r in results.values())
    assert [r[0] for r in results.values()] == [0, 0]
    assert spans[0][1] <= spans[1][0], "the second batch started before the first ended"


def test_maintenance_machine_is_left_out(salt_daemon):
    daemon = salt_daemon()
    write_job(daemon.config_dir, "fleet", job_yaml("maint", "echo ok"))
    write_job(daemon.config_dir, "zz_maintenance",
              "saltpeter_maintenance:\n  global: false\n  machines: ['minion-b']\n")
    daemon.start()
    results = first_run(daemon, "maint", machines=["minion-a"])
    assert results["minion-a"][0] == 0
    assert "minion-b" not in daemon.log("maint")
    assert "Target under maintenance" in daemon.output()


@pytest.mark.parametrize("mode", ["--legacy", "use_wrapper: false"])
def test_legacy_path_completes(salt_daemon, mode):
    daemon = salt_daemon(*(["--legacy"] if mode == "--legacy" else []))
    extra = {"use_wrapper": "false"} if mode != "--legacy" else {}
    write_job(daemon.config_dir, "fleet", job_yaml(
        "legacy", 'echo "legacy $GREETING"; exit 4', env="{GREETING: old}", **extra))
    start_legacy(daemon) if mode == "--legacy" else daemon.start()
    results = first_run(daemon, "legacy")
    assert results == {"minion-a": (4, "legacy old"), "minion-b": (4, "legacy old")}


def test_legacy_timeout_gives_124(salt_daemon):
    daemon = salt_daemon("--legacy")
    write_job(daemon.config_dir, "fleet", job_yaml("legacyslow", "sleep 60", timeout=2))
    start_legacy(daemon)
    results = first_run(daemon, "legacyslow", timeout=60)
    assert {m: r[0] for m, r in results.items()} == {"minion-a": 124, "minion-b": 124}


def test_stopped_minion_gives_255_while_the_other_succeeds(salt_daemon, salt_cluster):
    salt_cluster.stop_minion("minion-b")
    try:
        daemon = salt_daemon()
        write_job(daemon.config_dir, "fleet", job_yaml("half", "echo fine"))
        daemon.start()
        results = first_run(daemon, "half", timeout=60)
        assert results["minion-a"] == (0, "fine")
        assert results["minion-b"][0] == 255
        assert "Target did not respond" in results["minion-b"][1]
    finally:
        salt_cluster.start_minion("minion-b")


def test_salt_master_down_gives_255_and_the_daemon_keeps_scheduling(daemon_factory, tmp_path):
    """No master listens on the configured ports: every run fails with a clear error and
    255 for the listed machines, and the next runs still fire."""
    master = tmp_path / "master"
    master.write_text("root_dir: %s\ninterface: 127.0.0.1\npublish_port: 1\nret_port: 2\n"
                      % tmp_path)
    daemon = daemon_factory(local=False, extra_args=["--salt-config", str(master)])
    write_job(daemon.config_dir, "fleet", job_yaml(
        "unreachable", "echo never", targets="'minion-x,minion-y'", target_type="list"))
    daemon.start()

    def two_runs():
        blocks = [m.groupdict() for m in RESULT_BLOCK.finditer(daemon.log("unreachable"))]
        return len({b["instance"] for b in blocks}) >= 2 and blocks
    blocks = wait_for(two_runs, timeout=30, message="two failed runs")
    assert {b["machine"] for b in blocks} == {"minion-x", "minion-y"}
    assert all(b["code"] == "255" and "cannot be reached" in b["output"] for b in blocks)
    assert "cannot resolve targets" in daemon.output()
