"""The shared state through a real Manager: a finished machine's output is kept in the
job's final-output file, not in the job's state that every read and write copies whole."""

import multiprocessing
import os
from datetime import datetime, timezone

import pytest

from saltpeter import state
from saltpeter.spool import FINAL_OUTPUT_DIR

STARTED = datetime(2026, 11, 28, 6, 0, tzinfo=timezone.utc)
OUTPUT = "line\n" * 20000          # 100 KB


@pytest.fixture
def shared(tmp_path):
    manager = multiprocessing.Manager()
    yield state.make_shared(manager, str(tmp_path))
    manager.shutdown()


def _run(shared, machines, instance="backup_1"):
    state.init_results(shared, "backup", "nightly", machines, STARTED)
    state.start_instance(shared, "backup", instance, machines, STARTED)


def test_final_output_is_shown_but_not_held_in_the_managers_copy(shared, tmp_path):
    _run(shared, ["web1", "web2"])
    assert state.finish_machine(shared, "backup", "backup_1", "web1", 3, ret=OUTPUT)

    assert shared.state.get("backup")["results"]["web1"]["ret"] == ""
    shown = state.get_job(shared, "backup")["results"]
    assert shown["web1"]["ret"] == OUTPUT and shown["web1"]["retcode"] == 3
    assert shown["web2"]["retcode"] == ""
    assert state.state_snapshot(shared)["backup"]["results"]["web1"]["ret"] == OUTPUT
    summary = state.state_snapshot(shared, with_output=False)["backup"]["results"]
    assert summary["web1"] == dict(shown["web1"], ret="")

    # the next run starts with empty results: the last run's output goes with them
    _run(shared, ["web1"], instance="backup_2")
    assert state.get_job(shared, "backup")["results"]["web1"]["ret"] == ""
    assert state.finish_machine(shared, "backup", "backup_2", "web1", 0, ret="")
    result = state.get_job(shared, "backup")["results"]["web1"]
    assert (result["retcode"], result["ret"]) == (0, "")

    state.remove_job(shared, "backup")
    assert os.listdir(tmp_path / FINAL_OUTPUT_DIR) == []


def test_final_output_stays_in_the_state_when_its_file_cannot_be_written(shared, tmp_path):
    (tmp_path / FINAL_OUTPUT_DIR).write_text("not a directory")
    _run(shared, ["web1"])
    assert state.finish_machine(shared, "backup", "backup_1", "web1", 0, ret=OUTPUT)
    assert shared.state.get("backup")["results"]["web1"]["ret"] == OUTPUT
    assert state.get_job(shared, "backup")["results"]["web1"]["ret"] == OUTPUT


def test_final_outputs_file_skips_a_line_still_being_written(tmp_path):
    from saltpeter.spool import (append_final_outputs, final_output_path,
                                 load_final_outputs)
    append_final_outputs(str(tmp_path), "backup", {"web1": "one\n", "web2": "", "db1": "x"})
    with open(final_output_path(str(tmp_path), "backup"), "ab") as handle:
        handle.write(b'{"machine": "web3", "ret": "half a li')
    assert load_final_outputs(str(tmp_path), "backup") == {"web1": "one\n", "db1": "x"}
    assert load_final_outputs(str(tmp_path), "nothing-ran") == {}
