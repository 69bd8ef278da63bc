"""A tiny WebSocket server for wrapper tests: records every frame, de-duplicates by
``seq``, acks cumulatively, and lets the test drop connections or send ``kill``.

It runs an asyncio ``websockets`` server in a background thread on 127.0.0.1 and a port
chosen by the OS.
"""

import asyncio
import json
import threading
import time

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


class WrapperServer:
    """Records what wrappers send. ``accepted`` holds the messages after de-duplication,
    ``frames`` every frame as it arrived."""

    def __init__(self, ack=True, drop_after_outputs=(), max_size=2 ** 20, ssl_context=None):
        self.ack = ack
        self.ssl_context = ssl_context
        self.drop_after_outputs = set(drop_after_outputs)  # drop when the Nth output arrives
        self.max_size = max_size
        self.frames = []
        self.accepted = []
        self.connections = []
        self.drops = 0
        self.last_seq = 0
        self.port = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop = None
        self._stop = None
        self._current = None
        self._thread = threading.Thread(target=self._thread_main, daemon=True)

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("wss" if self.ssl_context else "ws", self.port)

    def __enter__(self):
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test WebSocket server did not start")
        return self

    def __exit__(self, *exc_info):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _thread_main(self):
        asyncio.run(self._main())

    async def _main(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", 0, max_size=self.max_size,
                         ssl=self.ssl_context) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    async def _handler(self, ws):
        with self._lock:
            self.connections.append(ws)
        try:
            async for text in ws:
                message = json.loads(text)
                drop = False
                with self._lock:
                    self.frames.append(message)
                    seq = message.get("seq")
                    if message.get("type") == "connect":
                        self._current = ws
                    if seq is None or seq > self.last_seq:
                        self.accepted.append(message)
                        if seq is not None:
                            self.last_seq = seq
                        if message.get("type") == "output":
                            count = sum(1 for m in self.accepted if m["type"] == "output")
                            drop = count in self.drop_after_outputs
                    ack = self.last_seq
                if drop:
                    # Lose the connection without acking the last message: it must come again.
                    self.drops += 1
                    if self.drops % 2:
                        ws.transport.abort()
                    else:
                        await ws.close()
                    return
                if self.ack and seq is not None:
                    await ws.send(json.dumps({"type": "ack", "ack": ack}))
        except ConnectionClosed:
            pass

    # Used by the tests (from the test thread)

    def send(self, message, fragmented=False):
        """Send ``message`` (a dict) on the latest wrapper connection."""
        text = json.dumps(message)

        async def _send():
            if fragmented:
                pieces = [text[i:i + 5] for i in range(0, len(text), 5)]
                await self._current.send(iter(pieces))
            else:
                await self._current.send(text)

        asyncio.run_coroutine_threadsafe(_send(), self._loop).result(10)

    def kill(self, reason="user", fragmented=False):
        self.send({"type": "kill", "reason": reason}, fragmented=fragmented)

    def messages(self, msg_type=None):
        with self._lock:
            return [m for m in self.accepted if msg_type is None or m["type"] == msg_type]

    def output(self, stream):
        """The bytes of ``stream`` as the command wrote them."""
        return "".join(m["data"] for m in self.messages("output")
                       if m["stream"] == stream).encode("utf-8", "surrogateescape")

    def wait_for(self, msg_type, timeout=15.0):
        """The first accepted message of ``msg_type``; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.messages(msg_type)
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError("no %r message within %.0f s; got %r"
                             % (msg_type, timeout, [m["type"] for m in self.messages()]))
