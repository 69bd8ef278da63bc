"""The built-in web UI in a real headless Chromium against the real daemon's API port.

Chromium renders the page, runs its JavaScript (WebSocket to ``/ws``, fetch of ``/jobs``)
and dumps the resulting DOM; the test looks for what a person would see.
Needs Debian's ``chromium`` package at ``/usr/bin/chromium``.
"""

import html
import json
import os
import shutil
import subprocess

import pytest
from websockets.sync.client import connect

from tests.helpers import pids_with_marker, wait_for, write_job

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
RENDER_BUDGET_MS = 3000
RENDER_TIMEOUT = 60

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM),
                                reason="%s not installed (apt-get install chromium)" % CHROMIUM)

SLEEP_MARKER = "%d.%06d" % (300 + os.getpid() % 100, os.getpid())  # findable in ps
NEVER = {"sec": "0", "min": "0", "hour": "0", "dom": "1", "mon": "1", "dow": "*",
         "year": "2099"}


def rendered_dom(url, profile_dir):
    """The DOM of ``url`` after its scripts ran for ``RENDER_BUDGET_MS`` of page time."""
    completed = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--user-data-dir=%s" % profile_dir,
         "--virtual-time-budget=%d" % RENDER_BUDGET_MS, "--dump-dom", url],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=RENDER_TIMEOUT,
        check=False)
    return html.unescape(completed.stdout.decode("utf-8", "replace"))


def test_job_list_and_live_output_of_a_running_job(daemon_factory, tmp_path):
    daemon = daemon_factory(api=True)
    jobs = {
        "nightly_backup": dict(NEVER, command="echo backup"),
        "streamer": dict(NEVER, command="echo browserline1; echo browserline2; "
                                        "sleep %s" % SLEEP_MARKER),
    }
    write_job(daemon.config_dir, "demo", json.dumps(jobs))
    daemon.start()
    wait_for(lambda: set(jobs) <= set(daemon.http_get("/config")["crons"]),
             message="jobs in config")
    base = "http://127.0.0.1:%d" % daemon.api_port
    profile = tmp_path / "chromium-profile"

    page = wait_for(lambda: (dom := rendered_dom(base + "/", profile))
                    and 'data-job="streamer"' in dom and dom,
                    timeout=90, interval=0.5, message="job list rendered")
    assert "nightly_backup" in page and "echo backup" in page

    with connect("ws://127.0.0.1:%d/ws" % daemon.api_port) as conn:
        conn.send(json.dumps({"run": "streamer"}))
    wait_for(lambda: "browserline2" in json.dumps(daemon.http_get("/status")["state"]),
             timeout=30, message="job output in state")

    details = wait_for(lambda: (dom := rendered_dom(base + "/details/streamer", profile))
                       and "browserline2" in dom and dom,
                       timeout=90, interval=0.5, message="live output rendered")
    assert "browserline1\nbrowserline2" in details
    assert "running" in details and "Kill" in details

    page = wait_for(lambda: (dom := rendered_dom(base + "/", profile))
                    and ">running<" in dom and dom,
                    timeout=90, interval=0.5, message="running job shown in the list")
    assert "nightly_backup" in page

    status, _ = daemon.http_post("/kill", {"job": "streamer"})
    assert status == 200
    wait_for(lambda: not pids_with_marker(SLEEP_MARKER), timeout=20,
             message="the killed job left no process")
