"""Gearman packets: types, encoding, and an incremental reader with a size cap.

Pure: no sockets here.  The reader refuses a packet as soon as its header
declares more than the cap, so a hostile "2 GB body" costs 12 bytes, and it
parses from an offset into one buffer (no re-slicing per packet), so a flood
of small packets costs what it reads.
"""
import struct

REQ = b"\0REQ"
RES = b"\0RES"
HEADER = struct.Struct(">4sII")

# Packet types used here (numbers from the protocol document).
CAN_DO = 1
PRE_SLEEP = 4
NOOP = 6
SUBMIT_JOB = 7
JOB_CREATED = 8
GRAB_JOB = 9
NO_JOB = 10
JOB_ASSIGN = 11
WORK_STATUS = 12
WORK_COMPLETE = 13
WORK_FAIL = 14
ECHO_REQ = 16
ECHO_RES = 17
ERROR = 19
SET_CLIENT_ID = 22
WORK_EXCEPTION = 25
WORK_DATA = 28
WORK_WARNING = 29
GRAB_JOB_UNIQ = 30
JOB_ASSIGN_UNIQ = 31

NAMES = {value: name for name, value in globals().items()
         if name.isupper() and isinstance(value, int) and name != "HEADER"}

# How many NUL-separated arguments each packet a client or worker receives has.
ARGUMENTS = {
    NOOP: 0, NO_JOB: 0, JOB_CREATED: 1, ECHO_RES: 1, ERROR: 2,
    JOB_ASSIGN: 3, JOB_ASSIGN_UNIQ: 4,
    WORK_COMPLETE: 2, WORK_FAIL: 1, WORK_EXCEPTION: 2, WORK_DATA: 2,
    WORK_WARNING: 2, WORK_STATUS: 3,
}

# Headers, handles, function names and unique ids on top of the largest
# payload a job may carry (controller.MAX_PAYLOAD_BYTES is 4 MiB).
MAX_PAYLOAD = 4 * 1024 * 1024
ENVELOPE = 64 * 1024
WORKER_PACKET_CAP = MAX_PAYLOAD + ENVELOPE
# A job a little too large (a client's mistake, not an attack) still gets an
# answer: up to this size its body is read past, not kept, and the job is
# handed over as oversized.  Beyond it, the header alone drops the connection.
WORKER_DISCARD_LIMIT = 64 * 1024 * 1024


class ProtocolError(Exception):
    """The peer broke the protocol; the message says how, in one line."""


def name_of(kind):
    return NAMES.get(kind, f"type {kind}")


def encode(kind, *arguments, magic=REQ):
    """One packet: magic, type, size, arguments joined by NUL."""
    body = b"\0".join(arguments)
    return HEADER.pack(magic, kind, len(body)) + body


def split(kind, body):
    """A body → its arguments; ProtocolError when fields are missing."""
    count = ARGUMENTS.get(kind)
    if count is None:
        raise ProtocolError(f"unexpected packet {name_of(kind)}")
    if kind == WORK_FAIL:   # Perl's Gearman::Worker sends "handle\0": only the handle counts
        return (body.split(b"\0", 1)[0],)
    if count == 0:
        if body:
            raise ProtocolError(f"{name_of(kind)} with a {len(body)}-byte body")
        return ()
    fields = body.split(b"\0", count - 1)
    if len(fields) != count:
        raise ProtocolError(f"{name_of(kind)} with {len(fields)} of its {count} fields")
    return tuple(fields)


class Truncated(bytes):
    """The first ENVELOPE bytes of an oversized body; `declared` is its full size."""

    declared = 0


class Reader:
    """Bytes in, (type, body) packets out; at most `cap` body bytes per packet.

    feed() raises ProtocolError on a wrong magic, an unknown or oversized
    packet; the connection is then unusable.  `partial` tells whether an
    incomplete packet is buffered (the caller puts a deadline on it).
    With `discard_limit`, a packet of a `discard_kinds` type declaring up to
    that much is kept only up to ENVELOPE bytes; the rest is read past and
    the packet comes out with a Truncated body.
    """

    def __init__(self, cap, magic=RES, discard_limit=0, discard_kinds=()):
        self.cap = cap
        self.magic = magic
        self.discard_limit = discard_limit
        self.discard_kinds = discard_kinds
        self._buffer = bytearray()
        self._offset = 0
        self._skip = 0            # body bytes still to read past
        self._skipped = None      # (kind, Truncated head) being read past

    @property
    def partial(self):
        return len(self._buffer) > self._offset or self._skipped is not None

    @property
    def buffered(self):
        return len(self._buffer) - self._offset

    def _read_past(self, data, packets):
        """While skipping: drop what belongs to the oversized body; the rest of data."""
        taken = min(self._skip, len(data))
        self._skip -= taken
        if self._skip == 0:
            packets.append(self._skipped)
            self._skipped = None
        return data[taken:]

    def feed(self, data):
        """Append data; return the complete packets now available, in order."""
        packets = []
        if self._skipped is not None:
            data = self._read_past(data, packets)
            if not data:
                return packets
        buffer = self._buffer
        buffer += data
        offset = self._offset
        end = len(buffer)
        try:
            while end - offset >= 4:
                if buffer[offset:offset + 4] != self.magic:
                    raise ProtocolError(f"bytes without the {self.magic!r} magic: "
                                        f"{bytes(buffer[offset:offset + 12])!r}")
                if end - offset < HEADER.size:
                    break
                _, kind, size = HEADER.unpack_from(buffer, offset)
                if kind not in NAMES:
                    raise ProtocolError(f"unknown packet type {kind}")
                if size > self.cap:
                    if kind not in self.discard_kinds or size > self.discard_limit:
                        raise ProtocolError(f"{name_of(kind)} declares {size} bytes (cap {self.cap})")
                    if end - offset < HEADER.size + ENVELOPE:
                        break    # wait for the head: handle, function, unique id
                    start = offset + HEADER.size
                    head = Truncated(buffer[start:start + ENVELOPE])
                    head.declared = size
                    self._skipped = (kind, head)
                    self._skip = size - ENVELOPE
                    rest = bytes(buffer[start + ENVELOPE:end])
                    offset = end
                    rest = self._read_past(rest, packets)
                    if self._skipped is not None:
                        break
                    buffer += rest
                    end = len(buffer)
                    continue
                if end - offset < HEADER.size + size:
                    break
                start = offset + HEADER.size
                packets.append((kind, bytes(buffer[start:start + size])))
                offset = start + size
        finally:
            if offset == end:
                buffer.clear()
                offset = 0
            elif offset > 65536 and offset * 2 > end:
                del buffer[:offset]
                offset = 0
            self._offset = offset
        return packets
