"""The minion-side wrapper: detach, run one job command, stream it to Saltpeter.

Standard library only, Python 3.9+: minions have no packages installed.

Life of one wrapper run:

1. Read the configuration (positional arguments or ``SP_*`` variables); bad config is a
   one-line error and exit code 2, before anything else happens.
2. Detach (double fork, own session, every inherited descriptor closed) so that Salt's
   ``cmd.run`` gets exit code 0 at once.
3. Connect to the WebSocket server (retrying up to ``SP_CONNECT_TIMEOUT``); without a
   connection the command is never run.
4. Send ``connect``, start the command, send ``start``; stream ``output`` and
   ``heartbeat``; obey ``kill``; send ``complete`` and wait for its ack.

Every message carries ``seq``; the server's cumulative ``ack`` lets the wrapper forget
messages. Unacknowledged ones are re-sent after a reconnect, so a dropped connection
loses no output.
"""

import codecs
import json
import logging
import os
import pwd
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence

from wrapper import WRAPPER_VERSION
from wrapper.protocol import (SERVER_TYPES, Message, ProtocolError, encode, parse_message,
                              wrapper_message)
from wrapper.wsclient import ConnectionClosed, WebSocket, WebSocketError
from wrapper.wsclient import connect as ws_connect

try:  # ctypes can be missing on stripped-down Pythons; PDEATHSIG is then skipped.
    import ctypes
except ImportError:  # pragma: no cover
    ctypes = None  # type: ignore

log = logging.getLogger("saltpeter.wrapper")

# Exit codes of the wrapper process itself.
EXIT_OK = 0
EXIT_DETACH_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_CONNECTED = 255

# Exit codes reported in ``complete`` (SPEC section 6).
RETCODE_TIMEOUT = 124
RETCODE_KILLED = 143
SIGNAL_RETCODE_BASE = 128

# Timing.
HEARTBEAT_INTERVAL = 5.0           # seconds between heartbeats while the command runs
KILL_GRACE = 5.0                   # SIGTERM, then SIGKILL this much later
OUTPUT_FLUSH_INTERVAL = 0.05       # buffered output goes out at least this often
DRAIN_TIMEOUT = 1.0                # after the shell exits, wait this long for the pipes
DEFAULT_CONNECT_TIMEOUT = 60.0     # seconds to get the first connection
DEFAULT_RECONNECT_FOR = 86400.0    # seconds to keep reconnecting after a drop
CONNECT_ATTEMPT_TIMEOUT = 10.0     # one TCP + TLS + handshake attempt
BACKOFF_START = 0.2
BACKOFF_CAP = 5.0
NO_ACK_GRACE = 2.0                 # a server that never acked: wait this long after complete
CLOSE_POLICY_VIOLATION = 1008      # the server's close code for "do not come back"
IO_POLL_INTERVAL = 1.0             # the I/O thread re-checks its deadlines this often

# Sizes.
READ_SIZE = 64 * 1024              # one os.read() of the command's pipes
OUTPUT_MAX_CHUNK = 256 * 1024      # bytes of output coalesced into one message at most
MAX_FRAME_TEXT = 512 * 1024        # an encoded message larger than this is split
COMPLETE_OUTPUT_TAIL = 64 * 1024   # bytes of output repeated in ``complete``
UNACKED_CAP = 256 * 1024 * 1024    # unacknowledged bytes kept for re-sending
UNACKED_TRIM_TO = 192 * 1024 * 1024  # trim below the cap so trimming is rare

# How the command runs: its text travels in the environment, never in an argv.
SHELL = "/bin/sh"
COMMAND_ENV_VAR = "__SP_CMD"
SHELL_SCRIPT = 'c=$%s; unset %s; eval "$c"' % (COMMAND_ENV_VAR, COMMAND_ENV_VAR)
PRIVATE_ENV_PREFIXES = ("SP_", "__SP_")
PR_SET_PDEATHSIG = 1
GUARD_RELEASE = b"done"  # the wrapper's goodbye to its guard: the job ended normally

USAGE = ("usage: sp-wrapper <websocket_url> <job_name> <job_instance> <machine_id> "
         "<command> [cwd] [user]\n"
         "   or: SP_WEBSOCKET_URL=... SP_JOB_NAME=... SP_JOB_INSTANCE=... SP_COMMAND=... "
         "sp-wrapper")


class ConfigError(ValueError):
    """The wrapper's configuration is unusable; the text says why."""


class Config:
    """Everything one wrapper run needs, validated."""

    def __init__(self, url: str, job_name: str, job_instance: str, machine: str,
                 command: str, cwd: Optional[str] = None, user: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, token: Optional[str] = None,
                 ca_file: Optional[str] = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 reconnect_for: float = DEFAULT_RECONNECT_FOR,
                 log_file: Optional[str] = None, foreground: bool = False):
        self.url = url
        self.job_name = job_name
        self.job_instance = job_instance
        self.machine = machine
        self.command = command
        self.cwd = cwd
        self.user = user
        self.env = env or {}
        self.token = token
        self.ca_file = ca_file
        self.connect_timeout = connect_timeout
        self.reconnect_for = reconnect_for
        self.log_file = log_file
        self.foreground = foreground


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("%s must be a number of seconds, not %r" % (name, text)) from None
    if value < 0 or value != value:
        raise ConfigError("%s must not be negative" % name)
    return value


def _extra_env(text: str) -> Dict[str, str]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError("SP_ENV is not valid JSON: %s" % exc) from None
    if not isinstance(value, dict):
        raise ConfigError("SP_ENV must be a JSON object of variable names to values")
    result = {}
    for name, item in value.items():
        if not name or "=" in name or "\0" in name:
            raise ConfigError("SP_ENV has a bad variable name %r" % name)
        if isinstance(item, bool) or item is None or isinstance(item, (dict, list)):
            raise ConfigError("SP_ENV value of %r must be a string or number" % name)
        result[name] = str(item)
    return result


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """The configuration from ``argv`` (positional style) or, with no arguments, from
    ``SP_*`` variables. Options that only exist as variables (token, env, CA file,
    timeouts, log file, foreground) apply in both styles. Raises ``ConfigError``."""
    args = list(argv)
    if args:
        if len(args) < 5 or len(args) > 7:
            raise ConfigError("expected 5 to 7 arguments, got %d" % len(args))
        url, job_name, job_instance, machine, command = args[:5]
        cwd = args[5] if len(args) > 5 else ""
        user = args[6] if len(args) > 6 else ""
    else:
        url = environ.get("SP_WEBSOCKET_URL", "")
        job_name = environ.get("SP_JOB_NAME", "")
        job_instance = environ.get("SP_JOB_INSTANCE", "")
        machine = environ.get("SP_MACHINE_ID", "") or socket.gethostname()
        command = environ.get("SP_COMMAND", "")
        cwd = environ.get("SP_CWD", "")
        user = environ.get("SP_USER", "")
    for name, value in (("websocket URL (SP_WEBSOCKET_URL)", url),
                        ("job name (SP_JOB_NAME)", job_name),
                        ("job instance (SP_JOB_INSTANCE)", job_instance),
                        ("machine id (SP_MACHINE_ID)", machine),
                        ("command (SP_COMMAND)", command)):
        if not value.strip():
            raise ConfigError("missing %s" % name)
    if not (url.startswith("ws://") or url.startswith("wss://")):
        raise ConfigError("websocket URL must start with ws:// or wss://, not %r" % url)
    if "\0" in command:
        raise ConfigError("command contains a NUL byte")
    ca_file = environ.get("SP_CA_FILE", "") or None
    if ca_file is not None and not os.path.isfile(ca_file):
        raise ConfigError("SP_CA_FILE %r is not a readable file" % ca_file)
    log_file = environ.get("SP_LOG_FILE", "") or None
    if log_file is not None:
        try:
            with open(log_file, "a"):
                pass
        except OSError as exc:
            raise ConfigError("cannot open SP_LOG_FILE %r: %s" % (log_file, exc)) from None
    return Config(
        url=url, job_name=job_name, job_instance=job_instance, machine=machine,
        command=command, cwd=cwd or None, user=user or None,
        env=_extra_env(environ.get("SP_ENV", "")),
        token=environ.get("SP_TOKEN", "") or None,
        ca_file=ca_file,
        connect_timeout=_seconds(environ, "SP_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
        reconnect_for=_seconds(environ, "SP_RECONNECT_FOR", DEFAULT_RECONNECT_FOR),
        log_file=log_file,
        foreground=environ.get("SP_FOREGROUND", "") not in ("", "0"),
    )


def backoff_delays(start: float = BACKOFF_START, cap: float = BACKOFF_CAP):
    """Endless exponential delays with jitter: ~start, ~2*start, ... capped at ``cap``."""
    delay = start
    while True:
        # Jitter keeps a fleet of wrappers from reconnecting in lock step after a restart.
        yield delay * random.uniform(0.5, 1.0)
        delay = min(cap, delay * 2)


def dial(config: Config, deadline: float) -> Optional[WebSocket]:
    """A new connection to the server, retrying with backoff until ``deadline``
    (monotonic); ``None`` if none could be made."""
    delays = backoff_delays()
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        try:
            return ws_connect(config.url, timeout=max(0.1, min(CONNECT_ATTEMPT_TIMEOUT, remaining)),
                              ca_file=config.ca_file)
        except WebSocketError as exc:
            log.warning("connection attempt %d to %s failed: %s", attempt, config.url, exc)
        pause = next(delays)
        if time.monotonic() + pause >= deadline:
            return None
        time.sleep(pause)


class Outbox:
    """Messages not yet acknowledged, in ``seq`` order, and which of them still have to
    go out on the current connection. Shared by the producing threads and the I/O thread.
    """

    def __init__(self, cap: int = UNACKED_CAP, trim_to: int = UNACKED_TRIM_TO):
        self.lock = threading.RLock()
        self._unacked: Deque[List[Any]] = deque()  # [seq, msg_type, text]
        self._unsent: Deque[List[Any]] = deque()
        self._bytes = 0
        self._cap = cap
        self._trim_to = trim_to
        self._dropped_messages = 0
        self.next_seq = 1
        self.acked = 0
        self.ack_seen = False
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        self.wake_fd = wake_read
        self._wake_write = wake_write

    def wake(self) -> None:
        """Make the I/O thread's select() return."""
        try:
            os.write(self._wake_write, b"!")
        except (BlockingIOError, OSError):
            pass  # the pipe is already full of wake-ups

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def add(self, seq: int, msg_type: str, text: str) -> None:
        """Queue an encoded message whose ``seq`` came from ``next_seq`` (under ``lock``)."""
        with self.lock:
            item = [seq, msg_type, text]
            self._unacked.append(item)
            self._unsent.append(item)
            self._bytes += len(text)
            if self._bytes > self._cap:
                self._trim()
        self.wake()

    def _trim(self) -> None:
        # Only output is dropped: the job's lifecycle messages must still arrive.
        kept: Deque[List[Any]] = deque()
        dropped = 0
        for item in self._unacked:
            if self._bytes > self._trim_to and item[1] == "output":
                self._bytes -= len(item[2])
                dropped += 1
            else:
                kept.append(item)
        kept_ids = set(id(item) for item in kept)
        self._unacked = kept
        self._unsent = deque(item for item in self._unsent if id(item) in kept_ids)
        self._dropped_messages += dropped
        log.warning("server has not acknowledged %d MiB of messages; dropped the %d oldest "
                    "output messages (%d so far)", self._cap // (1024 * 1024), dropped,
                    self._dropped_messages)

    def take_unsent(self) -> Optional[List[Any]]:
        """The next message to send on this connection, or ``None``."""
        with self.lock:
            return self._unsent.popleft() if self._unsent else None

    def rewind(self) -> None:
        """After a reconnect: everything unacknowledged goes out again, in order."""
        with self.lock:
            self._unsent = deque(self._unacked)

    def acknowledge(self, ack: int) -> None:
        """The server has every ``seq`` up to ``ack``: forget those messages."""
        with self.lock:
            self.ack_seen = True
            if ack <= self.acked:
                return
            self.acked = ack
            while self._unacked and self._unacked[0][0] <= ack:
                self._bytes -= len(self._unacked.popleft()[2])
            while self._unsent and self._unsent[0][0] <= ack:
                self._unsent.popleft()

    def empty(self) -> bool:
        """True when every message has been acknowledged."""
        with self.lock:
            return not self._unacked

    def all_sent(self) -> bool:
        with self.lock:
            return not self._unsent


class Session:
    """The wrapper's link to the server: numbering and queueing messages, and the I/O
    thread that sends them, reads acks and kills, and reconnects after a drop."""

    def __init__(self, config: Config, outbox: Optional[Outbox] = None):
        self.config = config
        self.outbox = outbox or Outbox()
        self.connected = threading.Event()
        self.on_kill = None  # callable(reason), set by the job
        self._ws: Optional[WebSocket] = None
        self._finishing = False
        self._finish_sent_at: Optional[float] = None
        self._thread: Optional[threading.Thread] = None
        self.gave_up = False

    # Producing messages (any thread)

    def send(self, msg_type: str, **fields: Any) -> None:
        """Queue one message of ``msg_type``; it is sent (and re-sent) by the I/O thread.
        Once reconnecting has given up, messages are dropped."""
        if self.gave_up:
            return
        with self.outbox.lock:
            seq = self.outbox.next_seq
            message = self._message(msg_type, seq, **fields)
            text = encode(message)
            if (msg_type == "output" and len(text) > MAX_FRAME_TEXT
                    and len(fields.get("data", "")) > 1):
                # Escaped binary output can grow 6x in JSON: split it to stay under the
                # server's frame limit. Lone surrogates are single code points, so any
                # split point keeps the bytes intact.
                data = fields.pop("data")
                half = len(data) // 2
                self.send(msg_type, data=data[:half], **fields)
                self.send(msg_type, data=data[half:], **fields)
                return
            self.outbox.next_seq = seq + 1
            self.outbox.add(seq, msg_type, text)

    def _message(self, msg_type: str, seq: int, **fields: Any) -> Message:
        config = self.config
        return wrapper_message(msg_type, config.job_name, config.job_instance, config.machine,
                               seq=seq, token=config.token, **fields)

    # The I/O thread

    def start(self, ws: WebSocket) -> None:
        """Run the I/O thread on the already open connection ``ws``."""
        self._ws = ws
        self.connected.set()
        self._thread = threading.Thread(target=self._run, name="sp-io", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """Block until every queued message is acknowledged (or the server is known not
        to acknowledge, or reconnecting gave up), then close the connection."""
        with self.outbox.lock:
            self._finishing = True
        self.outbox.wake()
        if self._thread is not None:
            self._thread.join()

    @property
    def started(self) -> bool:
        """True once the I/O thread runs."""
        return self._thread is not None

    def _run(self) -> None:
        try:
            while True:
                if self._ws is None and (self._done() or not self._reconnect()):
                    return
                try:
                    if self._serve(self._ws):
                        return
                except ConnectionClosed as exc:
                    if exc.code == CLOSE_POLICY_VIOLATION:
                        # The server refuses this job instance (unknown, bad token):
                        # coming back would be refused again.
                        log.error("server at %s refused this wrapper: %s; giving up "
                                  "reporting", self.config.url, exc)
                        self.gave_up = True
                        return
                    log.warning("connection to %s lost: %s", self.config.url, exc)
                except (WebSocketError, OSError) as exc:
                    log.warning("connection to %s lost: %s", self.config.url, exc)
                self.connected.clear()
                if self._ws is not None:
                    self._ws.close(timeout=0)
                self._ws = None
        except Exception:  # the job goes on even if reporting fails
            log.exception("I/O thread failed")
        finally:
            self.connected.clear()
            if self._ws is not None:
                self._ws.close()

    def _reconnect(self) -> bool:
        """Reconnect within SP_RECONNECT_FOR; on success send ``connect`` and queue every
        unacknowledged message again. False if it gave up."""
        deadline = time.monotonic() + self.config.reconnect_for
        ws = dial(self.config, deadline)
        if ws is None:
            log.error("could not reconnect to %s for %.0f s; giving up reporting",
                      self.config.url, self.config.reconnect_for)
            self.gave_up = True
            return False
        with self.outbox.lock:
            # seq = the last acknowledged one: the server has seen it already, so a
            # server that drops duplicates by seq does not skip what is re-sent next.
            message = self._message("connect", self.outbox.acked,
                                    extra={"reconnect": True,
                                           "wrapper_version": WRAPPER_VERSION})
            self.outbox.rewind()
        try:
            ws.send_text(encode(message))
        except WebSocketError as exc:
            log.warning("connection to %s lost right away: %s", self.config.url, exc)
            ws.close(timeout=0)
            return True  # try again, with a fresh deadline
        log.info("reconnected to %s; re-sending from seq %d", self.config.url,
                 self.outbox.acked + 1)
        self._ws = ws
        self.connected.set()
        return True

    def _done(self) -> bool:
        """True when the wrapper may close: finishing and nothing left to deliver."""
        with self.outbox.lock:
            if not self._finishing:
                return False
            if self.outbox.empty():
                return True
            if not self.outbox.all_sent():
                return False
            if self._finish_sent_at is None:
                self._finish_sent_at = time.monotonic()
            # A seed-style server never acks; do not wait a day for it.
            return (not self.outbox.ack_seen
                    and time.monotonic() - self._finish_sent_at > NO_ACK_GRACE)

    def _serve(self, ws: WebSocket) -> bool:
        """Send queued messages and handle server messages on ``ws`` until the work is
        done (True) or the connection fails (raises)."""
        outbox = self.outbox
        while True:
            item = outbox.take_unsent()
            while item is not None:
                ws.send_text(item[2])
                item = outbox.take_unsent()
            if self._done():
                ws.close()
                self._ws = None
                return True
            wait = 0 if ws.pending() else IO_POLL_INTERVAL
            readable, _, _ = select.select([ws, outbox.wake_fd], [], [], wait)
            if outbox.wake_fd in readable:
                outbox.drain_wakeups()
            if ws in readable or ws.pending():
                text = ws.recv(0)
                while text is not None:
                    self._handle(text)
                    text = ws.recv(0)

    def _handle(self, text: str) -> None:
        try:
            message = parse_message(text, allowed_types=SERVER_TYPES)
        except ProtocolError as exc:
            log.warning("ignoring a bad message from the server: %s", exc)
            return
        if message.type == "ack":
            self.outbox.acknowledge(message.ack)
        elif message.type == "kill":
            log.info("server asks to kill the job (reason: %s)", message.reason)
            if self.on_kill is not None:
                self.on_kill(message.reason or "user")
        elif message.type == "error":
            log.warning("server reports an error: %s", message.error or text[:500])


class OutputCollector:
    """Turns the command's raw stdout/stderr chunks into ``output`` messages.

    Consecutive chunks of one stream are coalesced (flushed every
    ``OUTPUT_FLUSH_INTERVAL`` by the ticker, or at ``OUTPUT_MAX_CHUNK``). Each stream has
    an incremental UTF-8 decoder with ``surrogateescape``: a multibyte character is never
    split across messages and arbitrary bytes survive as lone surrogates.
    """

    def __init__(self, session: Session):
        self.session = session
        self._lock = threading.Lock()
        self._decoders = {name: codecs.getincrementaldecoder("utf-8")("surrogateescape")
                          for name in ("stdout", "stderr")}
        self._stream: Optional[str] = None
        self._chunks: List[bytes] = []
        self._size = 0
        self._tail = bytearray()

    def add(self, stream: str, data: bytes) -> None:
        """Take ``data`` read from ``stream``."""
        with self._lock:
            self._tail += data
            if len(self._tail) > 2 * COMPLETE_OUTPUT_TAIL:
                del self._tail[:-COMPLETE_OUTPUT_TAIL]
            if self._stream != stream:
                self._flush_locked(False)
                self._stream = stream
            self._chunks.append(data)
            self._size += len(data)
            if self._size >= OUTPUT_MAX_CHUNK:
                self._flush_locked(False)

    def flush(self, final: bool = False) -> None:
        """Send what is buffered; with ``final`` also what the decoders hold back."""
        with self._lock:
            self._flush_locked(False)
            if final:
                for stream, decoder in self._decoders.items():
                    text = decoder.decode(b"", final=True)
                    if text:
                        self.session.send("output", stream=stream, data=text)

    def _flush_locked(self, final: bool) -> None:
        if not self._chunks:
            return
        data = b"".join(self._chunks)
        self._chunks, self._size = [], 0
        text = self._decoders[self._stream].decode(data, final)
        if text:
            self.session.send("output", stream=self._stream, data=text)

    def tail(self) -> str:
        """The last ``COMPLETE_OUTPUT_TAIL`` bytes of all output, decoded."""
        with self._lock:
            return bytes(self._tail[-COMPLETE_OUTPUT_TAIL:]).decode("utf-8", "surrogateescape")


def _load_prctl():
    if ctypes is None or not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


class Job:
    """The command: started in its own session, streamed, killed on request."""

    def __init__(self, config: Config, session: Session):
        self.config = config
        self.session = session
        self.collector = OutputCollector(session)
        self.proc: Optional[subprocess.Popen] = None
        self.kill_reason: Optional[str] = None
        self._kill_lock = threading.Lock()
        self._exited = threading.Event()
        self._readers: List[threading.Thread] = []
        self._popen_args: Dict[str, Any] = {}
        self._prctl = _load_prctl()
        self._parent_pid = os.getpid()
        self._guard_pid: Optional[int] = None
        self._guard_fd: Optional[int] = None

    def prepare(self) -> Optional[str]:
        """Work out user, environment and directory. Returns an error text if the command
        must not run (unknown user, no right to switch users), else ``None``."""
        config = self.config
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(PRIVATE_ENV_PREFIXES)}
        if config.user:
            try:
                if config.user.isdigit():
                    account = pwd.getpwuid(int(config.user))
                else:
                    account = pwd.getpwnam(config.user)
            except KeyError:
                return "unknown user %r on %s; the command was not run" % (
                    config.user, config.machine)
            if account.pw_uid != os.geteuid():
                if os.geteuid() != 0:
                    return ("cannot run as user %r: the wrapper runs as uid %d, not root; "
                            "the command was not run" % (config.user, os.geteuid()))
                self._popen_args = {
                    "user": account.pw_uid,
                    "group": account.pw_gid,
                    "extra_groups": os.getgrouplist(account.pw_name, account.pw_gid),
                }
        else:
            account = pwd.getpwuid(os.geteuid())
        env.update({"HOME": account.pw_dir, "USER": account.pw_name,
                    "LOGNAME": account.pw_name, "SHELL": account.pw_shell or SHELL})
        env.update(config.env)
        env[COMMAND_ENV_VAR] = config.command
        self._popen_args["env"] = env
        # Like Salt's cmd.run: without a cwd the command starts in the user's home.
        if config.cwd:
            self._popen_args["cwd"] = config.cwd
        else:
            self._popen_args["cwd"] = account.pw_dir if os.path.isdir(account.pw_dir) else "/"
        return None

    def _child_setup(self) -> None:
        # Runs in the forked child after the privilege drop (which would clear the
        # setting): the command dies with the wrapper even if the wrapper is SIGKILLed.
        if self._prctl is not None:
            self._prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != self._parent_pid:
                os._exit(SIGNAL_RETCODE_BASE + signal.SIGKILL)

    def start(self) -> int:
        """Start the command (call from the main thread: PDEATHSIG follows the thread
        that forked). Returns its pid. Raises ``OSError`` if it cannot start."""
        self.proc = subprocess.Popen(
            [SHELL, "-c", SHELL_SCRIPT], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
            start_new_session=True, preexec_fn=self._child_setup, **self._popen_args)
        log.info("command started as pid %d", self.proc.pid)
        self._start_guard()
        return self.proc.pid

    def _start_guard(self) -> None:
        """Fork a watchdog that SIGKILLs the job's process group if the wrapper dies
        without saying goodbye (SIGKILL, crash). PDEATHSIG alone only reaches the shell,
        not the processes it started. Forked while the wrapper is still single-threaded.
        """
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_IGN)
                # Hold nothing of the wrapper's: not the caller's pipes, not the socket.
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                for fd in _open_fds():
                    if fd > 2 and fd != read_fd:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                received = b""
                chunk = os.read(read_fd, 64)
                while chunk:
                    received += chunk
                    chunk = os.read(read_fd, 64)
                if GUARD_RELEASE not in received:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            except BaseException:
                pass
            os._exit(0)
        os.close(read_fd)
        self._guard_pid, self._guard_fd = pid, write_fd

    def _release_guard(self) -> None:
        if self._guard_fd is None:
            return
        try:
            os.write(self._guard_fd, GUARD_RELEASE)
        except OSError:
            pass
        os.close(self._guard_fd)
        self._guard_fd = None
        try:
            os.waitpid(self._guard_pid, 0)
        except ChildProcessError:
            pass

    def stream(self) -> None:
        """Start reading the command's stdout and stderr (after ``start`` was queued, so
        no output message precedes it)."""
        for stream, pipe in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            reader = threading.Thread(target=self._read, args=(stream, pipe.fileno()),
                                      name="sp-read-%s" % stream, daemon=True)
            reader.start()
            self._readers.append(reader)

    def _read(self, stream: str, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except OSError:
                return
            if not data:
                return
            self.collector.add(stream, data)

    def _signal_group(self, signum: int) -> bool:
        try:
            os.killpg(self.proc.pid, signum)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def kill(self, reason: str) -> None:
        """SIGTERM the command's process group, SIGKILL it ``KILL_GRACE`` later."""
        with self._kill_lock:
            if self.proc is None or self._exited.is_set():
                return
            if self.kill_reason is None:
                self.kill_reason = reason
            self._signal_group(signal.SIGTERM)
        timer = threading.Timer(KILL_GRACE, self._kill_hard)
        timer.daemon = True
        timer.start()

    def _kill_hard(self) -> None:
        if self._signal_group(signal.SIGKILL):
            log.info("process group %d still alive %.0f s after SIGTERM: SIGKILL sent",
                     self.proc.pid, KILL_GRACE)

    def wait(self) -> int:
        """Wait for the shell, drain its pipes, kill what is left of its process group,
        and return the exit code to report."""
        returncode = self.proc.wait()
        with self._kill_lock:
            self._exited.set()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        # Background children may still hold the pipes or just run on: none may outlive
        # the job.
        self._signal_group(signal.SIGKILL)
        for reader in self._readers:
            reader.join(DRAIN_TIMEOUT)
        if any(reader.is_alive() for reader in self._readers):
            # A reader blocked in os.read() keeps its pipe; closing it under the reader
            # could hand the descriptor number to someone else.
            log.warning("output pipes still open (a process left the job's process group); "
                        "not waiting for them")
        else:
            self.proc.stdout.close()
            self.proc.stderr.close()
        self._release_guard()
        self.collector.flush(final=True)
        if self.kill_reason == "timeout":
            return RETCODE_TIMEOUT
        if self.kill_reason is not None:
            return RETCODE_KILLED
        if returncode < 0:
            return SIGNAL_RETCODE_BASE - returncode
        return returncode

    def tick_forever(self) -> None:
        """Flush coalesced output every ``OUTPUT_FLUSH_INTERVAL`` and send a heartbeat
        every ``HEARTBEAT_INTERVAL`` until the command exits."""
        next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL
        while not self._exited.wait(OUTPUT_FLUSH_INTERVAL):
            # While disconnected, output piles up into full-size messages instead.
            if self.session.connected.is_set():
                self.collector.flush()
                if time.monotonic() >= next_heartbeat:
                    self.session.send("heartbeat")
                    next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL


def run(config: Config) -> int:
    """One wrapper run after detaching: connect, run the command, report. Returns the
    wrapper's own exit code (0, or 255 when it never connected)."""
    deadline = time.monotonic() + config.connect_timeout
    ws = dial(config, deadline)
    if ws is None:
        log.error("never connected to %s within %.0f s; the command was not run",
                  config.url, config.connect_timeout)
        return EXIT_NOT_CONNECTED
    log.info("connected to %s", config.url)
    session = Session(config)
    session.send("connect", extra={"wrapper_version": WRAPPER_VERSION})
    job = Job(config, session)
    session.on_kill = job.kill
    try:
        problem = job.prepare()
        if problem is None:
            try:
                pid = job.start()
            except OSError as exc:
                problem = "cannot start the command: %s" % exc
        if problem is not None:
            log.error("%s", problem)
            session.send("error", error=problem)
            session.start(ws)
            session.finish()
            return EXIT_OK
        session.send("start", pid=pid)
        # Stopped from outside (say, the minion shuts down): stop the job the same way
        # as a kill from the server, and still report how it ended.
        signal.signal(signal.SIGTERM, lambda signum, frame: job.kill("shutdown"))
        job.stream()
        session.start(ws)
        ticker = threading.Thread(target=job.tick_forever, name="sp-tick", daemon=True)
        ticker.start()
        retcode = job.wait()
        ticker.join()
        log.info("command finished with exit code %d", retcode)
        session.send("complete", retcode=retcode, output=job.collector.tail())
    except Exception as exc:  # report, never die silently
        log.exception("wrapper failed")
        if job.proc is not None and job.proc.poll() is None:
            job.kill("user")
        session.send("error", error="wrapper error on %s: %s: %s"
                     % (config.machine, type(exc).__name__, exc))
        if not session.started:
            session.start(ws)
    session.finish()
    return EXIT_OK


def _open_fds() -> List[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, min(os.sysconf("SC_OPEN_MAX"), 65536)))


def detach(log_file: Optional[str]) -> bool:
    """Double fork into a new session. Returns False in the original process (once the
    grandchild is safely detached) and True in the detached grandchild, whose stdin is
    /dev/null, stdout/stderr the log file (or /dev/null), and no other inherited
    descriptor stays open. Raises ``OSError`` in the original process if detaching failed.
    """
    ready_read, ready_write = os.pipe()
    first = os.fork()
    if first > 0:
        os.close(ready_write)
        os.waitpid(first, 0)
        with os.fdopen(ready_read, "rb") as ready:
            if ready.read(1) != b"1":
                raise OSError("the detached wrapper died before it was ready")
        return False
    try:
        os.close(ready_read)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        out = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) \
            if log_file else null
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        # Salt's cmd.run waits until every copy of its pipes is closed.
        for fd in _open_fds():
            if fd > 2 and fd != ready_write:
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.write(ready_write, b"1")
        os.close(ready_write)
    except BaseException:
        os._exit(EXIT_DETACH_FAILED)
    return True


def setup_logging(config: Config) -> None:
    """Diagnostics go to stderr: the log file (or /dev/null) once detached."""
    where = ("%s on %s" % (config.job_instance, config.machine)).replace("%", "%%")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s sp-wrapper[%(process)d] %(levelname)s " + where + ": %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``sp-wrapper`` command. Returns 0 at once after detaching (2 on bad
    configuration); the detached process runs the job and never returns here."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return EXIT_OK
    try:
        config = parse_config(args, os.environ)
    except ConfigError as exc:
        sys.stderr.write("sp-wrapper: error: %s (see sp-wrapper --help)\n" % exc)
        return EXIT_USAGE
    if config.foreground:
        setup_logging(config)
        return run(config)
    try:
        if not detach(config.log_file):
            return EXIT_OK
    except OSError as exc:
        sys.stderr.write("sp-wrapper: error: cannot detach: %s\n" % exc)
        return EXIT_DETACH_FAILED
    code = EXIT_DETACH_FAILED
    try:
        setup_logging(config)
        code = run(config)
    except BaseException:
        logging.getLogger("saltpeter.wrapper").exception("wrapper crashed")
    finally:
        logging.shutdown()
        # Never return into the caller's code from the detached copy of the process.
        os._exit(code)
    return code  # not reached
