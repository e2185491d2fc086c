"""Traffic through the load balancer, and the HAProxy processes behind it, for the driver tests.

- HTTP requests through the load balancer (http.client, one connection per
  request) and which back-end answered them (the `X-Backend` header every
  support back-end sets);
- `RecordingHttpBackend`: an HttpBackend that also keeps what each GET
  carried (path and headers), to see what HAProxy forwards;
- raw TCP exchanges with a TcpEchoBackend behind a TCP load balancer;
- the HAProxy processes a worker started, found by their config path
  (the device around them is support.device.Device);
- builders for UPDATE messages.
"""
import collections
import http.client
import os
import signal
import socket
import time
from pathlib import Path

from .backends import HttpBackend
from .ports import LOOPBACK

REQUEST_TIMEOUT = 5.0

# A health check that flips a node in about a second: keeps failover tests fast.
FAST_HTTP_MONITOR = {"type": "HTTP", "delay": 1, "timeout": 1, "attempts": 1, "path": "/"}
FAST_CONNECT_MONITOR = {"type": "CONNECT", "delay": 1, "timeout": 1, "attempts": 1}


# --------------------------------------------------------------------------
# Waiting
# --------------------------------------------------------------------------

def wait_until(predicate, timeout=10.0, interval=0.05, what="the condition"):
    """Call predicate() until it returns a true value (returned); AssertionError at timeout.

    Exceptions (OSError, http.client errors) raised by predicate count as "not yet".
    """
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = predicate()
        except (OSError, http.client.HTTPException) as error:
            value, last_error = None, error
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s"
                                 + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

Response = collections.namedtuple("Response", "status headers body backend")


def http_get(port, path="/", headers=None, host=LOOPBACK, timeout=REQUEST_TIMEOUT):
    """One GET on a fresh connection → Response(status, headers, body, backend)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return Response(response.status, response.headers, body, response.headers.get("X-Backend"))
    finally:
        conn.close()


def backend_counts(port, count, path="/", headers=None):
    """Send `count` GETs; Counter of the back-end names that answered (200s only, else AssertionError)."""
    counts = collections.Counter()
    for _ in range(count):
        response = http_get(port, path, headers)
        assert response.status == 200, f"GET {path} through :{port} answered {response.status}"
        counts[response.backend] += 1
    return counts


def keepalive_counts(port, count, path="/", host=LOOPBACK, timeout=REQUEST_TIMEOUT):
    """`count` GETs one after the other on ONE client connection → Counter of back-end names.

    Each request ends its HAProxy transaction before the next one is read, so
    the server it used is no longer counted busy (unlike a fresh connection,
    which can race the previous one's cleanup).
    """
    counts = collections.Counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        for _ in range(count):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            assert response.status == 200, f"GET {path} through :{port} answered {response.status}"
            counts[response.headers.get("X-Backend")] += 1
    finally:
        conn.close()
    return counts


def serves(port, names=None, path="/"):
    """True when a GET through :port answers 200 from a back-end (one of `names` when given)."""
    response = http_get(port, path)
    if response.status != 200:
        return False
    return names is None or response.backend in names


class SlowRequest:
    """A GET of /slow/<size>/<seconds> held open: the headers are read, the body is not.

    `backend` is the node that is serving it; `finish()` reads the rest and closes.
    """

    def __init__(self, port, size=20, seconds=3.0, host=LOOPBACK):
        self.conn = http.client.HTTPConnection(host, port, timeout=seconds + REQUEST_TIMEOUT)
        self.conn.request("GET", f"/slow/{size}/{seconds:g}")
        self.response = self.conn.getresponse()
        self.backend = self.response.headers.get("X-Backend")
        self.size = size

    def finish(self):
        try:
            return self.response.read()
        finally:
            self.conn.close()


class _RecordingHandler(HttpBackend.handler_class):
    def _serve(self, with_body):
        if self.command == "GET":
            backend = self.server.backend
            with backend._lock:
                backend.seen.append((self.path, list(self.headers.items())))
        super()._serve(with_body)


class RecordingHttpBackend(HttpBackend):
    """An HttpBackend that keeps (path, [(header, value), ...]) of every GET in `seen`."""

    handler_class = _RecordingHandler

    def __init__(self, name, port=None):
        super().__init__(name, port)
        self.seen = []

    def headers_for(self, path):
        """Header lists of the GETs of `path`, oldest first."""
        with self._lock:
            return [headers for seen_path, headers in self.seen if seen_path == path]


# --------------------------------------------------------------------------
# TCP
# --------------------------------------------------------------------------

def _recv_exactly(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def _recv_line(sock, limit=4096):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"connection closed before a whole line ({data!r})")
        data += chunk
        if len(data) > limit:
            raise ConnectionError("line too long")
    return data


def tcp_exchange(port, payload=b"", host=LOOPBACK, timeout=REQUEST_TIMEOUT):
    """Connect to a TCP LB in front of TcpEchoBackends → (banner name, bytes echoed back)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        banner = _recv_line(sock).decode().strip()
        echoed = b""
        if payload:
            sock.sendall(payload)
            echoed = _recv_exactly(sock, len(payload))
        return banner, echoed


def tcp_banner(port):
    """The name of the TcpEchoBackend that a new connection to :port reaches."""
    return tcp_exchange(port)[0]


def refuses(port, host=LOOPBACK):
    """True when nothing accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


# --------------------------------------------------------------------------
# HAProxy processes
# --------------------------------------------------------------------------

def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _ppid(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[1]) if fields[0] not in ("Z", "X") else None


def haproxy_processes(config_path):
    """{pid: ppid} of the live haproxy processes whose command line names `config_path`."""
    config = os.fsencode(str(config_path))
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _cmdline(int(entry))
        if not argv or not os.path.basename(argv[0]).startswith(b"haproxy"):
            continue
        if config in argv:
            ppid = _ppid(int(entry))
            if ppid is not None:
                found[int(entry)] = ppid
    return found


def socat_sessions(stats_socket):
    """Pids of the live socat processes connected (or connecting) to `stats_socket`."""
    target = os.fsencode(f"unix-connect:{stats_socket}")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _cmdline(int(entry))
        if argv and os.path.basename(argv[0]) == b"socat" and target in argv and _ppid(int(entry)):
            found.append(int(entry))
    return sorted(found)


def haproxy_masters(config_path):
    """Pids of the haproxy masters for `config_path` (those whose parent is not one of them)."""
    processes = haproxy_processes(config_path)
    return sorted(pid for pid, ppid in processes.items() if ppid not in processes)


def unix_command(path, command, timeout=5.0):
    """One command to an HAProxy CLI socket (master or stats) → the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)       # the master CLI answers and closes only then
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks).decode(errors="replace")
            chunks.append(chunk)


def master_pid_from_socket(master_socket):
    """The master's pid as `show proc` on the master CLI reports it."""
    for line in unix_command(master_socket, "show proc").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and parts[1] == "master":
            return int(parts[0])
    raise AssertionError(f"no master line in `show proc` on {master_socket}")


def kill_haproxy(config_path, timeout=10.0):
    """SIGKILL every HAProxy process of `config_path` (master and workers, no clean-up); their pids."""
    pids = haproxy_processes(config_path)
    assert pids, f"no HAProxy runs for {config_path}"
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while haproxy_processes(config_path):
        assert time.monotonic() < deadline, f"HAProxy {haproxy_processes(config_path)} survived SIGKILL"
        time.sleep(0.02)
    return pids


def stop_haproxy(config_path, timeout=5.0):
    """Stop every haproxy process started for `config_path` (masters first, then leftovers)."""
    for pid in haproxy_masters(config_path):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while haproxy_processes(config_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in haproxy_processes(config_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------

def node(node_id, backend, **fields):
    """A node dict pointing at a support back-end."""
    return {"id": node_id, "address": backend.host, "port": backend.port, **fields}


def lb(protocol, port, nodes, **fields):
    return {"protocol": protocol, "port": port, "nodes": list(nodes), **fields}


def update(*load_balancers):
    return {"hpcs_action": "UPDATE", "loadBalancers": list(load_balancers)}
