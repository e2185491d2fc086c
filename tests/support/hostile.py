"""A fake, hostile Gearman job server of the tests' own (issue 14).

`HostileJobServer(behaviour, function=...)` listens on 127.0.0.1 and a free
port and plays one misbehaviour on every connection it accepts, each in
its own thread.  It records what it saw: connection times, the packets the
worker sent (type, arguments).  Behaviours are the functions named
`play_<behaviour>` below; BEHAVIOURS lists them.
"""
import os
import socket
import struct
import threading
import time

from .ports import LOOPBACK

HEADER = struct.Struct(">4sII")
REQ, RES = b"\0REQ", b"\0RES"
NOOP, NO_JOB, JOB_ASSIGN, JOB_ASSIGN_UNIQ = 6, 10, 11, 31
GRAB_JOB, GRAB_JOB_UNIQ, PRE_SLEEP, ECHO_REQ, ECHO_RES = 9, 30, 4, 16, 17
WORK_COMPLETE, WORK_FAIL, ERROR = 13, 14, 19


def packet(kind, *arguments, magic=RES):
    body = b"\0".join(arguments)
    return HEADER.pack(magic, kind, len(body)) + body


class _Peer:
    """One accepted connection: read the worker's packets, write ours."""

    def __init__(self, sock, server):
        self.sock = sock
        self.server = server
        self.buffer = b""

    def next_packet(self, timeout=None):
        """(type, body) of the worker's next packet; None when it closed or stop was asked."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if len(self.buffer) >= 12:
                magic, kind, size = HEADER.unpack_from(self.buffer)
                if len(self.buffer) >= 12 + size:
                    body = self.buffer[12:12 + size]
                    self.buffer = self.buffer[12 + size:]
                    self.server.seen.append((kind, body))
                    return kind, body
            if self.server.stopping.is_set() or (deadline and time.monotonic() > deadline):
                return None
            self.sock.settimeout(0.2)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                return None
            if not data:
                return None
            self.buffer += data

    def wait_for(self, *kinds):
        while True:
            found = self.next_packet()
            if found is None or found[0] in kinds:
                return found

    def send(self, data):
        self.sock.settimeout(5)
        self.sock.sendall(data)

    def hold(self):
        """Keep the connection open, reading nothing, until the server stops."""
        self.server.stopping.wait()

    def drain(self):
        """Read (and record) everything, answer nothing, until the worker or the server stops."""
        while self.next_packet() is not None:
            pass


def _assign(server, payload=b'{"hpcs_action": "DISCOVER"}', function=None, handle=b"H:hostile:1"):
    return packet(JOB_ASSIGN_UNIQ, handle, function or server.function, b"hostile-unique", payload)


# -- behaviours ------------------------------------------------------------------

def play_half_assign(peer):
    """Half a JOB_ASSIGN_UNIQ, then the connection left open."""
    peer.wait_for(GRAB_JOB_UNIQ, GRAB_JOB)
    whole = _assign(peer.server)
    peer.send(whole[:len(whole) // 2])
    peer.hold()


def play_trickle(peer):
    """A JOB_ASSIGN_UNIQ one byte every half second (never finished in time)."""
    peer.wait_for(GRAB_JOB_UNIQ, GRAB_JOB)
    for byte in _assign(peer.server):
        if peer.server.stopping.wait(0.5):
            return
        peer.send(bytes([byte]))


def play_never_reads(peer):
    """Assigns a 4 MB job and never reads again: the reply cannot be sent."""
    peer.wait_for(GRAB_JOB_UNIQ, GRAB_JOB)
    pad = b"x" * (4 * 1024 * 1024 - 200)
    peer.send(_assign(peer.server, b'{"hpcs_action": "DISCOVER", "pad": "' + pad + b'"}'))
    peer.hold()


def play_huge_header(peer):
    """A header declaring a 2 GB body, then body bytes as fast as the worker takes them."""
    peer.wait_for(GRAB_JOB_UNIQ, GRAB_JOB)
    peer.send(HEADER.pack(RES, JOB_ASSIGN_UNIQ, 2 * 1024 ** 3))
    chunk = b"H:x\0" + b"y" * (1 << 20)
    try:
        while not peer.server.stopping.is_set():
            peer.send(chunk)
    except OSError:
        return


def play_garbage(peer):
    """Bytes without the \\0RES magic, as fast as the worker takes them."""
    chunk = os.urandom(64 * 1024).replace(b"\0", b"\1")
    try:
        while not peer.server.stopping.is_set():
            peer.send(chunk)
    except OSError:
        return


def play_max_length(peer):
    """A JOB_ASSIGN_UNIQ whose header says 0xFFFFFFFF bytes."""
    peer.wait_for(GRAB_JOB_UNIQ, GRAB_JOB)
    peer.send(HEADER.pack(RES, JOB_ASSIGN_UNIQ, 0xFFFFFFFF) + b"H:x\0")
    peer.hold()


def play_missing_fields(peer):
    """A JOB_ASSIGN_UNIQ with two of its four fields."""
    peer.wait_for(GRAB_JOB_UNIQ, GRAB_JOB)
    peer.send(packet(JOB_ASSIGN_UNIQ, b"H:hostile:2", peer.server.function))
    peer.hold()


def play_accept_close(peer):
    """Accepts, then closes at once."""


def play_foreign_job(peer):
    """Answers a grab with a DELETE for a function the worker never registered."""
    peer.wait_for(GRAB_JOB_UNIQ, GRAB_JOB)
    peer.send(_assign(peer.server, b'{"hpcs_action": "DELETE"}', function=b"another-device",
                      handle=b"H:hostile:foreign"))
    peer.drain()


def play_silent(peer):
    """Accepts and never answers anything (reads what the worker sends)."""
    peer.drain()


def play_silent_after_no_job(peer):
    """Answers the first grab with NO_JOB, then nothing (no NOOP, no ECHO_RES)."""
    peer.wait_for(GRAB_JOB_UNIQ, GRAB_JOB)
    peer.send(packet(NO_JOB))
    peer.drain()


def play_noop_flood(peer):
    """NO_JOB to the first grab, then NOOPs as fast as the worker takes them."""
    peer.wait_for(GRAB_JOB_UNIQ, GRAB_JOB)
    peer.send(packet(NO_JOB))
    flood = packet(NOOP) * 20000
    try:
        while not peer.server.stopping.is_set():
            peer.send(flood)
    except OSError:
        return


def play_wakeup_flood(peer):
    """Protocol-correct churn: NOOP after every PRE_SLEEP, NO_JOB after every grab."""
    while True:
        found = peer.next_packet()
        if found is None:
            return
        if found[0] in (GRAB_JOB_UNIQ, GRAB_JOB):
            peer.send(packet(NO_JOB))
        elif found[0] == PRE_SLEEP:
            peer.send(packet(NOOP))
        elif found[0] == ECHO_REQ:
            peer.send(packet(ECHO_RES, found[1]))


def play_error_packet(peer):
    """Answers a grab with an ERROR packet."""
    peer.wait_for(GRAB_JOB_UNIQ, GRAB_JOB)
    peer.send(packet(ERROR, b"ERR_HOSTILE", b"the hostile server says no"))
    peer.drain()


def play_unsolicited_assign(peer):
    """Two jobs for one grab: the second is more than the worker asked for."""
    peer.wait_for(GRAB_JOB_UNIQ, GRAB_JOB)
    peer.send(_assign(peer.server, handle=b"H:hostile:a") + _assign(peer.server, handle=b"H:hostile:b"))
    peer.drain()


BEHAVIOURS = sorted(name[len("play_"):] for name in dict(globals()) if name.startswith("play_"))


class HostileJobServer:
    def __init__(self, behaviour, function=b"", rcvbuf=None):
        self.play = globals()[f"play_{behaviour}"]
        self.behaviour = behaviour
        self.function = function.encode() if isinstance(function, str) else function
        self.rcvbuf = rcvbuf
        self.seen = []             # (type, body) the worker sent
        self.connect_times = []    # monotonic
        self.stopping = threading.Event()
        self._listener = None
        self._threads = []
        self._socks = []
        self.port = None

    @property
    def address(self):
        return f"{LOOPBACK}:{self.port}"

    def start(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        listener.bind((LOOPBACK, 0))
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        thread = threading.Thread(target=self._accept, name=f"hostile {self.behaviour}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def _accept(self):
        while not self.stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connect_times.append(time.monotonic())
            self._socks.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock):
        try:
            self.play(_Peer(sock, self))
        except OSError:
            pass
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def packets_of(self, kind):
        return [body for seen_kind, body in self.seen if seen_kind == kind]

    def stop(self):
        self.stopping.set()
        for sock in list(self._socks):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._listener is not None:
            self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
