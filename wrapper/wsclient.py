"""A minimal RFC 6455 WebSocket client over a blocking socket.

Standard library only, Python 3.9+: the wrapper runs on minions with no packages
installed. It speaks just what the wrapper needs: ``ws://`` and ``wss://``, the
HTTP/1.1 upgrade handshake, masked text frames out, text frames (fragmented or not)
in, ping/pong and the close handshake.

Threading: ``send_text`` may be called from any thread (a lock keeps frames whole);
``recv`` must be called from one thread at a time.
"""

import base64
import hashlib
import os
import select
import socket
import ssl
import struct
import threading
import time
from typing import Dict, List, NoReturn, Optional, Tuple
from urllib.parse import urlsplit

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024  # incoming frames (and messages) larger than this fail
MAX_HANDSHAKE_RESPONSE = 64 * 1024
RECV_CHUNK = 256 * 1024
DEFAULT_IO_TIMEOUT = 30.0  # a send blocked this long means the peer is gone
CLOSE_WAIT = 2.0           # how long close() waits for the peer's close frame

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
CONTROL_OPCODES = frozenset({OP_CLOSE, OP_PING, OP_PONG})

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009


class WebSocketError(Exception):
    """Anything that went wrong on a WebSocket connection (handshake, framing, I/O)."""


class HandshakeError(WebSocketError):
    """The server did not accept the upgrade to a WebSocket connection."""


class ConnectionClosed(WebSocketError):
    """The connection is closed; ``code`` and ``reason`` are the peer's (1006: no close frame)."""

    def __init__(self, code: int = CLOSE_ABNORMAL, reason: str = ""):
        self.code = code
        self.reason = reason
        super().__init__("connection closed (code %d%s)" % (code, ", %s" % reason if reason else ""))


def mask_payload(mask: bytes, payload: bytes) -> bytes:
    """``payload`` XORed with the 4-byte ``mask`` repeated (RFC 6455 5.3).

    One big-integer XOR over the whole payload: a per-byte Python loop would cap the
    wrapper's throughput at a few MB/s.
    """
    length = len(payload)
    if length == 0:
        return b""
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")


def build_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked client frame carrying ``payload``."""
    length = len(payload)
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    mask = os.urandom(4)
    return header + mask + mask_payload(mask, payload)


def parse_frame(buffer: bytearray, max_frame_size: int) -> Optional[Tuple[bool, int, bytes]]:
    """Take one complete server frame off the front of ``buffer``.

    Returns ``(fin, opcode, payload)``, or ``None`` (buffer untouched) when the frame is
    not complete yet. Raises ``WebSocketError`` for frames a server must not send.
    """
    if len(buffer) < 2:
        return None
    first, second = buffer[0], buffer[1]
    if first & 0x70:
        raise WebSocketError("frame with reserved bits set (no extension was negotiated)")
    if second & 0x80:
        raise WebSocketError("server frames must not be masked")
    fin = bool(first & 0x80)
    opcode = first & 0x0F
    length = second & 0x7F
    offset = 2
    if length == 126:
        if len(buffer) < 4:
            return None
        length = struct.unpack_from("!H", buffer, 2)[0]
        offset = 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        length = struct.unpack_from("!Q", buffer, 2)[0]
        offset = 10
    if opcode in CONTROL_OPCODES and (length > 125 or not fin):
        raise WebSocketError("control frames must be short and not fragmented")
    if length > max_frame_size:
        raise WebSocketError("incoming frame of %d bytes exceeds the limit of %d"
                             % (length, max_frame_size))
    if len(buffer) < offset + length:
        return None
    payload = bytes(buffer[offset:offset + length])
    del buffer[:offset + length]
    return fin, opcode, payload


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value a server must answer to ``key``."""
    digest = hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def close_payload(code: int, reason: str = "") -> bytes:
    """The body of a close frame with ``code`` and a (truncated) UTF-8 ``reason``."""
    return struct.pack("!H", code) + reason.encode("utf-8")[:120]


class WebSocket:
    """An open client connection. Build one with ``connect()``."""

    def __init__(self, sock: socket.socket, leftover: bytes = b"",
                 max_frame_size: int = DEFAULT_MAX_FRAME_SIZE):
        self.sock = sock
        self.max_frame_size = max_frame_size
        self._buffer = bytearray(leftover)
        self._unparsed = bool(leftover)  # bytes came in that recv() has not looked at
        self._fragments: List[bytes] = []
        self._fragment_size = 0
        self._send_lock = threading.Lock()
        self._close_sent = False  # no more data frames may go out
        self._closed = False      # the socket is gone
        self.close_code: Optional[int] = None
        self.close_reason = ""

    def fileno(self) -> int:
        """The socket's descriptor, for ``select``."""
        return self.sock.fileno()

    @property
    def closed(self) -> bool:
        """True once a close frame went out or the socket failed."""
        return self._closed or self._close_sent

    # Sending

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        if self._closed or (self._close_sent and opcode != OP_CLOSE):
            raise ConnectionClosed(self.close_code or CLOSE_ABNORMAL, self.close_reason)
        frame = build_frame(opcode, payload)
        if opcode == OP_CLOSE:
            self._close_sent = True
        with self._send_lock:
            try:
                self.sock.sendall(frame)
            except (OSError, ValueError) as exc:  # ValueError: socket already closed
                self._closed = True
                raise ConnectionClosed(CLOSE_ABNORMAL, "send failed: %s" % exc) from None

    def send_text(self, text: str) -> None:
        """Send ``text`` as one text frame. Raises ``ConnectionClosed`` if the link is gone."""
        self._send_frame(OP_TEXT, text.encode("utf-8"))

    def ping(self, payload: bytes = b"") -> None:
        """Send a ping (the answer is consumed by ``recv``)."""
        self._send_frame(OP_PING, payload)

    # Receiving

    def _has_pending_bytes(self) -> bool:
        # Decrypted TLS data can sit inside the SSL object where select() cannot see it.
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0

    def pending(self) -> bool:
        """True if received bytes wait in this object (so ``recv`` may return a message
        although ``select`` on the socket would block)."""
        return self._unparsed or self._has_pending_bytes()

    def _fill(self, timeout: Optional[float]) -> bool:
        """Read what the socket has into the buffer; False if nothing came in ``timeout``."""
        if not self._has_pending_bytes():
            readable, _, _ = select.select([self.sock], [], [], timeout)
            if not readable:
                return False
        try:
            data = self.sock.recv(RECV_CHUNK)
        except ssl.SSLWantReadError:
            return False
        except (OSError, ValueError) as exc:
            self._closed = True
            raise ConnectionClosed(CLOSE_ABNORMAL, "receive failed: %s" % exc) from None
        if not data:
            self._closed = True
            raise ConnectionClosed(CLOSE_ABNORMAL, "connection lost without a close frame")
        self._buffer.extend(data)
        self._unparsed = True
        return True

    def _fail(self, code: int, text: str) -> NoReturn:
        """Close with ``code`` after a protocol violation and raise."""
        try:
            self._send_frame(OP_CLOSE, close_payload(code, text))
        except WebSocketError:
            pass
        self._closed = True
        self._shutdown()
        raise WebSocketError(text)

    def _handle_control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self._send_frame(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else CLOSE_NO_STATUS
            reason = payload[2:].decode("utf-8", "replace")
            if not self._close_sent:
                try:
                    self._send_frame(OP_CLOSE, payload[:2])
                except WebSocketError:
                    pass
            self._closed = True
            self.close_code, self.close_reason = code, reason
            self._shutdown()
            raise ConnectionClosed(code, reason)
        # OP_PONG: nothing to do.

    def recv(self, timeout: Optional[float] = None) -> Optional[str]:
        """The next text message, or ``None`` if none arrived within ``timeout`` seconds.

        Pings are answered and pongs skipped on the way. Raises ``ConnectionClosed``
        when the peer closes or the socket fails, ``WebSocketError`` on a protocol
        violation (the connection is then closed).
        """
        if self._closed and not self._buffer:
            raise ConnectionClosed(self.close_code or CLOSE_ABNORMAL, self.close_reason)
        waited = False
        while True:
            try:
                frame = parse_frame(self._buffer, self.max_frame_size)
            except WebSocketError as exc:
                code = CLOSE_TOO_BIG if "exceeds" in str(exc) else CLOSE_PROTOCOL_ERROR
                self._fail(code, str(exc))
            if frame is None:
                # Wait once with the caller's timeout, then only take what is already there.
                if not self._fill(0 if waited else timeout):
                    self._unparsed = False  # what is left is an incomplete frame
                    return None
                waited = True
                continue
            fin, opcode, payload = frame
            if opcode in CONTROL_OPCODES:
                self._handle_control(opcode, payload)
                continue
            if opcode == OP_CONTINUATION:
                if not self._fragments:
                    self._fail(CLOSE_PROTOCOL_ERROR, "continuation frame without a start")
            elif self._fragments:
                self._fail(CLOSE_PROTOCOL_ERROR, "new message before the last one ended")
            elif opcode != OP_TEXT:
                self._fail(CLOSE_UNSUPPORTED_DATA, "only text messages are accepted")
            self._fragments.append(payload)
            self._fragment_size += len(payload)
            if self._fragment_size > self.max_frame_size:
                self._fail(CLOSE_TOO_BIG, "incoming message exceeds the limit of %d bytes"
                           % self.max_frame_size)
            if not fin:
                continue
            data = b"".join(self._fragments)
            self._fragments, self._fragment_size = [], 0
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                self._fail(CLOSE_INVALID_DATA, "text message is not valid UTF-8")

    # Closing

    def _shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def close(self, code: int = CLOSE_NORMAL, reason: str = "",
              timeout: float = CLOSE_WAIT) -> None:
        """Close cleanly: send a close frame, wait up to ``timeout`` for the peer's, then
        drop the socket. Never raises."""
        if not self._closed and not self._close_sent:
            try:
                self._send_frame(OP_CLOSE, close_payload(code, reason))
                deadline = time.monotonic() + timeout
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    # Data frames still in flight are dropped; recv raises on the peer's close.
                    self.recv(remaining)
            except WebSocketError:
                pass
        self._closed = True
        self._shutdown()


def _parse_url(url: str) -> Tuple[bool, str, int, str, str]:
    """``(secure, host, port, path, host_header)`` of a ws:// or wss:// URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise WebSocketError("URL scheme must be ws:// or wss://, not %r" % url)
    if not parts.hostname:
        raise WebSocketError("URL has no host: %r" % url)
    secure = parts.scheme == "wss"
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError:
        raise WebSocketError("URL has a bad port: %r" % url) from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host = parts.hostname
    shown_host = "[%s]" % host if ":" in host else host
    default_port = 443 if secure else 80
    host_header = shown_host if port == default_port else "%s:%d" % (shown_host, port)
    return secure, host, port, path, host_header


def _read_response_head(sock: socket.socket) -> Tuple[bytes, bytes]:
    """The HTTP response head (up to the blank line) and whatever bytes followed it."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HANDSHAKE_RESPONSE:
            raise HandshakeError("handshake response too long")
        chunk = sock.recv(4096)
        if not chunk:
            raise HandshakeError("server closed the connection during the handshake")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _check_response(head: bytes, key: str) -> None:
    lines = head.decode("iso-8859-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[1] != "101":
        raise HandshakeError("server refused the WebSocket upgrade: %s" % lines[0][:200])
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if headers.get("upgrade", "").lower() != "websocket":
        raise HandshakeError("response lacks 'Upgrade: websocket'")
    connection_tokens = [t.strip().lower() for t in headers.get("connection", "").split(",")]
    if "upgrade" not in connection_tokens:
        raise HandshakeError("response lacks 'Connection: Upgrade'")
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise HandshakeError("wrong Sec-WebSocket-Accept in the response")
    if headers.get("sec-websocket-extensions"):
        raise HandshakeError("server chose an extension that was not offered")


def connect(url: str, timeout: float = 10.0, ca_file: Optional[str] = None,
            max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
            io_timeout: float = DEFAULT_IO_TIMEOUT,
            user_agent: str = "saltpeter-wrapper") -> WebSocket:
    """Open a WebSocket connection to ``url`` (``ws://`` or ``wss://``).

    TCP connect, TLS and the upgrade handshake together get ``timeout`` seconds each at
    most. For ``wss://`` the server certificate and host name are verified against
    ``ca_file`` if given, else against the system's trust store. Afterwards a blocked
    send fails after ``io_timeout`` seconds. Raises ``WebSocketError`` (or
    ``HandshakeError``) with the reason; ``OSError`` from the network is wrapped too.
    """
    secure, host, port, path, host_header = _parse_url(url)
    sock = None
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if secure:
            context = ssl.create_default_context(cafile=ca_file)
            sock = context.wrap_socket(sock, server_hostname=host)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        request = ("GET %s HTTP/1.1\r\n"
                   "Host: %s\r\n"
                   "Upgrade: websocket\r\n"
                   "Connection: Upgrade\r\n"
                   "Sec-WebSocket-Key: %s\r\n"
                   "Sec-WebSocket-Version: 13\r\n"
                   "User-Agent: %s\r\n"
                   "\r\n") % (path, host_header, key, user_agent)
        sock.sendall(request.encode("ascii"))
        head, leftover = _read_response_head(sock)
        _check_response(head, key)
        sock.settimeout(io_timeout)
        return WebSocket(sock, leftover, max_frame_size)
    except WebSocketError:
        if sock is not None:
            sock.close()
        raise
    except (OSError, ValueError) as exc:  # ssl.SSLError and socket.timeout are OSErrors
        if sock is not None:
            sock.close()
        raise WebSocketError("cannot connect to %s: %s" % (url, exc)) from None
