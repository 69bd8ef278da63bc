import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import Daemon, pids_with_marker  # noqa: E402


@pytest.fixture
def daemon_factory(tmp_path):
    """Make real daemons on temp dirs; stop them and everything they launched afterwards."""
    daemons = []

    def make(**kwargs):
        daemon = Daemon(tmp_path, **kwargs)
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        try:
            daemon.stop()
        finally:
            daemon.kill_everything()
        # Wrappers detach into their own sessions: find them by the daemon's port in their
        # environment, and job commands by the test's temp path in their command line.
        for marker in ("127.0.0.1:%d" % daemon.ws_port, str(tmp_path)):
            for pid in pids_with_marker(marker):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
