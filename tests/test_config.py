"""The config directory: YAML files in, validated jobs out, each problem reported once."""

import json
import logging
import os
from textwrap import dedent

import pytest

from saltpeter import config as config_module
from saltpeter.config import ConfigDir, ConfigError, Job, JobError, parse_job
from saltpeter.constants import ALLOW_OVERLAP_PHRASE

CRON = {"min": "*", "hour": "*", "dom": "*", "mon": "*", "dow": "*"}
GOOD_JOB = """\
{name}:
  min: '*/5'
  hour: '*'
  dom: '*'
  mon: '*'
  dow: '*'
  command: echo {name}
"""


def write(directory, name, text):
    """Write a config file and give it a new mtime even on coarse-clock filesystems."""
    path = directory / name
    existed = path.exists()
    before = path.stat().st_mtime_ns if existed else 0
    path.write_text(text)
    if existed and path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))
    return path


def job(**fields):
    return parse_job("job", "group", {**CRON, "command": "true", **fields})


def config_errors(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "saltpeter.config" and r.levelno == logging.ERROR]


# --- one job: every key, aliases and defaults --------------------------------------------

def test_defaults_of_a_minimal_job():
    parsed = job()
    assert parsed == Job(name="job", group="group", min="*", hour="*", dom="*", mon="*",
                         dow="*", command="true",
                         raw={**CRON, "command": "true", "group": "group"})
    assert (parsed.sec, parsed.year, parsed.utc) == ("0", "*", False)
    assert (parsed.user, parsed.cwd, parsed.env) == (None, None, {})
    assert (parsed.targets, parsed.target_type) == ("*", "glob")
    assert (parsed.number_of_targets, parsed.batch_size) == (0, 0)
    assert (parsed.timeout, parsed.soft_timeout) == (0.0, 0.0)
    assert parsed.allow_overlap is False and parsed.use_wrapper is True
    assert parsed.websocket_url is None and parsed.catch_up is False


def test_every_key_is_parsed():
    parsed = parse_job("backup", "nightly", {
        "sec": 30, "min": 5, "hour": "1-3", "dom": "*/2", "mon": "jan,jun", "dow": "1-5",
        "year": 2030, "utc": True, "command": "backup.sh --all", "user": "root",
        "cwd": "/srv", "env": {"A": 1, "B": "two", "C": None, "D": True},
        "targets": "G@role:db", "target_type": "compound", "number_of_targets": 2,
        "batch_size": "3", "timeout": "90.5", "soft_timeout": 60,
        "allow_overlap": ALLOW_OVERLAP_PHRASE, "use_wrapper": False,
        "websocket_url": "wss://sp.example:8889", "catch_up": "yes",
    })
    assert (parsed.sec, parsed.min, parsed.hour, parsed.dom, parsed.mon, parsed.dow,
            parsed.year) == ("30", "5", "1-3", "*/2", "jan,jun", "1-5", "2030")
    assert parsed.utc is True and parsed.command == "backup.sh --all"
    assert (parsed.user, parsed.cwd) == ("root", "/srv")
    assert parsed.env == {"A": "1", "B": "two", "C": "", "D": "True"}
    assert (parsed.targets, parsed.target_type) == ("G@role:db", "compound")
    assert (parsed.number_of_targets, parsed.batch_size) == (2, 3)
    assert (parsed.timeout, parsed.soft_timeout) == (90.5, 60.0)
    assert parsed.allow_overlap is True and parsed.use_wrapper is False
    assert parsed.websocket_url == "wss://sp.example:8889" and parsed.catch_up is True
    assert parsed.raw["group"] == "nightly" and parsed.raw["env"]["A"] == 1
    assert parsed.cron_schedule().fields == ("30", "5", "1-3", "*/2", "jan,jun", "1-5", "2030")


def test_hard_timeout_is_an_alias_of_timeout():
    assert job(hard_timeout=120).timeout == 120.0
    # A legacy file with both: the larger never stops the job earlier than promised.
    assert job(timeout=30, hard_timeout=3600).timeout == 3600.0
    assert job(timeout=0).timeout == 0.0


@pytest.mark.parametrize("value", [
    True, "yes", "I know what I am doing!", "i know what i am doing", 1, None])
def test_allow_overlap_needs_the_exact_phrase(value):
    assert job(allow_overlap=value).allow_overlap is False


def test_targets_list_is_joined_for_list_targeting():
    assert job(targets=["web1", "web2"], target_type="list").targets == "web1,web2"


def test_raw_is_json_serialisable():
    parsed = job(note=__import__("datetime").date(2024, 1, 2), extra={"when": None})
    assert json.loads(json.dumps(parsed.raw))["note"] == "2024-01-02"


def test_jobs_are_equal_when_their_yaml_is_equal_and_hashable():
    assert job(env={"A": "1"}) == job(env={"A": "1"})
    assert job(timeout=1) != job(timeout=2)
    assert hash(job(env={"A": "1"})) == hash(job(env={"A": "1"}))


@pytest.mark.parametrize("fields, message", [
    ({"timeout": "soon"}, "field 'timeout': expected a number of seconds, got 'soon'"),
    ({"hard_timeout": [1]}, "field 'hard_timeout': expected a number of seconds"),
    ({"soft_timeout": -1}, "field 'soft_timeout': expected a number of seconds >= 0"),
    ({"timeout": float("nan")}, "field 'timeout'"),
    ({"target_type": "regex"}, "field 'target_type': expected one of glob, pcre"),
    ({"number_of_targets": -1}, "field 'number_of_targets'"),
    ({"batch_size": 1.5}, "field 'batch_size'"),
    ({"env": ["A=1"]}, "field 'env': expected a mapping"),
    ({"env": {"A=B": 1}}, "field 'env': invalid variable name"),
    ({"utc": "maybe"}, "field 'utc': expected true or false"),
    ({"use_wrapper": "sometimes"}, "field 'use_wrapper'"),
    ({"min": "61"}, "field 'min': invalid cron expression '61'"),
    ({"dow": "mon-xyz"}, "field 'dow'"),
    ({"sec": "*/0"}, "field 'sec'"),
    ({"hour": None}, "field 'hour': missing (required)"),
    ({"command": None}, "field 'command': missing (required)"),
    ({"command": ["ls"]}, "field 'command': expected a non-empty shell command line"),
    ({"targets": ""}, "field 'targets'"),
    ({"user": {"name": "root"}}, "field 'user'"),
    ({"websocket_url": "http://x"}, "field 'websocket_url'"),
])
def test_bad_fields_are_rejected_with_field_and_reason(fields, message):
    data = {**CRON, "command": "true", **fields}
    data = {key: value for key, value in data.items() if value is not None}
    with pytest.raises(JobError) as error:
        parse_job("job", "group", data)
    assert message in str(error.value)


def test_job_must_be_a_mapping():
    with pytest.raises(JobError, match="expected a mapping"):
        parse_job("job", "group", "echo hi")


def test_unknown_keys_are_ignored_and_logged_at_debug(caplog):
    with caplog.at_level(logging.DEBUG, logger="saltpeter.config"):
        parsed = job(wrapper_path="/opt/sp", colour="blue")
    assert parsed.command == "true"
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 1 and "colour, wrapper_path" in debug[0]


# --- the directory -----------------------------------------------------------------------

def test_every_yaml_file_is_a_group(tmp_path):
    write(tmp_path, "backup.yaml", GOOD_JOB.format(name="nightly"))
    write(tmp_path, "web.yaml", GOOD_JOB.format(name="rotate") + GOOD_JOB.format(name="purge"))
    write(tmp_path, ".hidden.yaml", GOOD_JOB.format(name="hidden"))
    write(tmp_path, "web.yaml.tmp", GOOD_JOB.format(name="partial"))
    write(tmp_path, "notes.txt", "not yaml")
    write(tmp_path, "empty.yaml", "")
    (tmp_path / "sub.yaml").mkdir()
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "deep.yaml", GOOD_JOB.format(name="deep"))

    snapshot = ConfigDir(str(tmp_path)).load()
    assert {name: j.group for name, j in snapshot.jobs.items()} == {
        "nightly": "backup", "rotate": "web", "purge": "web"}
    assert snapshot.errors == []
    assert snapshot.maintenance == {"global": False, "machines": []}


def test_bad_files_and_jobs_reported_once_with_file_job_reason(tmp_path, caplog):
    backup = write(tmp_path, "backup.yaml", GOOD_JOB.format(name="fine") + dedent("""\
    nightly:
      min: 0
      hour: 2
      dom: '*'
      mon: '*'
      dow: '*'
      command: backup.sh
      timeout: soon
    """))
    write(tmp_path, "broken.yaml", "job: [unclosed\n")
    write(tmp_path, "cron.yaml", GOOD_JOB.format(name="ok") + dedent("""\
    badcron: {min: '99', hour: '*', dom: '*', mon: '*', dow: '*', command: x}
    notype: {min: 1, hour: 1, dom: 1, mon: 1, dow: 1, command: x, target_type: nope}
    nocommand: {min: 1, hour: 1, dom: 1, mon: 1, dow: 1}
    """))
    write(tmp_path, "list.yaml", "- just\n- a list\n")
    directory = ConfigDir(str(tmp_path))

    with caplog.at_level(logging.ERROR, logger="saltpeter.config"):
        snapshot = directory.load()
    assert sorted(snapshot.jobs) == ["fine", "ok"]
    logged = config_errors(caplog)
    assert ("config: %s: job 'nightly': field 'timeout': expected a number of seconds, "
            "got 'soon'" % backup) in logged
    assert any("broken.yaml: not valid YAML" in m for m in logged)
    assert any("cron.yaml: job 'badcron': field 'min'" in m for m in logged)
    assert any("cron.yaml: job 'notype': field 'target_type'" in m for m in logged)
    assert any("cron.yaml: job 'nocommand': field 'command': missing" in m for m in logged)
    assert any("list.yaml: expected a mapping" in m for m in logged)
    assert len(logged) == 6 == len(snapshot.errors)

    # Nothing changed: nothing re-read, nothing reported again.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="saltpeter.config"):
        assert directory.load() is None
        write(tmp_path, "other.yaml", GOOD_JOB.format(name="other"))
        snapshot = directory.load()
    assert config_errors(caplog) == []
    assert sorted(snapshot.jobs) == ["fine", "ok", "other"]
    assert len(snapshot.errors) == 6  # still current problems

    # The bad file changes and is still bad: reported again, once.
    with caplog.at_level(logging.ERROR, logger="saltpeter.config"):
        write(tmp_path, "backup.yaml", backup.read_text().replace("soon", "later"))
        directory.load()
        directory.load()
    assert [m for m in config_errors(caplog) if "later" in m] == [
        "config: %s: job 'nightly': field 'timeout': expected a number of seconds, "
        "got 'later'" % backup]
    assert len(config_errors(caplog)) == 1

    # Fixed: the job appears and the problem is gone.
    write(tmp_path, "backup.yaml", backup.read_text().replace("later", "60"))
    snapshot = directory.load()
    assert snapshot.jobs["nightly"].timeout == 60.0
    assert not any("backup.yaml" in e for e in snapshot.errors)


def test_unchanged_files_are_not_reparsed(tmp_path, monkeypatch):
    reads = []
    real_read = config_module._read_yaml
    monkeypatch.setattr(config_module, "_read_yaml",
                        lambda path: reads.append(os.path.basename(path)) or real_read(path))
    write(tmp_path, "a.yaml", GOOD_JOB.format(name="a"))
    write(tmp_path, "b.yaml", GOOD_JOB.format(name="b"))
    directory = ConfigDir(str(tmp_path))

    first = directory.load()
    assert sorted(reads) == ["a.yaml", "b.yaml"]
    for _ in range(5):
        assert directory.load() is None
    assert len(reads) == 2

    write(tmp_path, "b.yaml", GOOD_JOB.format(name="b") + "  timeout: 5\n")
    second = directory.load()
    assert sorted(reads) == ["a.yaml", "b.yaml", "b.yaml"]
    assert second.serial > first.serial
    assert second.jobs["a"] is first.jobs["a"]  # same object: the file was not re-read
    assert second.jobs["b"].timeout == 5.0


def test_yaml_is_parsed_only_for_changed_files(tmp_path, monkeypatch):
    write(tmp_path, "a.yaml", GOOD_JOB.format(name="a"))
    directory = ConfigDir(str(tmp_path))
    directory.load()
    calls = []
    real_load = config_module.yaml.load
    monkeypatch.setattr(config_module.yaml, "load",
                        lambda *args, **kwargs: calls.append(1) or real_load(*args, **kwargs))
    assert directory.load() is None
    assert calls == []


def test_deleted_file_removes_its_jobs(tmp_path):
    write(tmp_path, "a.yaml", GOOD_JOB.format(name="a"))
    gone = write(tmp_path, "b.yaml", GOOD_JOB.format(name="b") + "broken: {min: 1}\n")
    directory = ConfigDir(str(tmp_path))
    snapshot = directory.load()
    assert sorted(snapshot.jobs) == ["a", "b"] and len(snapshot.errors) == 1
    gone.unlink()
    snapshot = directory.load()
    assert list(snapshot.jobs) == ["a"]
    assert snapshot.errors == []


def test_duplicate_name_is_reported_naming_both_files_and_later_skipped(tmp_path, caplog):
    first = write(tmp_path, "a.yaml", GOOD_JOB.format(name="dup"))
    directory = ConfigDir(str(tmp_path))
    directory.load()
    # A new file, earlier in name order, repeats the name: the established job stays.
    second = write(tmp_path, "0-new.yaml", GOOD_JOB.format(name="dup").replace(
        "echo dup", "echo imposter") + GOOD_JOB.format(name="other"))
    with caplog.at_level(logging.ERROR, logger="saltpeter.config"):
        snapshot = directory.load()
        write(tmp_path, "z.yaml", GOOD_JOB.format(name="z"))
        directory.load()
    assert snapshot.jobs["dup"].command == "echo dup" and snapshot.jobs["dup"].group == "a"
    assert "other" in snapshot.jobs
    assert config_errors(caplog) == [
        "config: %s: job 'dup': duplicate job name, already defined in %s; skipped"
        % (second, first)]
    assert len(snapshot.errors) == 1

    # The owner goes away: the other definition takes over, no error left.
    first.unlink()
    snapshot = directory.load()
    assert snapshot.jobs["dup"].command == "echo imposter" and snapshot.errors == []


def test_duplicate_on_a_fresh_start_keeps_the_first_file_by_name(tmp_path):
    write(tmp_path, "b.yaml", GOOD_JOB.format(name="dup").replace("echo dup", "echo b"))
    write(tmp_path, "a.yaml", GOOD_JOB.format(name="dup").replace("echo dup", "echo a"))
    snapshot = ConfigDir(str(tmp_path)).load()
    assert snapshot.jobs["dup"].command == "echo a"
    assert "b.yaml: job 'dup': duplicate job name" in snapshot.errors[0]


def test_maintenance_is_merged_over_files(tmp_path):
    write(tmp_path, "a.yaml", dedent("""\
    saltpeter_maintenance:
      global: false
      machines: [web1, web2]
    saltpeter_config: {legacy: ignored}
    """) + GOOD_JOB.format(name="a"))
    write(tmp_path, "b.yaml", dedent("""\
    saltpeter_maintenance:
      global: true
      machines: [web2, db1]
    """))
    directory = ConfigDir(str(tmp_path))
    snapshot = directory.load()
    assert snapshot.maintenance == {"global": True, "machines": ["db1", "web1", "web2"]}
    assert list(snapshot.jobs) == ["a"] and snapshot.errors == []

    write(tmp_path, "b.yaml", "saltpeter_maintenance: {global: false}\n")
    assert directory.load().maintenance == {"global": False, "machines": ["web1", "web2"]}


def test_bad_maintenance_is_reported(tmp_path):
    write(tmp_path, "a.yaml", "saltpeter_maintenance: [web1]\n" + GOOD_JOB.format(name="a"))
    snapshot = ConfigDir(str(tmp_path)).load()
    assert "a.yaml: saltpeter_maintenance: expected a mapping" in snapshot.errors[0]
    assert list(snapshot.jobs) == ["a"]


def test_first_load_always_returns_a_snapshot_then_none(tmp_path):
    directory = ConfigDir(str(tmp_path))
    snapshot = directory.load()
    assert snapshot.jobs == {} and directory.snapshot is snapshot
    assert directory.load() is None


def test_unusable_directory_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="missing"):
        ConfigDir(str(tmp_path / "missing")).load()
    plain_file = tmp_path / "file"
    plain_file.write_text("")
    with pytest.raises(ConfigError, match="not usable"):
        ConfigDir(str(plain_file)).load()


def test_invalid_job_names_are_reported(tmp_path):
    write(tmp_path, "a.yaml", GOOD_JOB.format(name="'../escape'") + GOOD_JOB.format(name="ok"))
    snapshot = ConfigDir(str(tmp_path)).load()
    assert list(snapshot.jobs) == ["ok"]
    assert "invalid job name" in snapshot.errors[0]


def test_jobs_and_snapshots_survive_pickling_for_other_processes(tmp_path):
    import pickle

    write(tmp_path, "a.yaml", GOOD_JOB.format(name="a") + "  env: {A: 1}\n")
    snapshot = ConfigDir(str(tmp_path)).load()
    assert pickle.loads(pickle.dumps(snapshot)) == snapshot
