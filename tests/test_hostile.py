"""Hostile input against the real daemon's WebSocket server, while an honest job runs.

Oversized frames, floods, garbage, idle and half-open connections, forged tokens and
unknown instances: each bad client gets an error or loses its connection, the server's
memory stays bounded, and the honest job's every line and its exit code land in its log.
"""

import asyncio
import json
import os
import random
import re
import resource
import socket
import struct
import sys
import threading
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from saltpeter.auth import KEY_FILE, instance_token
from saltpeter.wsserver import DEFAULT_MAX_FRAME, FIRST_MESSAGE_TIMEOUT, MAX_BAD_MESSAGES
from tests.helpers import wait_for, write_job
from tests.test_daemon_local import job_yaml, results

HANDSHAKE_TIMEOUT = 10          # the server's open_timeout
IDLE_CONNECTIONS = 2000
HALF_OPEN_CONNECTIONS = 500
FLOODERS = 6
FLOOD_ROUNDS = 40               # connections per flooder, each sent a burst of messages
FLOOD_BURST = 30
RSS_GROWTH_CAP = 150 * 1024 * 1024
HANDSHAKE_REQUEST = (
    "GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@pytest.fixture(autouse=True)
def enough_file_descriptors():
    """Thousands of client sockets in this process: raise the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if wanted < IDLE_CONNECTIONS + HALF_OPEN_CONNECTIONS + 200:
        pytest.skip("open-files hard limit %s is too low for this test" % hard)
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ------------------------------------------------------------------ the honest job

def honest_job(tmp_path, name="honest"):
    """YAML of a job that prints a numbered line every 0.2 s until ``release`` exists (at
    most a minute), then ``released``, and exits 7; and the path of the release file."""
    release = tmp_path / ("%s.release" % name)
    script = tmp_path / ("%s.py" % name)
    script.write_text("import os, sys, time\n"
                      "for i in range(1, 301):\n"
                      "    print('line-%%d' %% i, flush=True)\n"
                      "    if os.path.exists(%r):\n"
                      "        break\n"
                      "    time.sleep(0.2)\n"
                      "print('released')\n"
                      "sys.exit(7)\n" % str(release))
    return job_yaml(name, "%s %s" % (sys.executable, script), timeout=120), release


def running_instance(daemon, job):
    """The first instance of ``job`` once its wrapper is streaming output."""
    def started():
        match = re.search(r"###### Starting (%s_\d+) at" % job, daemon.log(job))
        spool = daemon.state_dir / "spool" / match.group(1) if match else None
        if spool and any(path.stat().st_size for path in spool.glob("*")
                         if "." not in path.name):
            return match.group(1)
        return None
    return wait_for(started, timeout=20, message="the honest job streaming output")


def assert_honest_result(daemon, job, instance, release, min_lines=1):
    """Every numbered line in order, no gap, nothing foreign, and exit code 7."""
    release.touch()
    result = wait_for(lambda: [r for r in results(daemon.log(job)) if r["instance"] == instance],
                      timeout=20, message="the honest job's result")[0]
    assert result["code"] == "7"
    lines = result["output"].splitlines()
    assert lines[-1] == "released"
    assert lines[:-1] == ["line-%d" % i for i in range(1, len(lines))]
    assert len(lines) > min_lines
    return result


# ------------------------------------------------------------------ the server process

def websocket_server_pid(daemon):
    """The daemon's child process that listens on the WebSocket port."""
    port_hex = ":%04X" % daemon.ws_port
    inodes = set()
    with open("/proc/net/tcp") as handle:
        for line in handle.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(port_hex) and fields[3] == "0A":
                inodes.add("socket:[%s]" % fields[9])
    for pid in children_of(daemon.proc.pid):
        try:
            for fd in os.listdir("/proc/%d/fd" % pid):
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) in inodes:
                    return pid
        except OSError:
            continue
    return None


def children_of(parent):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == parent:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def rss_bytes(pid):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples a process's resident memory in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid):
        self.pid = pid
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except OSError:
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------ raw WebSocket bits

def client_frame(opcode, payload, claimed_length=None):
    """One masked client frame; ``claimed_length`` lies about the payload length."""
    length = len(payload) if claimed_length is None else claimed_length
    head = bytes([0x80 | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def raw_connection(port, finish_handshake=True):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = HANDSHAKE_REQUEST % port
    if not finish_handshake:
        writer.write(request[:40].encode())  # a request line and half a header, never more
        return reader, writer
    writer.write(request.encode())
    status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert status.startswith(b"HTTP/1.1 101"), status[:100]
    return reader, writer


async def read_close_code(reader, timeout=10):
    """Read server frames until a close frame; its code (None if the socket just ended)."""
    async def read():
        while True:
            head = await reader.readexactly(2)
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(length)
            if head[0] & 0x0F == 0x8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
    try:
        return await asyncio.wait_for(read(), timeout)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
        return None


async def closed_by_server(reader, timeout):
    """True once the server has closed this socket (EOF or reset)."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
        return True
    except (ConnectionError, OSError):
        return True
    except asyncio.TimeoutError:
        return False


def close_all(writers):
    for writer in writers:
        writer.transport.abort()


# ------------------------------------------------------------------ clients speaking JSON

def seed_message(msg_type, instance, machine, job="honest", **fields):
    """A message exactly as the seed wrapper sends it: no seq, no token."""
    message = {"type": msg_type, "job_name": job, "job_instance": instance,
               "machine": machine, "timestamp": "2024-01-01T00:00:00+00:00"}
    message.update(fields)
    return json.dumps(message)


async def send_and_collect(port, frames, timeout=10):
    """Send ``frames`` on one connection; the server's replies and its close code."""
    replies = []
    async with connect("ws://127.0.0.1:%d" % port, compression=None, max_size=None,
                       open_timeout=10, close_timeout=2) as ws:
        try:
            for frame in frames:
                await ws.send(frame)
            async with asyncio.timeout(timeout):
                async for reply in ws:
                    replies.append(json.loads(reply))
        except ConnectionClosed:
            pass
        await ws.wait_closed()
        return replies, ws.close_code


async def oversized_frame(port, payload_length, claimed_length=None):
    """Send one text frame of ``payload_length`` bytes (its header may claim more) on a
    raw connection; the close code the server answers with."""
    reader, writer = await raw_connection(port)
    frame = client_frame(0x1, b"x" * payload_length, claimed_length)
    try:
        for start in range(0, len(frame), 1 << 20):
            writer.write(frame[start:start + (1 << 20)])
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the server may close while the rest is still on its way
    try:
        return await read_close_code(reader)
    finally:
        close_all([writer])


async def oversized_frames(port, max_frame):
    """A real frame one byte over the limit, and a header alone that claims 2^62 bytes."""
    return list(await asyncio.gather(oversized_frame(port, max_frame + 1),
                                     oversized_frame(port, 0, claimed_length=1 << 62)))


async def flood(port, machine, seed):
    """Burst after burst of bad and unknown-instance messages, each on a new connection.
    Returns (messages sent, error replies received, close codes)."""
    rng = random.Random(seed)
    sent = errors = 0
    codes = []
    bad = ["not json", "[1,2]", '{"type":"output"}', '{"type":5}', "null",
           seed_message("output", "ghost_1", machine, stream="stdin", data="x"),
           seed_message("complete", "ghost_1", machine, retcode="zero")]
    for _ in range(FLOOD_ROUNDS):
        burst = [rng.choice(bad) for _ in range(FLOOD_BURST)]
        if rng.random() < 0.5:  # a valid message for an instance nobody launched
            burst[rng.randrange(FLOOD_BURST)] = seed_message(
                "heartbeat", "ghost_%d" % rng.randrange(10 ** 6), machine, job="ghost")
        replies, code = await send_and_collect(port, burst)
        sent += len(burst)
        errors += sum(1 for reply in replies if reply.get("type") == "error")
        codes.append(code)
    return sent, errors, codes


async def garbage_one_of_each(port):
    """Malformed JSON, wrong types, a binary frame, absurd nesting: MAX_BAD_MESSAGES of them."""
    frames = ["{not json", '"a string"', "[" * 100000, b"\x00\x01binary",
              '{"type":"connect","job_name":1,"job_instance":"i","machine":"m"}',
              '{"type":"connect","job_name":"j","job_instance":"i","machine":"m","seq":"1"}',
              '{"type":"output","job_name":"j","job_instance":"i","machine":"m",'
              '"stream":"stdin","data":"x"}',
              '{"type":"kill","job_name":"j","job_instance":"i","machine":"m"}',
              '{"type":"complete","job_name":"j","job_instance":"i","machine":"m",'
              '"retcode":true}',
              '{"type":"start","job_name":"","job_instance":"i","machine":"m"}']
    assert len(frames) == MAX_BAD_MESSAGES
    return await send_and_collect(port, frames)


async def idle_and_half_open(port):
    """Open idle connections (handshake done, then silence) and half-open ones (handshake
    never finished). Returns (idle writers, half-open readers and writers)."""
    idle = []
    for start in range(0, IDLE_CONNECTIONS, 200):
        idle += await asyncio.gather(*(raw_connection(port)
                                       for _ in range(min(200, IDLE_CONNECTIONS - start))))
    half_open = await asyncio.gather(*(raw_connection(port, finish_handshake=False)
                                       for _ in range(HALF_OPEN_CONNECTIONS)))
    return idle, half_open


async def still_serving(port):
    """Seconds a fresh client takes to get its error reply: the server is responsive."""
    started = time.monotonic()
    replies, code = await send_and_collect(port, ["ping?"] * MAX_BAD_MESSAGES, timeout=5)
    assert code == 1008 and len(replies) == MAX_BAD_MESSAGES
    return time.monotonic() - started


# ------------------------------------------------------------------ the stories

def test_honest_job_survives_oversized_frames_floods_garbage_and_idle_connections(
        daemon_factory, tmp_path):
    daemon = daemon_factory()
    yaml_text, release = honest_job(tmp_path)
    write_job(daemon.config_dir, "demo", yaml_text)
    daemon.start()
    instance = running_instance(daemon, "honest")
    machine = socket.gethostname()
    server_pid = websocket_server_pid(daemon)
    assert server_pid, "the WebSocket server process is found by its listening socket"

    async def attack():
        port = daemon.ws_port
        oversized = asyncio.create_task(oversized_frames(port, DEFAULT_MAX_FRAME))
        floods = asyncio.gather(*(flood(port, machine, seed) for seed in range(FLOODERS)))
        garbage = asyncio.create_task(garbage_one_of_each(port))
        idle, half_open = await idle_and_half_open(port)
        opened = time.monotonic()
        results = {"oversized": await oversized, "floods": await floods,
                   "garbage": await garbage, "responsive": await still_serving(port)}
        dropped = await asyncio.gather(*(closed_by_server(reader, HANDSHAKE_TIMEOUT + 5)
                                         for reader, _ in half_open))
        results["half_open_dropped"] = sum(dropped)
        results["half_open_seconds"] = time.monotonic() - opened
        results["responsive_after"] = await still_serving(port)
        idle_codes = await asyncio.gather(*(
            read_close_code(reader, FIRST_MESSAGE_TIMEOUT + 5 - (time.monotonic() - opened))
            for reader, _ in idle))
        results["idle_closed_1008"] = idle_codes.count(1008)
        results["idle_seconds"] = time.monotonic() - opened
        close_all([writer for _, writer in idle] + [writer for _, writer in half_open])
        return results

    with PeakRss(server_pid) as memory:
        outcome = asyncio.run(attack())
    assert not [r for r in results(daemon.log("honest")) if r["instance"] == instance], \
        "the honest job was still running during the whole attack"

    # (a) oversized frames: that connection closed with 1009 "message too big"
    assert outcome["oversized"] == [1009, 1009]
    # (b) the flood: thousands of messages, every connection answered and closed as bad
    sent = sum(f[0] for f in outcome["floods"])
    assert sent >= FLOODERS * FLOOD_ROUNDS * FLOOD_BURST >= 5000
    assert all(code == 1008 for f in outcome["floods"] for code in f[2])
    assert sum(f[1] for f in outcome["floods"]) >= FLOODERS * FLOOD_ROUNDS
    # (c) garbage of every kind: one error reply each, then closed after MAX_BAD_MESSAGES
    replies, code = outcome["garbage"]
    assert code == 1008
    assert [reply["type"] for reply in replies] == ["error"] * MAX_BAD_MESSAGES
    assert any("binary" in reply["error"] for reply in replies)
    assert any("nested too deeply" in reply["error"] for reply in replies)
    # (d) idle and half-open connections: half-open ones dropped within the handshake
    # timeout, and a fresh client is served promptly all along
    assert outcome["half_open_dropped"] == HALF_OPEN_CONNECTIONS
    assert outcome["half_open_seconds"] < HANDSHAKE_TIMEOUT + 5
    assert outcome["responsive"] < 3 and outcome["responsive_after"] < 3
    # idle ones, which never send a message, are closed once FIRST_MESSAGE_TIMEOUT is up
    assert outcome["idle_closed_1008"] == IDLE_CONNECTIONS
    assert outcome["idle_seconds"] < FIRST_MESSAGE_TIMEOUT + 5
    # (e) memory stays bounded
    assert memory.peak - memory.baseline < RSS_GROWTH_CAP, (memory.baseline, memory.peak)

    assert_honest_result(daemon, "honest", instance, release, min_lines=20)
    output = daemon.output()
    assert "bad message" in output and "unknown job instance" in output
    assert "no accepted message within" in output
    assert "Traceback" not in output
    print("websocket server RSS: baseline %.1f MB, peak %.1f MB; %s"
          % (memory.baseline / 2 ** 20, memory.peak / 2 ** 20,
             {k: v for k, v in outcome.items() if k not in ("floods", "garbage")}))


def test_forged_and_unknown_instance_messages_are_refused_and_change_nothing(
        daemon_factory, tmp_path):
    daemon = daemon_factory()
    yaml_text, release = honest_job(tmp_path)
    write_job(daemon.config_dir, "demo", yaml_text)
    daemon.start()
    instance = running_instance(daemon, "honest")
    machine = socket.gethostname()
    key = (daemon.state_dir / KEY_FILE).read_bytes()
    forged_output = seed_message("output", instance, machine, stream="stdout",
                                 data="FORGED LINE\n")
    forged_complete = seed_message("complete", instance, machine, retcode=0, output="FORGED\n")

    def with_token(frame, token, seq=1):
        message = json.loads(frame)
        message.update(token=token, seq=seq)
        return json.dumps(message)

    async def forge():
        port = daemon.ws_port
        return {
            # the seed's plain messages for the real running instance: no token
            "no_token": await send_and_collect(port, [forged_output, forged_complete]),
            "wrong_token": await send_and_collect(
                port, [with_token(forged_complete, "0" * 64)]),
            # a token that is not even ASCII must be refused like any wrong one
            "non_ascii_token": await send_and_collect(
                port, [with_token(forged_complete, "\u00e9" * 64)]),
            # the genuine token once (on a heartbeat the server already has, so it changes
            # nothing), then a forgery on the same connection: each message is checked
            "wrong_token_after_genuine": await send_and_collect(port, [
                with_token(seed_message("heartbeat", instance, machine),
                           instance_token(key, instance)),
                with_token(forged_complete, "0" * 64, seq=2 ** 40)]),
            # a genuine token, but another instance's: replayed where it does not belong
            "other_token": await send_and_collect(
                port, [with_token(forged_complete, instance_token(key, "honest_1"))]),
            "unknown_instance": await send_and_collect(port, [
                with_token(seed_message("complete", "honest_1", machine, retcode=0),
                           instance_token(key, "honest_1"))]),
            "wrong_job": await send_and_collect(port, [
                with_token(seed_message("complete", instance, machine, job="other", retcode=0),
                           instance_token(key, instance))]),
            "wrong_machine": await send_and_collect(port, [
                with_token(seed_message("complete", instance, "not-" + machine, retcode=0),
                           instance_token(key, instance))]),
        }

    outcome = asyncio.run(forge())
    for name, (replies, code) in outcome.items():
        assert code == 1008, name
        assert [reply["type"] for reply in replies] == ["error"], name
    assert "authentication failed" in outcome["no_token"][0][0]["error"]
    assert "unknown job instance" in outcome["unknown_instance"][0][0]["error"]

    result = assert_honest_result(daemon, "honest", instance, release)
    assert "FORGED" not in result["output"]
    output = daemon.output()
    assert len(re.findall(r"refused \w+ message for instance %s machine %s: missing or invalid "
                          r"token" % (instance, re.escape(machine)), output)) == 5
    assert "Traceback" not in output
    assert "refused complete message for unknown job instance 'honest_1'" in output
    assert "refused complete message for unknown job instance %r machine %r (job 'other')" \
        % (instance, machine) in output
    assert "refused complete message for unknown job instance %r machine %r" \
        % (instance, "not-" + machine) in output


def test_without_wrapper_auth_an_unknown_instance_is_still_refused(daemon_factory, tmp_path):
    daemon = daemon_factory(extra_args=["--no-wrapper-auth"])
    yaml_text, release = honest_job(tmp_path)
    write_job(daemon.config_dir, "demo", yaml_text)
    daemon.start()
    instance = running_instance(daemon, "honest")
    machine = socket.gethostname()
    replies, code = asyncio.run(send_and_collect(daemon.ws_port, [
        seed_message("connect", "honest_1", machine),
        seed_message("complete", "honest_1", machine, retcode=0, output="FORGED\n")]))
    assert code == 1008
    assert len(replies) == 1 and "unknown job instance 'honest_1'" in replies[0]["error"]
    result = assert_honest_result(daemon, "honest", instance, release)
    assert "FORGED" not in result["output"]
    assert "refused connect message for unknown job instance 'honest_1'" in daemon.output()
    assert "(wrapper authentication off)" in daemon.output()
    assert not (daemon.state_dir / "spool" / "honest_1").exists()
