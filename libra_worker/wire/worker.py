"""The worker side of Gearman: every job server on one selectors loop.

Per job server: CAN_DO, then GRAB_JOB_UNIQ; NO_JOB → PRE_SLEEP; NOOP →
GRAB_JOB_UNIQ; JOB_ASSIGN(_UNIQ) → a Job for the caller; its reply is
WORK_COMPLETE (or WORK_FAIL), then the next GRAB_JOB_UNIQ.  A job server
earns at most one job at a time, and only by answering a grab.

One misbehaving server costs its own connection only:
- every request that must be answered (GRAB_JOB_UNIQ; ECHO_REQ, sent as a
  probe on a connection idle for `probe_interval`) has a deadline;
- any packet that breaks the protocol (wrong magic, oversized, unknown,
  missing fields, an answer nobody asked for, a NOOP flood, ERROR) downs
  the connection with one log line;
- a job for a function this worker did not register gets WORK_FAIL, a log
  line, and the connection is closed; it never runs;
- reconnects back off exponentially with jitter and the backoff resets only
  after the connection has stayed healthy (backoff.HEALTHY_AFTER);
- one WARNING when a server's trouble starts, one line when it answers
  again, and DEBUG for the repeats in between;
- a reply is confirmed when the server answers the request sent after it
  (gearmand handles a connection's packets in order); a connection lost
  before that is logged once as "reply may not have been delivered".

The caller runs jobs between calls (one at a time); the time it spends
away does not count against any server's deadlines.
"""
import logging
import os
import selectors
import time
from collections import deque

from libra_worker.wire import packets
from libra_worker.wire.backoff import Backoff
from libra_worker.wire.link import Link, LinkDown

LOG = logging.getLogger("libra_worker.gearman")

MAX_IDLE_TURN = 5.0           # seconds; the loop looks at its timers at least this often
AWAKE_NOOPS_ALLOWED = 16      # NOOPs while not asleep before it counts as a flood
EMPTY_WAKEUPS_ALLOWED = 100   # NOOP → GRAB → NO_JOB rounds per EMPTY_WAKEUP_WINDOW
EMPTY_WAKEUP_WINDOW = 10.0


class ProtocolFault(Exception):
    """A job server broke the protocol (one line)."""


class Job:
    __slots__ = ("handle", "function", "unique", "payload", "server", "_origin", "_generation")

    def __init__(self, handle, function, unique, payload, origin):
        self.handle, self.function, self.unique, self.payload = handle, function, unique, payload
        self.server = origin.label
        self._origin = origin
        self._generation = origin.generation

    @property
    def name(self):
        """The id a log line shows: the unique id when there is one, else the handle."""
        return (self.unique or self.handle).decode("utf-8", "replace")


class _Server:
    """One configured job server and the state of its connection."""

    def __init__(self, host, port, backoff):
        self.host, self.port = host, port
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.backoff = backoff
        self.link = None
        self.generation = 0
        self.retry_at = 0.0
        self.phase = "down"        # down, opening, grabbing, sleeping, busy
        self.grab_deadline = None
        self.echo_token = None
        self.echo_deadline = None
        self.last_heard = 0.0
        self.awake_noops = 0
        self.empty_wakeups = deque()
        self.woken = False
        self.proven = False
        self.unconfirmed = None    # the job (its log name) whose reply is not yet confirmed
        self.closing = None        # reason: close once the output is flushed
        self.trouble_since = None  # wall time the current run of trouble started
        self.trouble_logged_back = False
        self.ever_served = False


class Worker:
    def __init__(self, servers, function, *, client_id=b"libra_worker", tls_context=None,
                 reconnect_cap=60.0, timeout=10.0, probe_interval=30.0, keepalive=None,
                 clock=time.monotonic):
        self.function = function.encode() if isinstance(function, str) else function
        self.client_id = client_id.encode() if isinstance(client_id, str) else client_id
        self.tls_context = tls_context
        self.reconnect_cap = reconnect_cap
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.keepalive = keepalive
        self.clock = clock
        self.servers = []
        for host, port in servers:
            if any((s.host, s.port) == (host, port) for s in self.servers):
                raise ValueError(f"job server {host}:{port} given twice")
            self.servers.append(_Server(host, port, Backoff(reconnect_cap)))
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.ready = deque()
        self.stopping = False
        self._away_since = None
        self._echo_count = 0
        self._closed = False

    # -- the caller's API ----------------------------------------------------

    def stop(self):
        """Stop taking jobs (safe in a signal handler): next_job() returns None."""
        self.stopping = True
        self.wake()

    def wake(self):
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # the pipe is full (already woken) or closed
            pass

    def next_job(self):
        """Serve the job servers until one assigns a job; None once stopping."""
        self._resume()
        while not self.stopping:
            if self.ready:
                self._away_since = self.clock()
                return self.ready.popleft()
            self._turn()
        return None

    def reachable(self, job):
        """Is the connection the job came on still there?  (Reads what arrived during the job.)"""
        self._resume()
        self._turn(0)   # a close that arrived during the job is seen before the reply goes
        server = job._origin
        return server.generation == job._generation and server.link is not None and not server.closing

    def complete(self, job, data):
        """Send WORK_COMPLETE; False when the job's connection is known to be gone
        (call reachable() first to learn of a close that came during the job)."""
        return self._answer(job, packets.encode(packets.WORK_COMPLETE, job.handle, data))

    def fail(self, job):
        """Send WORK_FAIL; False when the job's connection is already gone."""
        return self._answer(job, packets.encode(packets.WORK_FAIL, job.handle))

    def close(self, timeout=5.0):
        """Stop, wait (at most `timeout`) until sent replies are confirmed, close everything."""
        if self._closed:
            return
        self.stopping = True
        self._resume()
        for job in self.ready:
            LOG.info("job %s from %s not run: stopping (the job server hands it out again)",
                     job.name, job.server)
        self.ready.clear()
        deadline = self.clock() + timeout
        while self.clock() < deadline and any(
                server.link is not None and (server.unconfirmed or server.link.sending)
                for server in self.servers):
            self._turn(max(0.0, deadline - self.clock()))
        for server in self.servers:
            if server.link is not None and server.unconfirmed:
                LOG.warning("job %s: job server %s did not confirm the reply before shutdown; "
                            "it may not have been delivered", server.unconfirmed, server.label)
            if server.link is not None:
                server.link.close()
                server.link = None
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._closed = True

    # -- answering a job -----------------------------------------------------

    def _answer(self, job, packet):
        self._resume()
        server = job._origin
        if server.generation != job._generation or server.link is None or server.closing:
            return False
        now = self.clock()
        try:
            server.unconfirmed = _text(job.name.encode())   # a failing send says so in its line
            server.link.send(packet, now)
            if self.stopping:
                self._probe(server, now)   # its ECHO_RES confirms the reply
            else:
                self._grab(server, now)
        except LinkDown as error:
            self._drop(server, str(error), now)
            return False
        return True

    # -- the loop --------------------------------------------------------------

    def _resume(self):
        """Back from running a job: the time away does not count against anyone."""
        if self._away_since is None:
            return
        away = self.clock() - self._away_since
        self._away_since = None
        for server in self.servers:
            for name in ("grab_deadline", "echo_deadline"):
                if getattr(server, name) is not None:
                    setattr(server, name, getattr(server, name) + away)
            server.last_heard += away
            if server.link is not None:
                server.link.shift(away)

    def _turn(self, limit=None):
        now = self.clock()
        timeout = self._next_timer(now) - now
        if limit is not None:
            timeout = min(timeout, limit)
        if any(server.link is not None and server.link.has_buffered_input for server in self.servers):
            timeout = 0
        events = self.selector.select(max(0.0, timeout))
        now = self.clock()
        for key, mask in events:
            if key.data is None:
                self._drain_wake()
            else:
                self._on_event(key.data.owner, key.data, mask, now)
        for server in self.servers:
            link = server.link
            if link is not None and link.has_buffered_input:
                self._on_event(server, link, selectors.EVENT_READ, now)
        for server in self.servers:
            self._timers(server, now)

    def _drain_wake(self):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _next_timer(self, now):
        times = [now + MAX_IDLE_TURN]
        for server in self.servers:
            if server.link is None:
                if not self.stopping:
                    times.append(server.retry_at)
                continue
            times.extend(t for t in (server.grab_deadline, server.echo_deadline, server.link.deadline())
                         if t is not None)
            if server.phase == "sleeping" and server.echo_token is None:
                times.append(server.last_heard + self.probe_interval)
        return min(times)

    def _on_event(self, server, link, mask, now):
        if server.link is not link:
            return
        try:
            found = link.on_event(mask, now)
            if link.is_open and server.phase == "opening":
                self._opened(server, now)
            for kind, body in found:
                if server.closing:
                    break
                self._on_packet(server, kind, body, now)
        except LinkDown as error:
            self._drop(server, str(error), now)
        except ProtocolFault as error:
            self._drop(server, f"protocol error: {error}", now)

    def _timers(self, server, now):
        if server.link is None:
            if not self.stopping and now >= server.retry_at:
                self._connect(server, now)
            return
        try:
            server.link.check(now)
            if server.link.is_open and server.phase == "opening":
                self._opened(server, now)
        except LinkDown as error:
            self._drop(server, str(error), now)
            return
        if server.closing and not server.link.sending:
            self._drop(server, server.closing, now)
            return
        if server.grab_deadline is not None and now >= server.grab_deadline:
            partial = server.link.reader.buffered
            self._drop(server, f"sent {partial} bytes of a packet and not the rest within {self.timeout:g}s"
                       if partial else f"did not answer GRAB_JOB_UNIQ within {self.timeout:g}s", now)
            return
        if server.echo_deadline is not None and now >= server.echo_deadline:
            self._drop(server, f"did not answer ECHO_REQ within {self.timeout:g}s", now)
            return
        if (server.phase == "sleeping" and server.echo_token is None
                and now - server.last_heard >= self.probe_interval):
            try:
                self._probe(server, now)
            except LinkDown as error:
                self._drop(server, str(error), now)
                return
        if server.backoff.tick(now):
            server.trouble_since = None
            server.trouble_logged_back = False

    # -- connection life -------------------------------------------------------

    def _connect(self, server, now):
        link = Link(server.host, server.port, self.selector, timeout=self.timeout,
                    cap=packets.WORKER_PACKET_CAP, tls_context=self.tls_context,
                    keepalive=self.keepalive, wake=self.wake,
                    discard_limit=packets.WORKER_DISCARD_LIMIT,
                    discard_kinds=(packets.JOB_ASSIGN, packets.JOB_ASSIGN_UNIQ))
        link.owner = server
        server.link = link
        server.generation += 1
        server.phase = "opening"
        server.proven = False
        server.closing = None
        server.unconfirmed = None
        server.echo_token = server.echo_deadline = server.grab_deadline = None
        server.awake_noops = 0
        server.empty_wakeups.clear()
        try:
            link.open(now)
            if link.is_open:
                self._opened(server, now)
        except LinkDown as error:
            self._drop(server, str(error), now)

    def _opened(self, server, now):
        """TCP (and TLS) is up: register and ask for work."""
        server.last_heard = now
        link = server.link
        link.send(packets.encode(packets.SET_CLIENT_ID, self.client_id), now)
        link.send(packets.encode(packets.CAN_DO, self.function), now)
        self._grab(server, now)

    def _grab(self, server, now):
        server.phase = "grabbing"
        server.grab_deadline = now + self.timeout
        server.link.send(packets.encode(packets.GRAB_JOB_UNIQ), now)

    def _probe(self, server, now):
        self._echo_count += 1
        server.echo_token = b"libra-probe-%d" % self._echo_count
        server.echo_deadline = now + self.timeout
        server.link.send(packets.encode(packets.ECHO_REQ, server.echo_token), now)

    def _drop(self, server, reason, now):
        if server.link is None:
            return
        server.link.close()
        server.link = None
        server.generation += 1
        server.phase = "down"
        server.grab_deadline = server.echo_deadline = server.echo_token = None
        delay = server.backoff.next_delay(now)
        server.retry_at = now + delay
        # What the loss cost goes into the one line about it (a hostile server repeats it).
        if server.unconfirmed is not None:
            reason += (f"; the reply to job {server.unconfirmed} may not have been delivered "
                       f"(the connection was lost before the server confirmed it)")
            server.unconfirmed = None
        lost = [job for job in self.ready if job._origin is server]
        for job in lost:
            self.ready.remove(job)
        if lost:
            reason += f"; job {', '.join(job.name for job in lost)} not run (the server went away before its turn)"
        if self.stopping:
            LOG.debug("job server %s: %s (stopping)", server.label, reason)
        elif server.trouble_since is None:
            server.trouble_since = time.time()
            LOG.warning("job server %s: %s; reconnecting with backoff (up to %gs)",
                        server.label, reason, self.reconnect_cap)
        else:
            LOG.debug("job server %s: %s; next attempt in %.1fs", server.label, reason, delay)

    def _proven(self, server, now):
        """The first answer on this connection: the server works."""
        server.proven = True
        server.backoff.connected(now)
        if server.trouble_since is None:
            (LOG.debug if server.ever_served else LOG.info)(
                "job server %s: serving %r", server.label, _text(self.function))
        elif not server.trouble_logged_back:
            server.trouble_logged_back = True
            LOG.warning("job server %s answers again after %.1fs", server.label,
                        time.time() - server.trouble_since)
        else:
            LOG.debug("job server %s answers again", server.label)
        server.ever_served = True

    # -- packets ---------------------------------------------------------------

    def _on_packet(self, server, kind, body, now):
        server.last_heard = now
        if kind == packets.NOOP:
            _fields(kind, body)
            self._on_noop(server, now)
            return
        if kind in (packets.NO_JOB, packets.JOB_ASSIGN, packets.JOB_ASSIGN_UNIQ):
            if server.phase != "grabbing":
                raise ProtocolFault(f"{packets.name_of(kind)} without a GRAB_JOB_UNIQ")
            fields = _fields(kind, body)
            if isinstance(body, packets.Truncated):
                fields = _oversized(kind, fields, body)
            self._answered(server, now)
            server.grab_deadline = None
            server.awake_noops = 0
            if kind == packets.NO_JOB:
                self._on_no_job(server, now)
            elif kind == packets.JOB_ASSIGN:
                self._on_assign(server, fields[0], fields[1], b"", fields[2], now)
            else:
                self._on_assign(server, *fields, now)
            return
        if kind == packets.ECHO_RES:
            fields = _fields(kind, body)
            if server.echo_token is None or fields[0] != server.echo_token:
                raise ProtocolFault("ECHO_RES that answers no ECHO_REQ")
            server.echo_token = server.echo_deadline = None
            self._answered(server, now)
            return
        if kind == packets.ERROR:
            code, text = _fields(kind, body)
            raise ProtocolFault(f"ERROR {_text(code)}: {_text(text)}")
        raise ProtocolFault(f"unexpected {packets.name_of(kind)}")

    def _answered(self, server, now):
        if not server.proven:
            self._proven(server, now)
        server.unconfirmed = None

    def _on_noop(self, server, now):
        if server.phase == "sleeping":
            server.woken = True
            self._grab(server, now)
            return
        server.awake_noops += 1
        if server.awake_noops > AWAKE_NOOPS_ALLOWED:
            raise ProtocolFault(f"NOOP flood ({server.awake_noops} NOOPs while awake)")

    def _on_no_job(self, server, now):
        if server.woken:
            wakeups = server.empty_wakeups
            wakeups.append(now)
            while wakeups and now - wakeups[0] > EMPTY_WAKEUP_WINDOW:
                wakeups.popleft()
            if len(wakeups) > EMPTY_WAKEUPS_ALLOWED:
                raise ProtocolFault(f"NOOP flood ({len(wakeups)} wake-ups without a job "
                                    f"in {EMPTY_WAKEUP_WINDOW:g}s)")
        server.woken = False
        server.phase = "sleeping"
        server.link.send(packets.encode(packets.PRE_SLEEP), now)

    def _on_assign(self, server, handle, function, unique, payload, now):
        server.woken = False
        if not handle:
            raise ProtocolFault(f"{_text(function)!r} job without a handle")
        if function != self.function:
            server.link.send(packets.encode(packets.WORK_FAIL, handle), now)
            LOG.warning("job server %s assigned job %s for function %r, which this worker did not "
                        "register: refused with WORK_FAIL, not run", server.label,
                        _text(unique or handle), _text(function))
            server.phase = "busy"
            server.closing = "assigned a job for a function this worker did not register"
            return
        server.phase = "busy"
        self.ready.append(Job(handle, function, unique, payload, server))


class OversizedPayload(bytes):
    """Stands for a payload that was read past, not kept: empty, but len() is its size.

    The controller refuses it as too large (or, reading it, as empty), so
    the job still gets its FAIL reply.
    """

    def __new__(cls, size):
        payload = super().__new__(cls, b"")
        payload.size = size
        return payload

    def __len__(self):
        return self.size


def _oversized(kind, fields, body):
    """The fields of a JOB_ASSIGN(_UNIQ) whose payload was read past."""
    head, payload = fields[:-1], fields[-1]
    if not payload and len(b"\0".join(head)) + len(head) >= len(body):
        raise ProtocolFault(f"oversized {packets.name_of(kind)} whose first "
                            f"{len(body)} bytes do not hold its handle and function")
    size = body.declared - sum(len(field) for field in head) - len(head)
    return (*head, OversizedPayload(size))


def _fields(kind, body):
    try:
        return packets.split(kind, body)
    except packets.ProtocolError as error:
        raise ProtocolFault(str(error)) from None


def _text(data, limit=80):
    """Bytes from the network, safe for one log line."""
    return data.decode("utf-8", "replace").encode("unicode_escape").decode("ascii")[:limit]
