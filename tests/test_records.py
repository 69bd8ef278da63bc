"""The on-disk record of a running instance: written when it changes, and only then."""

import json
import os
from datetime import datetime, timezone
from types import SimpleNamespace

from saltpeter.records import load_instances
from saltpeter.run import InstanceRecord


def _record(tmp_path, data=None):
    ctx = SimpleNamespace(shared=SimpleNamespace(statedir=str(tmp_path)), legacy=False)
    job = SimpleNamespace(name="backup", group="ops", raw={"command": "true"},
                          use_wrapper=True)
    return InstanceRecord(ctx, job, "backup_1", datetime(2026, 11, 28, tzinfo=timezone.utc),
                          data)


def _inode(tmp_path):
    return os.stat(tmp_path / "instances" / "backup_1.json").st_ino


def test_a_save_that_changes_nothing_writes_nothing(tmp_path):
    record = _record(tmp_path)
    record.save()
    first = _inode(tmp_path)

    record.save(targets=[], todo=[])            # no targets: the record is as it was
    assert _inode(tmp_path) == first            # every write is a new file, renamed over

    record.save(targets=["web1"], todo=["web1"])
    assert _inode(tmp_path) != first
    [loaded] = load_instances(str(tmp_path))
    assert loaded["targets"] == ["web1"] and loaded["todo"] == ["web1"]


def test_an_adopted_record_is_on_disk_already(tmp_path):
    record = _record(tmp_path)
    record.save(targets=["web1"], todo=["web1"])
    adopted = _record(tmp_path, json.loads(
        (tmp_path / "instances" / "backup_1.json").read_text()))
    before = _inode(tmp_path)
    adopted.save(todo=["web1"])
    assert _inode(tmp_path) == before
    adopted.save(todo=[])
    assert load_instances(str(tmp_path))[0]["todo"] == []


def test_a_failed_write_is_tried_again_on_the_next_save(tmp_path):
    record = _record(tmp_path)
    (tmp_path / "instances").write_text("not a directory")
    record.save()                                 # logged, not raised
    (tmp_path / "instances").unlink()
    record.save(targets=[], todo=[])              # unchanged, but never written: written now
    assert load_instances(str(tmp_path))[0]["instance"] == "backup_1"
