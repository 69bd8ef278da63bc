"""Load generator: many simulated wrappers in one asyncio process.

Each simulated wrapper dials the server, sends ``connect`` and ``start``, then
``heartbeat`` every ``--heartbeat`` seconds (first one at a random phase, so a fleet
spreads out), optional ``output`` (``--lines-per-sec`` ordinary lines of ``--line-bytes``,
batched into frames of up to ``--batch-bytes``; or ``--output-bytes`` as fast as the
server takes them), and ``complete`` after ``--hold`` seconds or when its output is sent.

``--protocol seed`` sends exactly the seed's messages (so any compatible server can be
the target); ``extended`` adds ``seq`` and the per-instance ``token`` (from the
``SP_TOKEN`` environment variable, or computed from ``--key-file``, the daemon's key).

A JSON report (counts, connect times, send times of the last ``complete``) is written to
``--report``. The process stops by itself: every wrapper ends after ``--hold`` or its
output, and the whole run is capped by ``--max-seconds``.
"""

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import random
import sys
import time
from datetime import datetime, timezone

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


class Stats:
    def __init__(self):
        self.attempted = 0
        self.connected = 0
        self.refused = 0          # failed to connect, or closed by the server with 1008
        self.errors = {}
        self.first_attempt = None
        self.last_connected = None
        self.connect_seconds = []
        self.completes = 0
        self.last_complete = None
        self.first_output = None
        self.bytes_sent = 0
        self.messages = 0

    def error(self, text: str) -> None:
        self.errors[text] = self.errors.get(text, 0) + 1


class SimWrapper:
    def __init__(self, args, machine: str, token, stats: Stats):
        self.args = args
        self.machine = machine
        self.token = token
        self.stats = stats
        self.seq = 0
        self.acked = 0

    def message(self, kind: str, **fields) -> str:
        body = {"type": kind, "job_name": self.args.job, "job_instance": self.args.instance,
                "machine": self.machine, "timestamp": utc_now()}
        body.update(fields)
        if self.args.protocol == "extended":
            self.seq += 1
            body["seq"] = self.seq
            if self.token:
                body["token"] = self.token
        return json.dumps(body, separators=(",", ":"))

    async def send(self, ws, kind: str, **fields) -> None:
        frame = self.message(kind, **fields)
        await ws.send(frame)
        self.stats.messages += 1
        self.stats.bytes_sent += len(fields.get("data", ""))

    async def read_replies(self, ws) -> None:
        """Drain what the server sends (acks, kill); a kill ends the wrapper."""
        try:
            async for frame in ws:
                reply = json.loads(frame)
                if reply.get("type") == "ack":
                    self.acked = max(self.acked, reply.get("ack") or 0)
                elif reply.get("type") == "kill":
                    self.killed = True
                elif reply.get("type") == "error":
                    self.stats.error("server error: %s" % str(reply.get("error"))[:80])
        except ConnectionClosed:
            pass

    async def run(self, gate: asyncio.Semaphore) -> None:
        args, stats = self.args, self.stats
        self.killed = False
        async with gate:
            stats.attempted += 1
            started = time.time()
            if stats.first_attempt is None:
                stats.first_attempt = started
            try:
                ws = await connect(args.url, compression=None, ping_interval=None,
                                   open_timeout=args.open_timeout, max_size=None,
                                   close_timeout=2)
            except (OSError, asyncio.TimeoutError, InvalidStatus) as exc:
                stats.refused += 1
                stats.error("connect: %s" % type(exc).__name__)
                return
            connected = time.time()
            stats.connected += 1
            stats.last_connected = connected
            stats.connect_seconds.append(connected - started)
        reader = asyncio.ensure_future(self.read_replies(ws))
        try:
            await self.send(ws, "connect")
            await self.send(ws, "start", pid=os.getpid())
            await self.work(ws)
            await self.send(ws, "complete", retcode=0, output="")
            stats.completes += 1
            stats.last_complete = time.time()
            if args.protocol == "extended":
                deadline = time.monotonic() + 5
                while self.acked < self.seq and time.monotonic() < deadline and not reader.done():
                    await asyncio.sleep(0.05)
            await ws.close()
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 1008:
                stats.refused += 1
            stats.error("closed: %s" % (exc.rcvd.code if exc.rcvd else "no close frame"))
        finally:
            reader.cancel()

    async def work(self, ws) -> None:
        args = self.args
        loop_end = time.monotonic() + args.hold
        next_heartbeat = time.monotonic() + random.uniform(0, args.heartbeat)
        line = ("x" * (args.line_bytes - 1)) + "\n"
        if args.output_bytes:
            lines_per_frame = max(1, args.batch_bytes // args.line_bytes)
            frame_data = line * lines_per_frame
            left = args.output_bytes
            if self.stats.first_output is None:
                self.stats.first_output = time.time()
            while left > 0 and not self.killed:
                chunk = frame_data if left >= len(frame_data) else frame_data[:left]
                await self.send(ws, "output", stream="stdout", data=chunk)
                left -= len(chunk)
                if time.monotonic() >= next_heartbeat:
                    await self.send(ws, "heartbeat")
                    next_heartbeat += args.heartbeat
            return
        # a steady rate: lines batched per frame, at most one frame per ``batch_interval``
        pending_lines = 0.0
        last = time.monotonic()
        while not self.killed:
            now = time.monotonic()
            if now >= loop_end:
                return
            if args.lines_per_sec:
                pending_lines += (now - last) * args.lines_per_sec
                last = now
                whole = int(pending_lines)
                if whole:
                    pending_lines -= whole
                    await self.send(ws, "output", stream="stdout", data=line * whole)
            if now >= next_heartbeat:
                await self.send(ws, "heartbeat")
                next_heartbeat += args.heartbeat
            wait = next_heartbeat - time.monotonic()
            if args.lines_per_sec:
                wait = min(wait, args.batch_interval)
            await asyncio.sleep(max(0.0, min(wait, loop_end - time.monotonic())))


def machine_names(args):
    if args.machine_list:
        with open(args.machine_list) as handle:
            return [line.strip() for line in handle if line.strip()]
    return ["%s%05d" % (args.machine_prefix, i)
            for i in range(args.first, args.first + args.count)]


def token_for(args):
    if os.environ.get("SP_TOKEN"):
        return os.environ["SP_TOKEN"]
    if args.key_file:
        with open(args.key_file, "rb") as handle:
            key = handle.read()
        return hmac.new(key, args.instance.encode(), hashlib.sha256).hexdigest()
    return None


async def main_async(args) -> Stats:
    stats = Stats()
    token = token_for(args) if args.protocol == "extended" else None
    gate = asyncio.Semaphore(args.connect_concurrency)
    wrappers = [SimWrapper(args, machine, token, stats) for machine in machine_names(args)]
    tasks = [asyncio.ensure_future(w.run(gate)) for w in wrappers]
    done, pending = await asyncio.wait(tasks, timeout=args.max_seconds)
    for task in pending:
        task.cancel()
    if pending:
        stats.error("still running at --max-seconds: %d" % len(pending))
        await asyncio.wait(pending, timeout=5)
    for task in done:
        if task.exception() is not None:
            stats.error("crash: %r" % task.exception())
    return stats


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--job", default="fleet")
    parser.add_argument("--instance", default="fleet_0")
    parser.add_argument("--machine-prefix", default="sim-")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--machine-list", default=None)
    parser.add_argument("--protocol", choices=("seed", "extended"), default="seed")
    parser.add_argument("--key-file", default=None)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--hold", type=float, default=30.0)
    parser.add_argument("--lines-per-sec", type=float, default=0.0)
    parser.add_argument("--line-bytes", type=int, default=100)
    parser.add_argument("--batch-bytes", type=int, default=64 * 1024)
    parser.add_argument("--batch-interval", type=float, default=0.1)
    parser.add_argument("--output-bytes", type=int, default=0)
    parser.add_argument("--connect-concurrency", type=int, default=500)
    parser.add_argument("--open-timeout", type=float, default=30.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--report", default=None)
    parser.add_argument("--tag", default="", help="free text, to find these processes")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    stats = asyncio.run(main_async(args))
    report = dict(vars(stats), started=started, ended=time.time(), pid=os.getpid(),
                  machines=args.count if not args.machine_list else None)
    report["connect_seconds"] = sorted(stats.connect_seconds)
    if args.report:
        tmp = args.report + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(report, handle)
        os.replace(tmp, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
