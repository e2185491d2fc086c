"""One non-blocking connection to a job server, driven by its owner's selector.

What it guarantees, whatever the peer does:
- connect, TLS handshake, a half-received packet and a pending send each
  have a deadline (`timeout` seconds); past it the link is down;
- the input buffer holds at most one packet of `cap` bytes plus one read,
  and a header that declares more than `cap` downs the link at once;
- one read per event and at most READ_BUDGET bytes of it, so one busy peer
  cannot starve the others on the same loop;
- TCP_NODELAY always (without it every reply waits ~40 ms on Nagle and
  delayed ACK), TCP keepalive when configured;
- a host name is resolved on a short-lived thread: a slow resolver stalls
  only this link, and only until its connect deadline.

Every failure is one LinkDown with a one-line reason; the owner logs it.
"""
import errno
import os
import selectors
import socket
import ssl
import threading
from collections import deque

from libra_worker.wire import packets, tls

READ_BUDGET = 256 * 1024


class LinkDown(Exception):
    """The link is unusable; str() is why, in one line."""


def _is_ip(host):
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return family
        except OSError:
            pass
    return None


class Link:
    def __init__(self, host, port, selector, *, timeout, cap, tls_context=None,
                 keepalive=None, wake=None, magic=packets.RES, discard_limit=0, discard_kinds=()):
        self.host, self.port = host, port
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.selector = selector
        self.timeout = timeout
        self.tls_context = tls_context
        self.keepalive = keepalive          # None or (idle, interval, count)
        self.wake = wake                    # called from the resolver thread
        self.reader = packets.Reader(cap, magic, discard_limit, discard_kinds)
        self.max_output = 2 * cap + packets.ENVELOPE
        self.state = "new"
        self.sock = None
        self._events = 0
        self._out = deque()
        self._out_bytes = 0
        self._send_since = None
        self._partial_since = None
        self._phase_deadline = None         # connect / handshake
        self._resolved = None               # (family, address) or an error text
        self._tls_wants_write = False

    # -- opening -----------------------------------------------------------

    def open(self, now):
        self._phase_deadline = now + self.timeout
        family = _is_ip(self.host)
        if family is not None:
            self._connect(family, (self.host, self.port))
            return
        self.state = "resolving"
        threading.Thread(target=self._resolve, name=f"resolve {self.label}", daemon=True).start()

    def _resolve(self):
        try:
            family, _, _, _, address = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM)[0]
            self._resolved = (family, address)
        except (OSError, UnicodeError) as error:
            self._resolved = f"cannot resolve {self.host}: {getattr(error, 'strerror', None) or error}"
        if self.wake is not None:
            self.wake()

    def _connect(self, family, address):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.keepalive:
                idle, interval, count = self.keepalive
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
            code = sock.connect_ex(address)
        except OSError as error:
            sock.close()
            raise LinkDown(f"cannot connect: {error.strerror}") from None
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            raise LinkDown(f"cannot connect: {errno.errorcode.get(code, code)} ({_strerror(code)})")
        self.sock = sock
        self.state = "connecting"
        self._watch(selectors.EVENT_WRITE)

    def _connected(self, now):
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise LinkDown(f"cannot connect: {_strerror(code)}")
        if self.tls_context is None:
            self._opened()
            return
        try:
            self.sock = self.tls_context.wrap_socket(self.sock, server_hostname=self.host,
                                                     do_handshake_on_connect=False)
        except (OSError, ssl.SSLError, ValueError) as error:
            raise LinkDown(tls.describe(error)) from None
        self.state = "handshaking"
        self._phase_deadline = now + self.timeout
        self._handshake()

    def _handshake(self):
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(selectors.EVENT_WRITE)
            return
        except ssl.SSLError as error:
            raise LinkDown(tls.describe(error)) from None
        except OSError as error:
            raise LinkDown(f"TLS handshake: {error.strerror or error}") from None
        self._opened()

    def _opened(self):
        self.state = "open"
        self._phase_deadline = None
        self._watch(selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0))

    @property
    def is_open(self):
        return self.state == "open"

    # -- the loop's calls ------------------------------------------------------

    def on_event(self, mask, now):
        """The selector reported `mask` for this link: the packets now complete."""
        if self.state == "connecting":
            self._connected(now)
            return []
        if self.state == "handshaking":
            self._handshake()
            return []
        if self.state != "open":
            return []
        if mask & selectors.EVENT_WRITE or self._tls_wants_write:
            self._flush(now)
        if mask & selectors.EVENT_READ:
            return self._read(now)
        return []

    @property
    def has_buffered_input(self):
        """TLS may hold decrypted bytes the selector cannot see."""
        return self.state == "open" and isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0

    def _read(self, now):
        chunks = []
        budget = READ_BUDGET
        try:
            while budget > 0:
                data = self.sock.recv(budget)
                if not data:
                    if chunks:
                        break   # hand over what came before the close; EOF again next time
                    raise LinkDown("closed by the job server")
                chunks.append(data)
                budget -= len(data)
                if not isinstance(self.sock, ssl.SSLSocket) or not self.sock.pending():
                    break
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except ssl.SSLWantWriteError:
            self._tls_wants_write = True
            self._watch(selectors.EVENT_READ | selectors.EVENT_WRITE)
        except ssl.SSLError as error:
            raise LinkDown(tls.describe(error)) from None
        except OSError as error:
            raise LinkDown(f"read failed: {error.strerror or error}") from None
        if not chunks:
            return []
        try:
            found = self.reader.feed(b"".join(chunks) if len(chunks) > 1 else chunks[0])
        except packets.ProtocolError as error:
            raise LinkDown(f"protocol error: {error}") from None
        if self.reader.partial:
            if self._partial_since is None or found:
                self._partial_since = now
        else:
            self._partial_since = None
        return found

    def send(self, data, now):
        """Queue bytes and send what the socket takes now."""
        if self._out_bytes + len(data) > self.max_output:
            raise LinkDown(f"more than {self.max_output} bytes wait to be sent")
        if not self._out:
            self._send_since = now
        self._out.append(memoryview(data))
        self._out_bytes += len(data)
        if self.state == "open":
            self._flush(now)

    @property
    def sending(self):
        return bool(self._out)

    def _flush(self, now):
        self._tls_wants_write = False
        try:
            while self._out:
                view = self._out[0]
                sent = self.sock.send(view)
                self._out_bytes -= sent
                if sent == len(view):
                    self._out.popleft()
                else:
                    self._out[0] = view[sent:]
                    break
        except (BlockingIOError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as error:
            raise LinkDown(tls.describe(error)) from None
        except OSError as error:
            raise LinkDown(f"send failed: {error.strerror or error}") from None
        if self._out:
            self._watch(selectors.EVENT_READ | selectors.EVENT_WRITE)
        else:
            self._send_since = None
            self._watch(selectors.EVENT_READ)

    def check(self, now):
        """Deadlines and the resolver's answer; raises LinkDown."""
        if self.state == "resolving":
            resolved = self._resolved
            if isinstance(resolved, str):
                raise LinkDown(resolved)
            if resolved is not None:
                self._connect(*resolved)
        if self._phase_deadline is not None and now >= self._phase_deadline:
            what = {"resolving": "name resolution", "connecting": "connect",
                    "handshaking": "TLS handshake"}.get(self.state, self.state)
            raise LinkDown(f"{what} did not finish within {self.timeout:g}s")
        if self._partial_since is not None and now - self._partial_since >= self.timeout:
            raise LinkDown(f"sent {self.reader.buffered} bytes of a packet and not the rest "
                           f"within {self.timeout:g}s")
        if self._send_since is not None and self.state == "open" and now - self._send_since >= self.timeout:
            raise LinkDown(f"did not take {self._out_bytes} bytes within {self.timeout:g}s")

    def deadline(self):
        """The earliest time check() must run, or None."""
        times = [self._phase_deadline]
        if self._partial_since is not None:
            times.append(self._partial_since + self.timeout)
        if self._send_since is not None:
            times.append(self._send_since + self.timeout)
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def shift(self, seconds):
        """The owner was away (running a job) for `seconds`: that time does not count."""
        if self._phase_deadline is not None:
            self._phase_deadline += seconds
        if self._partial_since is not None:
            self._partial_since += seconds
        if self._send_since is not None:
            self._send_since += seconds

    def _watch(self, events):
        if self.sock is None or events == self._events:
            return
        if self._events:
            self.selector.modify(self.sock, events, self)
        else:
            self.selector.register(self.sock, events, self)
        self._events = events

    def close(self):
        if self.sock is not None:
            if self._events:
                try:
                    self.selector.unregister(self.sock)
                except (KeyError, ValueError):
                    pass
            self._events = 0
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
        self.state = "closed"
        self.wake = None


def _strerror(code):
    return os.strerror(code)
