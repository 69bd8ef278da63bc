"""The bare sink: one process, stock ``websockets``, ``json.loads`` of every frame and
nothing else (compression and keepalive pings off). The reference for the fleet ratios."""

import argparse
import asyncio
import json
import signal
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def handle(connection) -> None:
    try:
        async for frame in connection:
            json.loads(frame)
    except ConnectionClosed:
        pass


async def serve_until_stopped(host: str, port: int, max_seconds: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(handle, host, port, compression=None, ping_interval=None,
                     max_size=16 * 1024 * 1024):
        try:
            await asyncio.wait_for(stop.wait(), max_seconds)
        except asyncio.TimeoutError:
            pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    asyncio.run(serve_until_stopped(args.host, args.port, args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
