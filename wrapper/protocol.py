"""The wire protocol between the wrapper and Saltpeter's WebSocket server.

Sans-I/O: nothing here touches a socket. The wrapper and the server both build and
parse messages only through this module. Standard library only, Python 3.9+, because
the wrapper runs on minions with no packages installed.

Every message is one JSON object in one text frame. Wrapper to server: ``connect``,
``start``, ``heartbeat``, ``output``, ``complete``, ``error``. Server to wrapper:
``ack``, ``kill``, ``error``. The seed protocol's fields are all kept; ``seq`` (a
per-wrapper sequence number, for acks and de-duplication) and ``token`` (the
per-instance secret) are optional additions, so a client that sends exactly the seed's
messages is still understood.
"""

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, Optional

WRAPPER_TYPES = frozenset({"connect", "start", "heartbeat", "output", "complete", "error"})
SERVER_TYPES = frozenset({"ack", "kill", "error"})
STREAMS = frozenset({"stdout", "stderr"})
KILL_REASONS = frozenset({"user", "timeout", "shutdown"})

MAX_NAME_LENGTH = 512
MAX_ERROR_LENGTH = 64 * 1024


class ProtocolError(ValueError):
    """A message that is not valid; the text says what is wrong with it."""


def utc_timestamp() -> str:
    """The current time as an ISO 8601 string with a UTC offset."""
    return datetime.now(timezone.utc).isoformat()


@dataclass
class Message:
    """One protocol message. Fields that a type does not use stay ``None``."""

    type: str
    job_name: str = ""
    job_instance: str = ""
    machine: str = ""
    timestamp: str = ""
    seq: Optional[int] = None
    token: Optional[str] = None
    pid: Optional[int] = None
    stream: Optional[str] = None
    data: Optional[str] = None
    retcode: Optional[int] = None
    output: Optional[str] = None
    error: Optional[str] = None
    reason: Optional[str] = None
    ack: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON object for this message, without the unset optional fields."""
        result: Dict[str, Any] = {"type": self.type}
        for name in ("job_name", "job_instance", "machine"):
            value = getattr(self, name)
            if value or self.type in WRAPPER_TYPES:
                result[name] = value
        result["timestamp"] = self.timestamp or utc_timestamp()
        for name in ("seq", "token", "pid", "stream", "data", "retcode",
                     "output", "error", "reason", "ack"):
            value = getattr(self, name)
            if value is not None:
                result[name] = value
        result.update(self.extra)
        return result


def encode(message: Message) -> str:
    """The text frame for ``message``."""
    return json.dumps(message.to_dict(), separators=(",", ":"))


def _require_str(obj: Dict[str, Any], name: str, max_length: int,
                 required: bool = True) -> Optional[str]:
    if name not in obj:
        if required:
            raise ProtocolError("missing field %r" % name)
        return None
    value = obj[name]
    if not isinstance(value, str):
        raise ProtocolError("field %r must be a string, not %s" % (name, type(value).__name__))
    if required and not value:
        raise ProtocolError("field %r must not be empty" % name)
    if len(value) > max_length:
        raise ProtocolError("field %r is longer than %d characters" % (name, max_length))
    return value


def _optional_int(obj: Dict[str, Any], name: str, required: bool = False) -> Optional[int]:
    if name not in obj or obj[name] is None:
        if required:
            raise ProtocolError("missing field %r" % name)
        return None
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("field %r must be an integer, not %s" % (name, type(value).__name__))
    return value


def parse_message(text: Any, allowed_types=WRAPPER_TYPES) -> Message:
    """Parse and validate one frame. Raises ``ProtocolError`` naming what is wrong.

    ``allowed_types`` is the set the receiving side accepts: the server passes
    ``WRAPPER_TYPES`` (the default), the wrapper passes ``SERVER_TYPES``.
    """
    if isinstance(text, (bytes, bytearray)):
        raise ProtocolError("binary frames are not accepted; send JSON text frames")
    if not isinstance(text, str):
        raise ProtocolError("frame must be text")
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ProtocolError("not valid JSON: %s" % exc) from None
    except RecursionError:
        # the decoder recurses per nesting level: '[' * 100000 must not escape as a crash
        raise ProtocolError("not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("message must be a JSON object, not %s" % type(obj).__name__)
    msg_type = obj.get("type")
    if not isinstance(msg_type, str):
        raise ProtocolError("missing or non-string field 'type'")
    if msg_type not in allowed_types:
        raise ProtocolError("unknown message type %r (expected one of %s)"
                            % (msg_type[:64], ", ".join(sorted(allowed_types))))

    is_wrapper_message = msg_type in WRAPPER_TYPES
    message = Message(type=msg_type)
    message.job_name = _require_str(obj, "job_name", MAX_NAME_LENGTH, is_wrapper_message) or ""
    message.job_instance = _require_str(obj, "job_instance", MAX_NAME_LENGTH,
                                        is_wrapper_message) or ""
    message.machine = _require_str(obj, "machine", MAX_NAME_LENGTH, is_wrapper_message) or ""
    message.timestamp = _require_str(obj, "timestamp", 64, required=False) or ""
    message.seq = _optional_int(obj, "seq")
    if message.seq is not None and message.seq < 0:
        raise ProtocolError("field 'seq' must not be negative")
    message.token = _require_str(obj, "token", 512, required=False)

    if msg_type == "start":
        message.pid = _optional_int(obj, "pid")
    elif msg_type == "output":
        message.stream = _require_str(obj, "stream", 16)
        if message.stream not in STREAMS:
            raise ProtocolError("field 'stream' must be 'stdout' or 'stderr', not %r"
                                % message.stream)
        data = obj.get("data")
        if not isinstance(data, str):
            raise ProtocolError("field 'data' must be a string")
        message.data = data
    elif msg_type == "complete":
        message.retcode = _optional_int(obj, "retcode", required=True)
        output = obj.get("output", "")
        if output is None:
            output = ""
        if not isinstance(output, str):
            raise ProtocolError("field 'output' must be a string")
        message.output = output
    elif msg_type == "error":
        message.error = _require_str(obj, "error", MAX_ERROR_LENGTH, required=False) or ""
    elif msg_type == "kill":
        message.reason = _require_str(obj, "reason", 32, required=False) or "user"
    elif msg_type == "ack":
        message.ack = _optional_int(obj, "ack", required=True)
    return message


# Builders used by both sides, so that field names live in one place.

def wrapper_message(msg_type: str, job_name: str, job_instance: str, machine: str,
                    **fields: Any) -> Message:
    """A wrapper-to-server message of ``msg_type`` with the common fields filled in."""
    return Message(type=msg_type, job_name=job_name, job_instance=job_instance,
                   machine=machine, timestamp=utc_timestamp(), **fields)


def server_message(msg_type: str, **fields: Any) -> Message:
    """A server-to-wrapper message (``ack``, ``kill`` or ``error``)."""
    return Message(type=msg_type, timestamp=utc_timestamp(), **fields)
