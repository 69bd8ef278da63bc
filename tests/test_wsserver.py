"""What a wrapper sees of the WebSocket server: which messages are acknowledged when, and
how its liveness is shown.

The acks are watched on a hand-driven wrapper: the daemon runs with the benchmarks'
simulated executor, whose ``mode=none`` launches nothing for the job's machine, so this
test speaks for that machine itself, with the instance's real token.
"""

import asyncio
import json
import re

from websockets.asyncio.client import connect

from bench.common import next_whole_second, once_at, write_jobs
from saltpeter.auth import KEY_FILE, instance_token
from saltpeter.constants import HEARTBEAT_LOSS_AFTER
from saltpeter.wsserver import ACK_DELAY, ACK_DELAYS, HEARTBEAT_ACK_DELAY, WebSocketServer
from tests.helpers import wait_for
from tests.test_daemon_local import results
from wrapper.protocol import encode, wrapper_message
from wrapper.runner import HEARTBEAT_INTERVAL

MACHINE = "sim-00000"
QUIET = 1.5      # seconds in which an ack that is not due must not come


def hand_driven_instance(daemon_factory):
    """A daemon whose job ``demo`` has fired for one machine that no wrapper reports for;
    the daemon, the instance and its token."""
    daemon = daemon_factory(local=False,
                            env={"SALTPETER_TEST_EXECUTOR": "bench.simexec:SimExecutor"})
    daemon.start()
    fire_time = next_whole_second(1)
    write_jobs(daemon.config_dir, "demo", {
        "demo": dict(once_at(fire_time), targets="sim:1", command="mode=none")})
    instance = "demo_%d" % int(fire_time.timestamp())
    wait_for(lambda: re.search(r"###### Starting %s at" % instance, daemon.log("demo")),
             timeout=20, message="the instance started")
    key = (daemon.state_dir / KEY_FILE).read_bytes()
    return daemon, instance, instance_token(key, instance)


def test_output_and_the_end_are_acked_promptly_heartbeats_only_rarely(daemon_factory):
    daemon, instance, token = hand_driven_instance(daemon_factory)

    def frame(msg_type, seq, **fields):
        return encode(wrapper_message(msg_type, "demo", instance, MACHINE, seq=seq,
                                      token=token, **fields))

    async def wrapper():
        acks = []
        async with connect("ws://127.0.0.1:%d" % daemon.ws_port, compression=None) as ws:
            async def acked(seq, within):
                """The first ack covering ``seq`` within ``within`` seconds, else None."""
                try:
                    async with asyncio.timeout(within):
                        while True:
                            reply = json.loads(await ws.recv())
                            assert reply["type"] == "ack", reply
                            if reply["ack"] >= seq:
                                return reply["ack"]
                except TimeoutError:
                    return None

            await ws.send(frame("connect", 1))
            await ws.send(frame("start", 2, pid=4242))
            acks.append(await acked(2, 5))
            for seq in (3, 4, 5):
                await ws.send(frame("heartbeat", seq))
            acks.append(await acked(3, QUIET))
            await ws.send(frame("output", 6, stream="stdout", data="hello\n"))
            acks.append(await acked(6, 5))
            await ws.send(frame("complete", 7, retcode=0, output=""))
            acks.append(await acked(7, 5))
        return acks

    # heartbeats alone wait for their ack (up to HEARTBEAT_ACK_DELAY); the output's ack
    # covers them; complete is acked at once, so the wrapper can exit
    assert HEARTBEAT_ACK_DELAY > QUIET
    assert asyncio.run(wrapper()) == [2, None, 6, 7]
    result = wait_for(lambda: results(daemon.log("demo")), timeout=20,
                      message="the machine's result in the job log")[0]
    assert result["code"] == "0"
    assert result["output"].strip() == "hello"


def test_a_heartbeat_ack_is_due_in_five_minutes_and_other_messages_bring_it_forward():
    """What the test above cannot wait for: when a heartbeat's ack is due. A wrapper
    heartbeats every 5 s, so 5 minutes means at most 60 heartbeats kept unacked."""
    async def due_after(*message_types):
        loop = asyncio.get_running_loop()
        ack_state = {"handle": None, "due": 0.0}
        server = object.__new__(WebSocketServer)      # only its ack timer is used here
        for message_type in message_types:
            server._schedule_ack(None, None, ack_state,
                                 ACK_DELAYS.get(message_type, ACK_DELAY))
        ack_state["handle"].cancel()
        return ack_state["due"] - loop.time()

    assert HEARTBEAT_ACK_DELAY == 300 == 60 * HEARTBEAT_INTERVAL
    assert 299 < asyncio.run(due_after("heartbeat", "heartbeat")) <= 300
    assert 0 < asyncio.run(due_after("heartbeat", "output", "heartbeat")) <= ACK_DELAY
    assert asyncio.run(due_after("heartbeat", "output", "complete")) <= 0


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
