"""What a wrapper sees of the WebSocket server: how its liveness is shown."""

import asyncio

from saltpeter.constants import HEARTBEAT_LOSS_AFTER
from saltpeter.wsserver import WebSocketServer
from wrapper.protocol import wrapper_message

MACHINE = "sim-00000"


class SharedState:
    """The parts of the shared state the WebSocket server writes liveness into."""

    def __init__(self, statedir):
        self.statedir = str(statedir)
        self.liveness = {}


def test_a_silent_wrapper_is_shown_lost_and_back_when_it_reports_again(tmp_path):
    shared = SharedState(tmp_path)
    server = WebSocketServer(shared, "127.0.0.1", 0)
    server.on_command(("register", "demo_1", "demo", [MACHINE]))
    session = server.sessions[("demo_1", MACHINE)]
    heartbeat = wrapper_message("heartbeat", "demo", "demo_1", MACHINE)

    def shown():
        asyncio.run(server._flush_once())
        return shared.liveness["demo_1"][MACHINE]

    server._handle_message(session, heartbeat)
    assert shown() == {"seen": True, "lost": False}
    session.last_seen -= HEARTBEAT_LOSS_AFTER + 1      # as if silent ever since
    assert shown() == {"seen": True, "lost": True}
    server._handle_message(session, heartbeat)
    assert shown() == {"seen": True, "lost": False}
