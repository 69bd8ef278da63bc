"""The spawner's pool of workers forked ahead of need: each fired instance still runs in a
process of its own, prepared before it is due; idle workers end when not needed, and
never outlive the spawner. Real forks, real pipes, and a real daemon for the whole path."""

import os
import queue
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from saltpeter import spawner
from tests.helpers import wait_for, write_job


def _alive(pid):
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout.split()
    return [int(child) for child in out]


def _record_pid(directory):
    """A worker target that writes its pid into ``<directory>/<instance>``."""
    def target(ctx, job, instance):
        with open(os.path.join(directory, instance), "w") as handle:
            handle.write(str(os.getpid()))
    return target


@pytest.fixture
def pool(tmp_path):
    ctx = SimpleNamespace(shared=SimpleNamespace(scheduler_commands=queue.Queue()))
    made = spawner._Pool(ctx, _record_pid(str(tmp_path)), None,
                         os.getpriority(os.PRIO_PROCESS, 0))
    yield made
    made.stop()


def _exits(pool, count):
    found = []
    deadline = time.monotonic() + 10
    while len(found) < count and time.monotonic() < deadline:
        pool.reap(block=False)
        while not pool.ctx.shared.scheduler_commands.empty():
            found.append(pool.ctx.shared.scheduler_commands.get())
        time.sleep(0.02)
    return found


def test_each_instance_runs_in_a_worker_prepared_for_it_and_only_that_one(pool, tmp_path):
    pool.want(3)
    while pool.top_up():
        pass
    prepared = [worker.pid for worker in pool.idle]
    assert len(prepared) == 3 and all(_alive(pid) for pid in prepared)

    for instance in ("a_1", "b_1", "c_1"):
        pool.dispatch(*spawner.assignment("run", None, instance))

    exits = _exits(pool, 3)
    assert sorted(exits) == [("exited", "a_1", 0), ("exited", "b_1", 0), ("exited", "c_1", 0)]
    ran_in = [int((tmp_path / name).read_text()) for name in ("a_1", "b_1", "c_1")]
    assert ran_in == prepared                  # in the order prepared, one process each
    assert not any(_alive(pid) for pid in prepared)
    assert not pool.idle and not pool.busy


def test_an_instance_with_no_idle_worker_gets_a_new_one(pool, tmp_path):
    pool.dispatch(*spawner.assignment("run", None, "lone_1"))
    assert _exits(pool, 1) == [("exited", "lone_1", 0)]
    assert (tmp_path / "lone_1").read_text().isdigit()


def test_an_idle_worker_rehearses_before_its_instance_and_a_failed_rehearsal_is_harmless(
        pool, tmp_path):
    rehearsed = tmp_path / "rehearsed"
    rehearsed.mkdir()

    def rehearse(ctx):
        (rehearsed / str(os.getpid())).touch()
        raise RuntimeError("rehearsal broke")

    pool.rehearse = rehearse
    pool.want(2)
    while pool.top_up():
        pass
    prepared = sorted(worker.pid for worker in pool.idle)
    wait_for(lambda: sorted(int(name) for name in os.listdir(rehearsed)) == prepared,
             timeout=10, message="both idle workers rehearsed while idle")

    pool.dispatch(*spawner.assignment("run", None, "after_1"))
    assert _exits(pool, 1) == [("exited", "after_1", 0)]
    assert int((tmp_path / "after_1").read_text()) in prepared


def test_idle_workers_beyond_what_is_due_end_after_lingering(pool, monkeypatch):
    pool.want(5)
    while pool.top_up():
        pass
    pids = [worker.pid for worker in pool.idle]
    assert len(pids) == 5

    pool.want(0)                                # nothing due soon: back to the minimum
    pool.trim()
    assert len(pool.idle) == 5                  # not before IDLE_LINGER
    monkeypatch.setattr(spawner, "IDLE_LINGER", 0.0)
    pool.trim()
    assert len(pool.idle) == spawner.MIN_IDLE_WORKERS
    kept = {worker.pid for worker in pool.idle}
    ended = [pid for pid in pids if pid not in kept]
    wait_for(lambda: (pool.reap(block=False), not any(_alive(pid) for pid in ended))[1],
             timeout=10, message="trimmed workers gone")
    assert pool.ctx.shared.scheduler_commands.empty()     # idle ones report nothing
    assert all(_alive(pid) for pid in kept)


def test_stop_ends_idle_and_busy_workers(pool, tmp_path):
    pool.targets["run"] = lambda ctx, job, instance: time.sleep(60)
    pool.want(4)
    while pool.top_up():
        pass
    pool.dispatch(*spawner.assignment("run", None, "slow_1"))
    pids = [worker.pid for worker in pool.idle] + list(pool.busy)
    assert len(pids) == 4
    pool.stop()
    assert not any(_alive(pid) for pid in pids)


def _once_at(moment):
    moment = moment.astimezone(timezone.utc)
    return ("  sec: '%d'\n  min: '%d'\n  hour: '%d'\n  dom: '%d'\n  mon: '%d'\n"
            "  dow: '*'\n  utc: true\n" % (moment.second, moment.minute, moment.hour,
                                           moment.day, moment.month))


def _spawner_pid(daemon):
    """The spawner is main's only child with children of its own (its idle workers)."""
    with_children = [pid for pid in _children(daemon.proc.pid) if _children(pid)]
    assert len(with_children) == 1, with_children
    return with_children[0]


def test_daemon_prepares_workers_before_a_burst_and_every_instance_runs(daemon_factory):
    count = 30
    daemon = daemon_factory()
    daemon.start()
    due = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=6)
    fields = _once_at(due)
    write_job(daemon.config_dir, "burst", "".join(
        "burst%02d:\n%s  command: 'echo ran-%02d'\n" % (i, fields, i) for i in range(count)))

    spawner_pid = wait_for(lambda: _spawner_pid(daemon), message="spawner")
    wait_for(lambda: len(_children(spawner_pid)) >= count, timeout=4,
             message="%d idle workers ready before the burst" % count)
    assert datetime.now(timezone.utc) < due, "the workers were ready only after the burst"
    # Each job's log file is made ahead, empty; the idle workers rehearsed an instance's
    # start, writing nothing anyone reads.
    wait_for(lambda: sorted(os.listdir(daemon.log_dir)) == ["burst%02d.log" % i
                                                            for i in range(count)],
             timeout=2, message="log files made ahead")
    assert all((daemon.log_dir / name).stat().st_size == 0
               for name in os.listdir(daemon.log_dir))
    assert not (daemon.state_dir / "history.jsonl").exists()

    stamp = int(due.timestamp())
    for i in range(count):
        name = "burst%02d" % i
        wait_for(lambda: "###### Finished %s_%d at " % (name, stamp) in daemon.log(name),
                 timeout=30, message="%s finished" % name)
        text = daemon.log(name)
        assert "**** Exit Code 0 ******\nran-%02d\n" % i in text
        assert text.count("###### Starting %s_%d at " % (name, stamp)) == 1
    assert " worker exited with " not in daemon.output()
    assert "rehearsal failed" not in daemon.output()


def test_idle_workers_do_not_outlive_a_killed_spawner(daemon_factory, tmp_path):
    daemon = daemon_factory()
    daemon.start()
    old_spawner = wait_for(lambda: _spawner_pid(daemon), message="spawner")
    idle = wait_for(lambda: len(_children(old_spawner)) >= spawner.MIN_IDLE_WORKERS
                    and _children(old_spawner), message="idle workers")

    os.kill(old_spawner, signal.SIGKILL)
    wait_for(lambda: not any(_alive(pid) for pid in idle), timeout=10,
             message="idle workers of the killed spawner gone")

    # The daemon starts a new spawner, and jobs run through it.
    new_spawner = wait_for(lambda: _spawner_pid(daemon) != old_spawner and _spawner_pid(daemon),
                           timeout=10, message="new spawner")
    assert new_spawner != old_spawner
    write_job(daemon.config_dir, "after", "after:\n  sec: '*'\n  min: '*'\n  hour: '*'\n"
              "  dom: '*'\n  mon: '*'\n  dow: '*'\n  command: 'echo still-runs'\n")
    wait_for(lambda: "still-runs" in daemon.log("after"), timeout=20, message="job ran")


def test_no_idle_worker_waits_for_a_job_the_overlap_rule_will_skip(daemon_factory):
    """Five every-second jobs that run for a minute: each has one instance running and
    every later fire is skipped as an overlap, so the spawner keeps only its minimum of
    idle workers, not one per job."""
    count = 5
    daemon = daemon_factory()
    write_job(daemon.config_dir, "long", "".join(
        "long%d:\n  sec: '*'\n  min: '*'\n  hour: '*'\n  dom: '*'\n  mon: '*'\n  dow: '*'\n"
        "  command: 'sleep 60'\n" % i for i in range(count)))
    daemon.start()
    for i in range(count):
        wait_for(lambda: "overlap" in daemon.log("long%d" % i).lower(), timeout=20,
                 message="long%d skipped as an overlap" % i)
    spawner_pid = wait_for(lambda: _spawner_pid(daemon), message="spawner")
    expected = count + spawner.MIN_IDLE_WORKERS          # busy workers + the minimum
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:                     # watched over 3 fire times
        assert len(_children(spawner_pid)) <= expected
        time.sleep(0.1)
    assert len(_children(spawner_pid)) == expected


def test_a_command_put_by_a_worker_just_before_it_exits_arrives():
    """Workers end with os._exit; what they put on ws_commands must already be written
    (a multiprocessing.Queue leaves it to a feeder thread, which os._exit can cut off)."""
    from saltpeter.state import CommandPipe
    commands = CommandPipe()
    pids = []
    for number in range(20):
        pid = os.fork()
        if pid == 0:
            commands.put(("forget", "instance_%d" % number))
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    got = sorted(commands.get(timeout=5)[1] for _ in pids)
    assert got == sorted("instance_%d" % number for number in range(20))
