"""A TCP proxy on 127.0.0.1 that cuts its connections at random moments, for tests of
reconnection without loss."""

import random
import selectors
import socket
import threading
import time


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to ``target_port``; while ``cutting`` is on, every
    connection is cut (both sides closed) after a random 0.1-``max_life`` seconds."""

    def __init__(self, target_port: int, max_life: float = 1.0, seed: int = 1):
        self.target_port = target_port
        self.max_life = max_life
        self.random = random.Random(seed)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.cutting = True
        self.cuts = 0
        self._stop = threading.Event()
        self._pairs = {}      # socket -> (peer socket, deadline)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in list(self._pairs):
            sock.close()
        self.listener.close()

    def _run(self):
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.05):
                if key.fileobj is self.listener:
                    self._accept(selector)
                else:
                    self._forward(selector, key.fileobj)
            now = time.monotonic()
            if self.cutting:
                for sock, (peer, deadline) in list(self._pairs.items()):
                    if now > deadline and sock in self._pairs:
                        self.cuts += 1
                        self._close(selector, sock)
        selector.close()

    def _accept(self, selector):
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
        except OSError:
            client.close()
            return
        deadline = time.monotonic() + self.random.uniform(0.1, self.max_life)
        for sock, peer in ((client, upstream), (upstream, client)):
            sock.setblocking(False)
            self._pairs[sock] = (peer, deadline)
            selector.register(sock, selectors.EVENT_READ)

    def _forward(self, selector, sock):
        if sock not in self._pairs:
            return
        peer, _ = self._pairs[sock]
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(selector, sock)
            return
        try:
            peer.setblocking(True)
            peer.sendall(data)
            peer.setblocking(False)
        except OSError:
            self._close(selector, sock)

    def _close(self, selector, sock):
        entry = self._pairs.pop(sock, None)
        if entry is None:
            return
        peer = entry[0]
        self._pairs.pop(peer, None)
        for each in (sock, peer):
            try:
                selector.unregister(each)
            except (KeyError, ValueError):
                pass
            each.close()
