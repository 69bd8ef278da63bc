"""SaltExecutor against a real salt-master with minion-a and minion-b on 127.0.0.1."""

import os
import threading
import time
import types
import uuid

import pytest

from saltpeter.constants import RETCODE_KILLED, RETCODE_NO_RESPONSE
from saltpeter.executors import ExecutorError
from tests.helpers import wait_for
from tests.salt_cluster import DialBackServer, kill_marked_processes
from tests.salt_cluster import salt_cluster_fixture  # noqa: F401  (fixture "salt_cluster")

BOTH = ["minion-a", "minion-b"]


def make_job(**fields):
    values = dict(name="job", group="g", targets="*", target_type="glob", command="true",
                  cwd=None, user=None, env={}, number_of_targets=0)
    values.update(fields)
    return types.SimpleNamespace(**values)


@pytest.fixture
def executor(salt_cluster):
    from saltpeter.executors.salt import SaltExecutor
    return SaltExecutor(salt_cluster.master_config, {
        "wrapper_dir": str(salt_cluster.root / "wrapper"),
        "ping_timeout": 3, "gather_job_timeout": 2, "legacy_poll_timeout": 5})


@pytest.fixture
def marker():
    """A unique string for one test's commands; whatever holds it is killed afterwards."""
    value = "spmark%s" % uuid.uuid4().hex[:12]
    yield value
    kill_marked_processes(value)


def cmdlines_containing(text):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as handle:
                    if text.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("targets, target_type, expected", [
    ("*", "glob", BOTH),
    ("minion-a", "glob", ["minion-a"]),
    ("minion-a,minion-b", "list", BOTH),
    (["minion-b"], "list", ["minion-b"]),
    ("minion-[ab]$", "pcre", BOTH),
    ("sp_role:alpha", "grain", ["minion-a"]),
    ("sp_role:b.*", "grain_pcre", ["minion-b"]),
    ("G@sp_role:beta or minion-a", "compound", BOTH),
    ("127.0.0.0/8", "ipcidr", BOTH),
    ("nobody-*", "glob", []),
])
def test_resolve_targets_by_type(executor, targets, target_type, expected):
    responding, silent = executor.resolve_targets(make_job(targets=targets,
                                                           target_type=target_type))
    assert (responding, silent) == (expected, [])


def test_unknown_target_type_is_an_executor_error(executor):
    with pytest.raises(ExecutorError, match="unknown target_type"):
        executor.resolve_targets(make_job(target_type="bogus"))


def test_unreachable_master_is_a_clear_executor_error(tmp_path, salt_cluster):
    from saltpeter.executors.salt import SaltExecutor
    config = tmp_path / "master"
    config.write_text("root_dir: %s\ninterface: 127.0.0.1\npublish_port: 1\nret_port: 2\n"
                      % tmp_path)
    with pytest.raises(ExecutorError, match="cannot be reached"):
        SaltExecutor(str(config), {}).resolve_targets(make_job())
    with pytest.raises(ExecutorError, match="does not exist"):
        SaltExecutor(str(tmp_path / "missing"), {}).resolve_targets(make_job())


def test_launch_returns_at_once_and_wrappers_dial_back_with_minion_ids(executor, marker):
    secret = "%s-secret" % marker
    command = "echo started-%s; sleep 60" % marker
    with DialBackServer() as server:
        env = {"SP_WEBSOCKET_URL": server.url, "SP_JOB_NAME": "job",
               "SP_JOB_INSTANCE": "job_1", "SP_COMMAND": command,
               "SP_ENV": '{"SP_TEST_SECRET": "%s"}' % secret}
        started = time.monotonic()
        assert executor.launch(make_job(command=command), "job_1", BOTH, env) == \
            {"minion-a": None, "minion-b": None}
        assert time.monotonic() - started < 15
        wait_for(lambda: server.machines("start") == BOTH, timeout=20,
                 message="both wrappers started the command")
        wait_for(lambda: all("started-%s" % marker in server.output(m) for m in BOTH),
                 timeout=10, message="output from both minions")
        # The command and the env values travel in environments, never in argv.
        assert cmdlines_containing(marker) == []
        for machine in BOTH:
            server.kill(machine)
        wait_for(lambda: sorted(m["machine"] for m in server.messages("complete")) == BOTH,
                 timeout=20, message="complete after kill")
        assert {m["retcode"] for m in server.messages("complete")} == {RETCODE_KILLED}


def test_launch_reports_a_failing_wrapper_per_machine(salt_cluster, marker):
    from saltpeter.executors.salt import SaltExecutor
    executor = SaltExecutor(salt_cluster.master_config, {
        "wrapper_dir": str(salt_cluster.root / "wrapper"),
        "wrapper_python": "/nonexistent/python3"})
    result = executor.launch(make_job(), "job_2", BOTH, {"SP_COMMAND": "true"})
    assert set(result) == set(BOTH)
    assert all(reason and "wrapper exited with" in reason for reason in result.values())


def test_legacy_run_returns_output_and_exit_code_per_minion(executor, tmp_path):
    results = {}
    job = make_job(command='echo "out $SP_LEGACY_VALUE in $(pwd)"; echo oops >&2; exit 3',
                   env={"SP_LEGACY_VALUE": "v=1"}, cwd=str(tmp_path))
    executor.run_legacy(job, "job_3", BOTH,
                        lambda machine, retcode, output: results.update(
                            {machine: (retcode, output)}))
    expected_output = "out v=1 in %s\noops" % tmp_path
    assert results == {"minion-a": (3, expected_output), "minion-b": (3, expected_output)}


def test_kill_legacy_stops_a_long_legacy_job(executor, marker):
    results = {}
    job = make_job(command="sleep 300; echo %s" % marker)
    runner = threading.Thread(target=executor.run_legacy, daemon=True, args=(
        job, "job_4", BOTH, lambda m, code, out: results.update({m: (code, out)})))
    runner.start()
    wait_for(lambda: len(cmdlines_containing(marker)) >= 2, timeout=15,
             message="the legacy command running on both minions")
    wait_for(lambda: executor.legacy_jid("job_4"), timeout=5, message="the jid")
    started = time.monotonic()
    executor.kill_legacy("job_4", BOTH)
    runner.join(30)
    assert not runner.is_alive()
    assert time.monotonic() - started < 15
    assert {m: code for m, (code, _) in results.items()} == {m: RETCODE_KILLED for m in BOTH}
    wait_for(lambda: cmdlines_containing(marker) == [], timeout=10,
             message="the legacy commands gone")


def test_number_of_targets_picks_among_responding(executor):
    picked = executor.number_of_targets(make_job(number_of_targets=1))
    assert len(picked) == 1 and picked[0] in BOTH


def test_stopped_minion_does_not_respond_while_the_other_does(salt_cluster, executor):
    salt_cluster.stop_minion("minion-b")
    try:
        responding, silent = executor.resolve_targets(make_job(targets="minion-*"))
        assert (responding, silent) == (["minion-a"], ["minion-b"])
        results = {}
        executor.run_legacy(make_job(command="echo hi"), "job_5", BOTH,
                            lambda m, code, out: results.update({m: (code, out)}))
        assert results == {"minion-a": (0, "hi"),
                           "minion-b": (RETCODE_NO_RESPONSE, "Target did not respond")}
    finally:
        salt_cluster.start_minion("minion-b")
    assert executor.resolve_targets(make_job()) == (BOTH, [])
