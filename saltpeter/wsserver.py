"""The WebSocket server process: where wrappers report.

One asyncio loop serves every wrapper connection. Per (instance, machine) a
``WrapperSession`` outlives connections (a wrapper may reconnect) and holds the spool
file, the output tail, the highest sequence number seen and any pending kill.

What reaches the shared state, and how often:
- output tails, batched per job every ``STATE_FLUSH_INTERVAL`` (one round trip per job);
- liveness (last message time, connected), batched per instance about once a second;
- final results at once, through ``state.finish_machine``.
Manager calls block, so they run in a worker thread, never on the event loop.
"""

import asyncio
import logging
import os
import signal
import threading
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Set, Tuple

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from saltpeter import state as shared_state
from saltpeter.auth import TokenChecker
from saltpeter.constants import (HEARTBEAT_LOSS_AFTER, RETCODE_KILLED, RETCODE_NO_RESPONSE,
                                 RETCODE_TIMEOUT, STATE_FLUSH_INTERVAL)
from saltpeter.records import load_instances
from saltpeter.spool import (SpoolFile, read_tail, restore_checkpoint, save_checkpoint,
                             save_result, spool_path)
from wrapper.protocol import ProtocolError, encode, parse_message, server_message

log = logging.getLogger(__name__)

LIVENESS_SWEEP_INTERVAL = 1.0    # how often silent wrappers are looked for
ACK_DELAY = 0.1                  # acks are cumulative: one per connection per 100 ms
# A final report is acked at once (the wrapper waits for it to exit). A heartbeat alone
# carries nothing to resend, so its ack only lets the wrapper drop the heartbeats it
# keeps until acked: one ack per 5 minutes holds that at 60 small messages, and 10,000
# idle wrappers cost 33 acks a second. Any other message brings its ack within ACK_DELAY.
HEARTBEAT_ACK_DELAY = 300.0
ACK_DELAYS = {"complete": 0.0, "error": 0.0, "heartbeat": HEARTBEAT_ACK_DELAY}
# Connections the kernel holds for the server before it accepts them. asyncio's default
# of 100 overflowed when a job launched on 5,000 machines and all their wrappers dialled
# back at once: the kernel dropped the overflow, and some of those wrappers were still
# not connected a minute later (255). The kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 4096
MAX_BAD_MESSAGES = 10            # a connection that sends this many bad messages is closed
# A wrapper sends ``connect`` as soon as it is connected (and again after a reconnect); a
# connection with no accepted message by then is idle or hostile and would hold a socket
# and its buffers for ever.
FIRST_MESSAGE_TIMEOUT = 10.0
# Our wrapper's frames stay under 1 MiB; a seed-protocol wrapper may put a whole output
# in ``complete``. A bad client is closed at its first message for an unknown instance,
# or at its MAX_BAD_MESSAGES-th bad one, so it holds at most that many frames of this size.
# A smaller receive queue would throttle floods harder but stalls closing handshakes.
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
RECEIVE_QUEUE_FRAMES = 64
KILL_RETCODES = {"timeout": RETCODE_TIMEOUT, "user": RETCODE_KILLED}

SessionKey = Tuple[str, str]


class WrapperSession:
    """Everything the server knows about one machine of one running instance."""

    def __init__(self, job_name: str, instance: str, machine: str, statedir: str):
        self.job_name = job_name
        self.instance = instance
        self.machine = machine
        self.spool = SpoolFile(spool_path(statedir, instance, machine))
        self.last_seq = 0
        self.checkpointed_size = 0       # spool size covered by the on-disk checkpoint
        self.connection = None
        self.last_seen = 0.0
        self.kill_reason: Optional[str] = None
        self.kill_sent = False
        self.finished = False
        self.published_lost = False      # what liveness in the shared state shows of it

    def is_lost(self, now: float) -> bool:
        """Reported in this daemon's life, not finished, and silent for too long."""
        return (self.last_seen > 0 and not self.finished
                and now - self.last_seen > HEARTBEAT_LOSS_AFTER)

    def liveness(self, now: float) -> Dict:
        """Has the wrapper reported in this daemon's life, and has it gone silent?"""
        return {"seen": self.last_seen > 0, "lost": self.is_lost(now)}


class WebSocketServer:
    """Accepts wrapper connections and records what they report.

    ``key``: the daemon key; when given, every message must carry the instance's token.
    ``ssl_context``: serve ``wss://``.
    """

    def __init__(self, shared, host: str, port: int, max_frame: int = DEFAULT_MAX_FRAME,
                 key: Optional[bytes] = None, ssl_context=None):
        self.shared = shared
        self.host = host
        self.port = port
        self.max_frame = max_frame
        self.tokens = TokenChecker(key) if key is not None else None
        self.ssl_context = ssl_context
        self.sessions: Dict[SessionKey, WrapperSession] = {}
        self.instance_jobs: Dict[str, str] = {}
        self.liveness_dirty: Set[WrapperSession] = set()
        self.output_dirty: Set[WrapperSession] = set()
        self.finals: List[Tuple[str, str, str, int, datetime]] = []
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.stopping: Optional[asyncio.Event] = None

    # ------------------------------------------------------------ lifecycle

    async def serve_forever(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)
        self.adopt_recorded_instances()
        threading.Thread(target=self._read_commands, name="ws-commands", daemon=True).start()
        async with serve(self.handle_connection, self.host, self.port, ssl=self.ssl_context,
                         max_size=self.max_frame, compression=None, ping_interval=None,
                         open_timeout=10, close_timeout=2,
                         max_queue=RECEIVE_QUEUE_FRAMES, backlog=LISTEN_BACKLOG):
            log.info("WebSocket server listening on %s:%d", self.host, self.port)
            flusher = asyncio.create_task(self._flush_loop())
            await self.stopping.wait()
            flusher.cancel()
            await self._flush_once()
        for session in self.sessions.values():
            if not session.finished:
                self._checkpoint(session)
            session.spool.close()
        log.info("WebSocket server stopped")

    def adopt_recorded_instances(self) -> None:
        """After a restart: know the instances still running from the last daemon, with
        their output so far and the last sequence number acknowledged, so that their
        wrappers can reconnect and carry on without loss or duplicates."""
        statedir = self.shared.statedir
        for record in load_instances(statedir):
            instance, job_name = record["instance"], record["job_name"]
            logged = set(record.get("logged", ()))
            self.instance_jobs[instance] = job_name
            for machine in record.get("launched", {}):
                if machine in logged:
                    continue
                session = self._session_for(instance, machine, job_name)
                session.last_seq = restore_checkpoint(session.spool)
                session.checkpointed_size = session.spool.size
                if os.path.exists(session.spool.path + ".result"):
                    session.finished = True
            log.info("instance %s: adopted from the previous daemon run", instance)

    def _read_commands(self) -> None:
        """Thread: blocking reads of the command queue, handed to the loop."""
        while True:
            try:
                command = self.shared.ws_commands.get()
            except (EOFError, OSError):
                return
            if command is None:
                return
            self.loop.call_soon_threadsafe(self.on_command, command)

    def on_command(self, command) -> None:
        kind = command[0]
        if kind == "register":
            _, instance, job_name, machines = command
            self.instance_jobs[instance] = job_name
            for machine in machines:
                self._session_for(instance, machine, job_name)
        elif kind == "forget":
            self.forget_instance(command[1])
        elif kind == "kill":
            _, instance, machines, reason = command
            for machine in machines:
                session = self.sessions.get((instance, machine))
                if session is None or session.finished:
                    continue
                session.kill_reason = session.kill_reason or reason
                if session.connection is not None:
                    asyncio.ensure_future(self._send_kill(session))
                else:
                    log.info("instance %s machine %s: kill (%s) pending until the wrapper "
                             "connects", instance, machine, reason)
        else:
            log.error("WebSocket server: unknown command %r", kind)

    def forget_instance(self, instance: str) -> None:
        self.instance_jobs.pop(instance, None)
        if self.tokens is not None:
            self.tokens.forget(instance)
        for key in [key for key in self.sessions if key[0] == instance]:
            self.sessions.pop(key).spool.close()

    def _session_for(self, instance: str, machine: str, job_name: str) -> WrapperSession:
        key = (instance, machine)
        session = self.sessions.get(key)
        if session is None:
            session = WrapperSession(job_name, instance, machine, self.shared.statedir)
            self.sessions[key] = session
        return session

    async def _session_from_running(self, instance: str,
                                    machine: str) -> Optional[WrapperSession]:
        """The session for a message of a machine not registered (yet), or None if this
        daemon did not launch that machine of that instance. Registration normally
        arrives first; the running table is the fallback for a wrapper quicker than the
        command queue."""
        entry = await asyncio.to_thread(self.shared.running.get, instance)
        if not entry or machine not in entry.get("machines", ()):
            return None
        self.instance_jobs[instance] = entry["name"]
        return self._session_for(instance, machine, entry["name"])

    # ------------------------------------------------------------ connections

    async def handle_connection(self, connection) -> None:
        peer = connection.remote_address
        bad_messages = 0
        bound: Set[WrapperSession] = set()
        ack_state = {"handle": None, "due": 0.0}
        first_message_deadline = asyncio.get_running_loop().call_later(
            FIRST_MESSAGE_TIMEOUT, self._close_silent, connection)
        try:
            async for frame in connection:
                try:
                    message = parse_message(frame)
                except ProtocolError as exc:
                    bad_messages += 1
                    log.warning("WebSocket client %s: bad message: %s", peer, exc)
                    await connection.send(encode(server_message("error", error=str(exc))))
                    if bad_messages >= MAX_BAD_MESSAGES:
                        await connection.close(1008, "too many bad messages")
                        return
                    continue
                session = self.sessions.get((message.job_instance, message.machine))
                if session is None:
                    session = await self._session_from_running(message.job_instance,
                                                               message.machine)
                if session is None or message.job_name != session.job_name:
                    log.warning("WebSocket client %s: refused %s message for unknown job "
                                "instance %r machine %r (job %r)", peer, message.type,
                                message.job_instance, message.machine, message.job_name)
                    await connection.send(encode(server_message(
                        "error", error="unknown job instance %r for machine %r"
                        % (message.job_instance, message.machine))))
                    await connection.close(1008, "unknown job instance")
                    return
                if self.tokens is not None and not self.tokens.is_valid(session.instance,
                                                                        message.token):
                    log.warning("WebSocket client %s: refused %s message for instance %s "
                                "machine %s: missing or invalid token", peer, message.type,
                                session.instance, session.machine)
                    await connection.send(encode(server_message(
                        "error", error="authentication failed for instance %r"
                        % session.instance)))
                    await connection.close(1008, "authentication failed")
                    return
                first_message_deadline.cancel()
                if session.connection is not connection:
                    session.connection = connection
                    bound.add(session)
                self._handle_message(session, message)
                if message.seq is not None:
                    self._schedule_ack(connection, session, ack_state,
                                       ACK_DELAYS.get(message.type, ACK_DELAY))
                if session.kill_reason and not session.kill_sent and not session.finished:
                    await self._send_kill(session)
        except ConnectionClosed:
            pass
        finally:
            first_message_deadline.cancel()
            if ack_state["handle"] is not None:   # nothing to ack on a closed connection,
                ack_state["handle"].cancel()      # and a pending ack would hold it 5 min
            for session in bound:
                if session.connection is connection:
                    session.connection = None
                    if not session.finished:
                        log.info("instance %s machine %s: wrapper disconnected",
                                 session.instance, session.machine)

    def _close_silent(self, connection) -> None:
        log.warning("WebSocket client %s: no accepted message within %.0f s of connecting; "
                    "closing", connection.remote_address, FIRST_MESSAGE_TIMEOUT)
        asyncio.ensure_future(connection.close(1008, "no accepted message in time"))

    def _schedule_ack(self, connection, session: WrapperSession, ack_state,
                      delay: float) -> None:
        """Send a cumulative ack within ``delay`` seconds, unless one is due sooner."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if ack_state["handle"] is not None:
            if ack_state["due"] <= due:
                return
            ack_state["handle"].cancel()

        def fire():
            ack_state["handle"] = None
            asyncio.ensure_future(self._send_ack(connection, session))
        ack_state["due"] = due
        ack_state["handle"] = loop.call_later(delay, fire)

    async def _send_ack(self, connection, session: WrapperSession) -> None:
        if not session.finished:
            # acknowledge only what is on disk: a crash must not lose acked output
            self._checkpoint(session)
        try:
            await connection.send(encode(server_message("ack", ack=session.last_seq)))
        except ConnectionClosed:
            pass

    @staticmethod
    def _checkpoint(session: WrapperSession) -> None:
        """Put on disk the seq an ack covers, if output came since the last checkpoint.

        Without new output the last checkpoint still covers every acked byte: after a
        crash the wrapper resends only messages past its ack, and those between the two
        seqs held no output, so nothing is lost or doubled. A heartbeat-only wrapper
        (which has no spool directory) thus costs no file write per ack."""
        if session.spool.size != session.checkpointed_size:
            save_checkpoint(session.spool, session.last_seq)
            session.checkpointed_size = session.spool.size

    async def _send_kill(self, session: WrapperSession) -> None:
        connection = session.connection
        if connection is None:
            return
        session.kill_sent = True
        log.info("instance %s machine %s: sending kill (%s) to the wrapper",
                 session.instance, session.machine, session.kill_reason)
        try:
            await connection.send(encode(server_message(
                "kill", reason=session.kill_reason, job_name=session.job_name,
                job_instance=session.instance, machine=session.machine)))
        except ConnectionClosed:
            session.kill_sent = False

    # ------------------------------------------------------------ messages

    def _handle_message(self, session: WrapperSession, message) -> None:
        """Apply one valid message to its session (on the event loop; no blocking I/O
        but buffered spool writes)."""
        if message.seq is not None:
            if message.seq <= session.last_seq:
                return  # a re-sent message we already have
            session.last_seq = message.seq
        if not session.last_seen or session.published_lost:
            self.liveness_dirty.add(session)   # seen for the first time, or back
        session.last_seen = time.time()
        if session.finished:
            return
        kind = message.type
        if kind == "connect":
            log.info("instance %s machine %s: wrapper connected", session.instance,
                     session.machine)
        elif kind == "start":
            log.info("instance %s machine %s: command started (pid %s)", session.instance,
                     session.machine, message.pid)
        elif kind == "output":
            self._append_output(session, message.data)
        elif kind == "complete":
            if session.spool.size == 0 and message.output:
                self._append_output(session, message.output)
            retcode = KILL_RETCODES.get(session.kill_reason, message.retcode)
            self._finish(session, retcode)
        elif kind == "error":
            log.error("instance %s machine %s: wrapper error: %s", session.instance,
                      session.machine, message.error)
            self._append_output(session, "\n[saltpeter] wrapper error: %s\n" % message.error)
            self._finish(session, RETCODE_NO_RESPONSE)

    def _append_output(self, session: WrapperSession, data: str) -> None:
        if not data:
            return
        session.spool.write(data.encode("utf-8", "surrogateescape"))
        self.output_dirty.add(session)

    def _finish(self, session: WrapperSession, retcode: int) -> None:
        """The machine's result is final: on disk now (before ``complete`` is acked), in
        the shared state at the next flush, together with every other result by then."""
        session.finished = True
        self.output_dirty.discard(session)
        session.spool.close()
        endtime = datetime.now(timezone.utc)
        save_result(session.spool, retcode, endtime.isoformat())
        self.finals.append((session.job_name, session.instance, session.machine, retcode,
                            endtime))

    # ------------------------------------------------------------ batching to state

    async def _flush_loop(self) -> None:
        last_sweep = 0.0
        while True:
            await asyncio.sleep(STATE_FLUSH_INTERVAL)
            sweep = time.monotonic() - last_sweep >= LIVENESS_SWEEP_INTERVAL
            if sweep:
                last_sweep = time.monotonic()
            try:
                await self._flush_once(sweep)
            except Exception:
                log.exception("WebSocket server: flushing state failed")

    async def _flush_once(self, sweep: bool = True) -> None:
        """Output to disk (where the API reads it), final results and liveness changes to
        the shared state: one round trip per job with results, one per changed instance."""
        dirty_sessions, self.output_dirty = self.output_dirty, set()
        for session in dirty_sessions:
            session.spool.flush()
        if sweep:
            # Wrappers gone silent since the last sweep. The way back (a message from a
            # wrapper shown lost, or its end) is marked by _handle_message, so this pass
            # is one cheap test per session, without building anything for it.
            now = time.time()
            self.liveness_dirty.update(
                session for session in self.sessions.values()
                if not session.published_lost and session.is_lost(now))
        liveness: Dict[str, Dict[str, Dict]] = {}
        dirty, self.liveness_dirty = self.liveness_dirty, set()
        now = time.time()
        for session in dirty:
            published = session.liveness(now)
            session.published_lost = published["lost"]
            liveness.setdefault(session.instance, {})[session.machine] = published
        finals, self.finals = self.finals, []
        if finals or liveness:
            await asyncio.to_thread(self._write_state, finals, liveness)

    def _write_state(self, finals, liveness) -> None:
        by_job: Dict[str, List] = {}
        for job_name, instance, machine, retcode, endtime in finals:
            ret = read_tail(spool_path(self.shared.statedir, instance, machine),
                            self.shared.ret_cap).text()
            by_job.setdefault(job_name, []).append((instance, machine, retcode, ret, endtime))
        for job_name, results in by_job.items():
            recorded = set(shared_state.finish_machines(self.shared, job_name, results))
            for instance, machine, retcode, _, _ in results:
                if machine in recorded:
                    log.info("instance %s machine %s: finished with exit code %s", instance,
                             machine, retcode)
                else:
                    log.info("instance %s machine %s: result was already final; report of "
                             "exit code %s ignored", instance, machine, retcode)
        if liveness:
            shared_state.publish_liveness(self.shared, liveness)


def run_websocket_server(shared, host: str, port: int, max_frame: int = DEFAULT_MAX_FRAME,
                         key: Optional[bytes] = None, ssl_context=None):
    """Process entry point: serve until SIGTERM."""
    logging.getLogger("websockets").setLevel(logging.WARNING)
    server = WebSocketServer(shared, host, port, max_frame, key, ssl_context)
    try:
        asyncio.run(server.serve_forever())
    except OSError as exc:
        log.error("WebSocket server cannot listen on %s:%d: %s", host, port, exc)
        os._exit(1)

