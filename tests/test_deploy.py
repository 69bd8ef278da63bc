"""The single-file wrapper: it runs with no site-packages (on Python 3.9 too, when this
host has one), streams a job end to end, and is deployed to real minions only when needed."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from saltpeter.deploy import Bundle, WrapperDeployer, build_bundle
from tests.helpers import wait_for
from tests.salt_cluster import DialBackServer, kill_marked_processes
from tests.salt_cluster import salt_cluster_fixture  # noqa: F401  (fixture "salt_cluster")

BOTH = ["minion-a", "minion-b"]


def host_pythons():
    """python3 plus a Python 3.9 of this host (pyenv or PATH), the oldest supported one."""
    found = [shutil.which("python3") or sys.executable]
    pyenv = Path(os.path.expanduser("~/.pyenv/versions"))
    candidates = sorted(str(p / "bin/python3") for p in pyenv.glob("3.9.*"))
    candidates.append(shutil.which("python3.9"))
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", "pass"],
                                        capture_output=True).returncode == 0:
            found.append(candidate)
            break
    return found


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory):
    bundle = build_bundle()
    return bundle, bundle.write(str(tmp_path_factory.mktemp("bundle") / bundle.filename))


@pytest.mark.parametrize("python", host_pythons())
def test_bundle_runs_without_site_packages(bundle_file, python, tmp_path):
    bundle, path = bundle_file
    # -I: no PYTHON* variables, no user site, no script dir on sys.path; -S: no site.
    completed = subprocess.run([python, "-I", "-S", path, "--help"], cwd=str(tmp_path),
                               capture_output=True, text=True, timeout=30)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage: sp-wrapper")
    completed = subprocess.run([python, "-I", "-S", path], cwd=str(tmp_path),
                               env={"PATH": os.environ["PATH"]},
                               capture_output=True, text=True, timeout=30)
    assert completed.returncode == 2
    assert "SP_WEBSOCKET_URL" in completed.stderr


def test_bundle_is_ascii_deterministic_and_versioned_by_its_hash(bundle_file):
    bundle, path = bundle_file
    again = build_bundle()
    assert again.content == bundle.content and again.sha256 == bundle.sha256
    assert bundle.content.isascii()
    assert bundle.filename == "sp-wrapper-%s.py" % bundle.sha256[:12]
    assert set(bundle.modules) >= {"wrapper", "wrapper.protocol", "wrapper.runner",
                                   "wrapper.wsclient"}


def test_bundler_takes_any_package_and_serves_its_modules(tmp_path):
    package = tmp_path / "pkg" / "wrapper"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("NAME = 'w\\u00e9'\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "deep.py").write_text("from .. import NAME\nVALUE = NAME + '!'\n")
    (package / "runner.py").write_text(
        "import sys\nfrom wrapper.sub.deep import VALUE\n\n"
        "def main():\n    print(VALUE, __name__)\n    return 7\n")
    bundle = build_bundle(str(package))
    assert bundle.modules == ("wrapper", "wrapper.runner", "wrapper.sub", "wrapper.sub.deep")
    path = bundle.write(str(tmp_path / bundle.filename))
    completed = subprocess.run([sys.executable, "-I", "-S", path], capture_output=True,
                               text=True, timeout=30, cwd=str(tmp_path))
    assert completed.returncode == 7, completed.stderr
    assert completed.stdout == "w\u00e9! wrapper.runner\n"
    (package / "runner.py").write_text("def main():\n    return 0\n")
    assert build_bundle(str(package)).sha256 != bundle.sha256


def test_bundle_streams_a_job_end_to_end(bundle_file, tmp_path):
    bundle, path = bundle_file
    marker = "spdeploy%s" % uuid.uuid4().hex[:10]
    with DialBackServer() as server:
        env = {"PATH": os.environ["PATH"], "SP_WEBSOCKET_URL": server.url,
               "SP_JOB_NAME": "job", "SP_JOB_INSTANCE": "job_1", "SP_MACHINE_ID": "box",
               "SP_COMMAND": 'echo "hello $GREETING"; echo warn >&2; exit 3',
               "SP_ENV": json.dumps({"GREETING": marker})}
        try:
            completed = subprocess.run([sys.executable, "-I", "-S", path], env=env,
                                       capture_output=True, text=True, timeout=30)
            assert completed.returncode == 0, completed.stderr
            complete = wait_for(lambda: server.messages("complete"), timeout=20,
                                message="complete from the bundled wrapper")[0]
        finally:
            kill_marked_processes(marker)
    assert complete["retcode"] == 3 and complete["machine"] == "box"
    assert [m["type"] for m in server.messages()][:2] == ["connect", "start"]
    assert "hello %s\n" % marker in server.output("box")
    assert "warn" in server.output("box")


def counting(client_factory):
    calls = []

    def client():
        real = client_factory()

        class Counting:
            def cmd(self, *args, **kwargs):
                calls.append(args[1])
                return real.cmd(*args, **kwargs)
        return Counting()
    return client, calls


def test_deploy_copies_once_then_only_when_the_content_changes(salt_cluster, tmp_path):
    wrapper_dir = str(salt_cluster.root / ("deploy-%s" % uuid.uuid4().hex[:6]))
    bundle = build_bundle()
    client, calls = counting(salt_cluster.client)

    first = WrapperDeployer(client, bundle, wrapper_dir=wrapper_dir)
    assert first.ensure(BOTH) == {"minion-a": None, "minion-b": None}
    assert first.copies == 2
    assert calls == ["file.get_hash", "cmd.run_all", "file.get_hash"]
    assert Path(first.remote_path).read_text() == bundle.content

    # Same process: known, no Salt call at all.
    del calls[:]
    assert first.ensure(BOTH) == {"minion-a": None, "minion-b": None}
    assert calls == []

    # A new process (fresh cache): one check, no copy.
    second = WrapperDeployer(client, bundle, wrapper_dir=wrapper_dir)
    assert second.ensure(BOTH) == {"minion-a": None, "minion-b": None}
    assert (second.copies, calls) == (0, ["file.get_hash"])

    # Changed wrapper: a new version is copied next to the old one.
    content = bundle.content + "# changed\n"
    changed = Bundle(content=content, sha256=hashlib.sha256(content.encode()).hexdigest(),
                     modules=bundle.modules)
    third = WrapperDeployer(client, changed, wrapper_dir=wrapper_dir)
    assert third.ensure(BOTH) == {"minion-a": None, "minion-b": None}
    assert third.copies == 2 and third.remote_path != first.remote_path
    assert Path(third.remote_path).read_text() == changed.content

    # The deployed file runs on the minion with site-packages disabled.
    returns = salt_cluster.client().cmd(BOTH, "cmd.run_all", [], tgt_type="list", kwarg={
        "cmd": "python3 -I -S %s --help" % first.remote_path, "python_shell": True})
    for machine in BOTH:
        assert returns[machine]["retcode"] == 0, returns[machine]
        assert returns[machine]["stdout"].startswith("usage: sp-wrapper")


def test_deploy_reports_a_minion_that_cannot_take_the_file(salt_cluster, tmp_path):
    blocker = salt_cluster.root / ("blocker-%s" % uuid.uuid4().hex[:6])
    blocker.write_text("a file where the wrapper directory should be")
    deployer = WrapperDeployer(salt_cluster.client, wrapper_dir=str(blocker / "sub"))
    result = deployer.ensure(BOTH)
    assert set(result) == set(BOTH)
    assert all(reason and "could not copy the wrapper" in reason for reason in result.values())

