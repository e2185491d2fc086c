"""The client side of Gearman, as bin/client.py needs it: one foreground job.

SUBMIT_JOB goes to the first job server that connects and answers
JOB_CREATED (the next one is tried when a server is down or refuses);
then WORK_DATA is gathered until WORK_COMPLETE, WORK_FAIL or
WORK_EXCEPTION for that handle.  The reply is WORK_COMPLETE's data (the
WORK_DATA partial results when it carries none).  WORK_STATUS and WORK_WARNING are noted
and ignored.  Everything runs under one overall deadline on the same
non-blocking Link as the worker.
"""
import selectors
import time
from dataclasses import dataclass, field
from typing import List

from libra_worker.wire import packets
from libra_worker.wire.link import Link, LinkDown

CLIENT_PACKET_CAP = 64 * 1024 * 1024   # a reply echoes a request of up to 4 MiB, and adds to it


class ClientError(Exception):
    """No reply: str() says why, in one line."""


@dataclass
class Outcome:
    status: str                     # "complete", "fail" or "exception"
    data: bytes
    handle: bytes
    server: str
    warnings: List[bytes] = field(default_factory=list)


def submit(servers, function, payload, *, unique=b"", timeout=30.0, connect_timeout=5.0,
           tls_context=None, clock=time.monotonic):
    """Send one foreground job and wait for its end; returns an Outcome or raises ClientError."""
    deadline = clock() + timeout
    function = function.encode() if isinstance(function, str) else function
    unique = unique.encode() if isinstance(unique, str) else unique
    problems = []
    for host, port in servers:
        if clock() >= deadline:
            break
        with _Session(host, port, min(connect_timeout, timeout), tls_context, clock) as session:
            try:
                handle = session.create(function, unique, payload, deadline)
            except LinkDown as error:
                problems.append(f"{session.link.label}: {error}")
                continue
            try:
                return session.wait(handle, deadline)
            except LinkDown as error:
                raise ClientError(f"job server {session.link.label} went away before the reply "
                                  f"({error})") from None
    if not problems:
        raise ClientError(f"no reply within {timeout:g}s")
    raise ClientError("no job server took the job: " + "; ".join(problems))


class _Session:
    def __init__(self, host, port, connect_timeout, tls_context, clock):
        self.clock = clock
        self.selector = selectors.DefaultSelector()
        self.link = Link(host, port, self.selector, timeout=connect_timeout, cap=CLIENT_PACKET_CAP,
                         tls_context=tls_context, magic=packets.RES)
        self.pending = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.link.close()
        self.selector.close()

    def _packets(self, deadline, what):
        """Wait for the next packets; LinkDown on close, error or deadline."""
        while not self.pending:
            now = self.clock()
            if now >= deadline:
                raise _Timeout(what)
            self.link.check(now)
            limit = deadline - now
            link_deadline = self.link.deadline()
            if link_deadline is not None:
                limit = min(limit, max(0.0, link_deadline - now))
            if self.link.state == "resolving":
                limit = min(limit, 0.05)
            if self.link.has_buffered_input:
                limit = 0
            for _, mask in self.selector.select(limit):
                self.pending.extend(self.link.on_event(mask, self.clock()))
            if self.link.has_buffered_input:
                self.pending.extend(self.link.on_event(selectors.EVENT_READ, self.clock()))
        found, self.pending = self.pending, []
        return found

    def create(self, function, unique, payload, deadline):
        self.link.open(self.clock())
        self.link.send(packets.encode(packets.SUBMIT_JOB, function, unique, payload), self.clock())
        # The link's timeout bounds the connect; JOB_CREATED gets the same time after it.
        answer_by = min(deadline, self.clock() + 2 * self.link.timeout)
        while True:
            try:
                found = self._packets(answer_by, "JOB_CREATED")
            except _Timeout as timeout:
                raise LinkDown(f"no {timeout} within {self.link.timeout * 2:g}s") from None
            for index, (kind, body) in enumerate(found):
                if kind == packets.JOB_CREATED:
                    (handle,) = _split(kind, body)
                    self.pending = found[index + 1:]
                    return handle
                if kind == packets.ERROR:
                    code, text = _split(kind, body)
                    raise LinkDown(f"ERROR {_text(code)}: {_text(text)}")
                if kind != packets.NOOP:
                    raise LinkDown(f"protocol error: {packets.name_of(kind)} before JOB_CREATED")

    def wait(self, handle, deadline):
        chunks, warnings = [], []
        while True:
            try:
                found = self._packets(deadline, "reply")
            except _Timeout:
                raise ClientError(f"no reply within the time-out (job {_text(handle)} on "
                                  f"{self.link.label})") from None
            for kind, body in found:
                if kind in (packets.NOOP, packets.ECHO_RES):
                    continue
                fields = _split(kind, body)
                if fields[0] != handle:
                    continue        # another job's news on a shared server: not ours
                if kind == packets.WORK_DATA:
                    chunks.append(fields[1])
                elif kind == packets.WORK_WARNING:
                    warnings.append(fields[1])
                elif kind == packets.WORK_STATUS:
                    pass
                elif kind == packets.WORK_COMPLETE:
                    # WORK_DATA are partial results; the reply is WORK_COMPLETE's, or theirs when it has none.
                    data = fields[1] if fields[1] or not chunks else b"".join(chunks)
                    return Outcome("complete", data, handle, self.link.label, warnings)
                elif kind == packets.WORK_FAIL:
                    return Outcome("fail", b"".join(chunks), handle, self.link.label, warnings)
                elif kind == packets.WORK_EXCEPTION:
                    return Outcome("exception", fields[1], handle, self.link.label, warnings)
                else:
                    raise LinkDown(f"protocol error: unexpected {packets.name_of(kind)}")


class _Timeout(Exception):
    pass


def _split(kind, body):
    try:
        return packets.split(kind, body)
    except packets.ProtocolError as error:
        raise LinkDown(f"protocol error: {error}") from None


def _text(data, limit=120):
    return data.decode("utf-8", "replace").encode("unicode_escape").decode("ascii")[:limit]

