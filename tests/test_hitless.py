"""Hitless reloads: UPDATEs reload HAProxy under load and no client notices.

A client opens new connections through the load balancer at a steady
LOAD_RATE (>= 200/s) for about LOAD_SECONDS while RELOADS UPDATEs (weights and
client timeout alternating: every one a configuration only a reload applies)
are applied in the middle.  Meanwhile DOWNLOADS long downloads, served
slowly by a back-end and started before the first reload, are in flight.

Alongside, KEEPALIVE_CLIENTS clients send request after request on
persistent (keep-alive) connections, as browsers and API clients do.

Every request must succeed: no refused, reset or timed-out connection, no
answer other than 2xx, no keep-alive connection closed under a request the
client already sent (the server may only announce `Connection: close` on an
answer), and every long download must arrive whole (byte count and SHA-256
equal to the same body fetched straight from the back-end).  Each UPDATE
must PASS with a new HAProxy worker in `show proc`.
"""
import collections
import errno
import hashlib
import http.client
import re
import socket
import threading
import time

from support.haproxy_version import dynamic_cookie
from support.ports import free_port
from support.traffic import unix_command

LOAD_RATE = 250            # new connections per second; the claim is >= MIN_RATE
MIN_RATE = 200
LOAD_SECONDS = 10.0        # at least; it goes on TAIL_SECONDS after the last reload
TAIL_SECONDS = 1.0
MAX_SECONDS = 30.0         # the bound: the UPDATEs must be done well before
LOAD_THREADS = 16
RELOADS = 20
FIRST_RELOAD_AT = 1.0      # seconds into the load
RELOAD_GAP = 0.1           # pause between two UPDATEs
DOWNLOADS = 3
DOWNLOAD_BYTES = 20 * 1024 * 1024
DOWNLOAD_SECONDS = 8       # the back-end streams each download over this long
KEEPALIVE_CLIENTS = 6
KEEPALIVE_PAUSE = 0.01     # between two requests on one connection (plus 5 ms per client)
TIMEOUT = 5.0
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test-hitless\r\nConnection: close\r\n\r\n"
_WORKER_LINE = re.compile(r"^(\d+)\s+worker\s+(\d+)\b", re.M)


# --------------------------------------------------------------------------
# The client side
# --------------------------------------------------------------------------

def one_request(port):
    """GET / on a fresh connection → (outcome, detail); outcome "ok" or what went wrong."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    data = bytearray()
    try:
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return "refused", "connect refused"
        sock.sendall(REQUEST)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        return "timeout", f"no whole answer within {TIMEOUT:g}s"
    except OSError as error:
        name = errno.errorcode.get(error.errno, type(error).__name__)
        return ("reset" if error.errno in (errno.ECONNRESET, errno.EPIPE) else "error"), name
    finally:
        sock.close()
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status_line) < 2 or not status_line[1].isdigit():
        return "reset", f"closed after {len(data)} bytes without a whole answer"
    status = int(status_line[1])
    match = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if match and int(match.group(1)) != len(body):
        return "reset", f"body of {len(body)} bytes, Content-Length {int(match.group(1))}"
    if not 200 <= status < 300:
        return "non_2xx", f"status {status}"
    return "ok", ""


class Load:
    """LOAD_RATE new connections per second, on a fixed schedule, from LOAD_THREADS threads."""

    def __init__(self, port):
        self.port = port
        self.outcomes = collections.Counter()
        self.failures = []            # (seconds into the load, outcome, detail)
        self.lock = threading.Lock()
        self.next_slot = 0
        self.stop_event = threading.Event()
        self.threads = []
        self.started = self.ended = None

    def _run(self):
        while not self.stop_event.is_set():
            with self.lock:
                slot, self.next_slot = self.next_slot, self.next_slot + 1
            delay = self.started + slot / LOAD_RATE - time.monotonic()
            if delay > 0 and self.stop_event.wait(delay):
                return
            outcome, detail = one_request(self.port)
            with self.lock:
                self.outcomes[outcome] += 1
                if outcome != "ok":
                    self.failures.append((round(time.monotonic() - self.started, 3), outcome, detail))

    def start(self):
        self.started = time.monotonic()
        for index in range(LOAD_THREADS):
            thread = threading.Thread(target=self._run, name=f"load-{index}", daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def stop(self):
        self.stop_event.set()
        self.ended = time.monotonic()
        for thread in self.threads:
            thread.join(TIMEOUT + 5)

    @property
    def total(self):
        return sum(self.outcomes.values())

    @property
    def rate(self):
        return self.total / (self.ended - self.started)


class Download:
    """GET /slow/<bytes>/<seconds> through the load balancer, hashed as it arrives."""

    def __init__(self, port):
        self.port = port
        self.status = None
        self.received = 0
        self.sha256 = hashlib.sha256()
        self.error = None
        self.headers_at = self.finished_at = None
        self.has_headers = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DOWNLOAD_SECONDS + 30)
        try:
            conn.request("GET", f"/slow/{DOWNLOAD_BYTES}/{DOWNLOAD_SECONDS}")
            response = conn.getresponse()
            self.status = response.status
            self.headers_at = time.monotonic()
            self.has_headers.set()
            while True:
                chunk = response.read(256 * 1024)
                if not chunk:
                    break
                self.received += len(chunk)
                self.sha256.update(chunk)
        except (OSError, http.client.HTTPException) as error:
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self.finished_at = time.monotonic()
            self.has_headers.set()
            conn.close()

    def join(self, timeout):
        self.thread.join(timeout)
        return not self.thread.is_alive()


class KeepAliveClients:
    """Clients that keep their connection open between requests (HTTP/1.1 keep-alive).

    A connection is only opened again after an answer that announced its
    close; a request that gets no answer on a kept-alive connection is a failure.
    """

    def __init__(self, port):
        self.port = port
        self.outcomes = collections.Counter()   # ok, non_2xx, failed
        self.connections = 0
        self.failures = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(KEEPALIVE_PAUSE + 0.005 * index,),
                                         name=f"keepalive-{index}", daemon=True)
                        for index in range(KEEPALIVE_CLIENTS)]

    def _run(self, pause):
        conn = None
        while not self.stop_event.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
                with self.lock:
                    self.connections += 1
            requests_on_conn = getattr(conn, "served", 0)
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as error:
                with self.lock:
                    self.outcomes["failed"] += 1
                    self.failures.append(f"{type(error).__name__} on request "
                                         f"{requests_on_conn + 1} of its connection")
                conn.close()
                conn = None
            else:
                conn.served = requests_on_conn + 1
                with self.lock:
                    self.outcomes["ok" if 200 <= response.status < 300 else "non_2xx"] += 1
                if response.will_close:
                    conn.close()
                    conn = None
            self.stop_event.wait(pause)
        if conn is not None:
            conn.close()

    def start(self):
        for thread in self.threads:
            thread.start()
        return self

    def stop(self):
        self.stop_event.set()
        for thread in self.threads:
            thread.join(TIMEOUT + 5)

    @property
    def total(self):
        return sum(self.outcomes.values())


def expected_download(backend):
    """SHA-256 of the body the back-end serves for DOWNLOAD_BYTES, fetched straight from it."""
    conn = http.client.HTTPConnection(backend.host, backend.port, timeout=30)
    try:
        conn.request("GET", f"/bytes/{DOWNLOAD_BYTES}")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200 and len(body) == DOWNLOAD_BYTES
    return hashlib.sha256(body).hexdigest()


# --------------------------------------------------------------------------
# The device side
# --------------------------------------------------------------------------

def current_worker(device):
    """The HAProxy worker started by the last (re)load: the one that has survived no reload."""
    text = unix_command(device.master_socket, "show proc")
    fresh = [int(pid) for pid, reloads in _WORKER_LINE.findall(text) if reloads == "0"]
    assert len(fresh) == 1, f"expected one fresh worker in show proc:\n{text}"
    return fresh[0]


def one_request_backend(port):
    """The back-end (X-Backend) that answers one GET / through the load balancer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        return response.headers.get("X-Backend")
    finally:
        conn.close()


def http_update(port, backends, weights, variant=0):
    """An HTTP load balancer over `backends`; `variant` moves the client timeout by a
    millisecond, a change only a reload applies (weights alone may go through the runtime API)."""
    return {"hpcs_action": "UPDATE", "loadBalancers": [{
        "protocol": "HTTP", "port": port, "options": {"client_timeout": 30000 + variant},
        "monitor": {"type": "HTTP", "delay": 2, "timeout": 1, "attempts": 2, "path": "/"},
        "nodes": [{"id": backend.name, "address": backend.host, "port": backend.port, "weight": weight}
                  for backend, weight in zip(backends, weights)]}]}


def test_reloads_under_load_drop_nothing(device, http_backend):
    backends = [http_backend("node-a"), http_backend("node-b")]
    port = free_port()
    device.must_pass(http_update(port, backends, (1, 1)))
    expected_sha = expected_download(backends[0])
    first_worker = current_worker(device)

    load = Load(port).start()
    keepalive = KeepAliveClients(port).start()
    downloads = [Download(port).start() for _ in range(DOWNLOADS)]
    workers, reload_started_at, reload_done_at = [first_worker], [], []
    try:
        for download in downloads:
            assert download.has_headers.wait(TIMEOUT), "a long download got no answer"
        time.sleep(max(0.0, load.started + FIRST_RELOAD_AT - time.monotonic()))
        for index in range(RELOADS):
            weights = (2, 1) if index % 2 == 0 else (1, 2)
            reload_started_at.append(time.monotonic())
            device.must_pass(http_update(port, backends, weights, variant=1 + index % 2))
            reload_done_at.append(time.monotonic())
            workers.append(current_worker(device))
            time.sleep(RELOAD_GAP)
        end = max(load.started + LOAD_SECONDS, reload_done_at[-1] + TAIL_SECONDS)
        time.sleep(max(0.0, end - time.monotonic()))
    finally:
        load.stop()
        keepalive.stop()
        finished = [download.join(DOWNLOAD_SECONDS + 40) for download in downloads]

    print(f"{load.total} requests at {load.rate:.0f}/s; {RELOADS} UPDATEs in "
          f"{reload_done_at[-1] - reload_started_at[0]:.1f}s; downloads "
          f"{[round(d.finished_at - d.headers_at, 1) for d in downloads]}s; outcomes {dict(load.outcomes)}; "
          f"keep-alive: {keepalive.total} requests on {keepalive.connections} connections, "
          f"{dict(keepalive.outcomes)}")

    # The load was what the claim says, and nothing failed.
    assert load.rate >= MIN_RATE, f"only {load.rate:.0f} new connections/s (want >= {MIN_RATE})"
    failures = {outcome: count for outcome, count in load.outcomes.items() if outcome != "ok"}
    assert not failures, (f"{sum(failures.values())} of {load.total} requests failed across "
                          f"{RELOADS} reloads: {failures}; first: {load.failures[:10]}")

    # The long downloads began before the first reload, outlived at least one, and arrived whole.
    assert all(finished), "a long download did not finish"
    for number, download in enumerate(downloads, 1):
        assert download.error is None, f"download {number} broke: {download.error}"
        assert download.status == 200, f"download {number} answered {download.status}"
        assert download.headers_at < reload_started_at[0] and reload_done_at[0] < download.finished_at, (
            f"download {number} was not in flight across a reload")
        assert download.received == DOWNLOAD_BYTES, (
            f"download {number}: {download.received} of {DOWNLOAD_BYTES} bytes")
        assert download.sha256.hexdigest() == expected_sha, f"download {number}: checksum differs"

    # Kept-alive connections: the old HAProxy may close them only by announcing it on an answer.
    assert keepalive.total > 2 * keepalive.connections, (
        f"the keep-alive clients hardly reused their connections: {keepalive.total} requests "
        f"on {keepalive.connections} connections")
    assert keepalive.outcomes["failed"] == 0 and keepalive.outcomes["non_2xx"] == 0, (
        f"{keepalive.outcomes['failed']} keep-alive requests failed and {keepalive.outcomes['non_2xx']} "
        f"were not 2xx, of {keepalive.total} across {RELOADS} reloads; first: {keepalive.failures[:5]}")

    # Every UPDATE was a real reload (a new HAProxy worker each time), all within the bound.
    assert len(set(workers)) == RELOADS + 1, f"HAProxy workers across the UPDATEs: {workers}"
    assert load.ended - load.started < MAX_SECONDS, (
        f"{RELOADS} UPDATEs took {reload_done_at[-1] - reload_started_at[0]:.1f}s")


# --------------------------------------------------------------------------
# Nodes added and removed at run time, under the same load
# --------------------------------------------------------------------------

RUNTIME_UPDATES = 50


def _update_paths(device):
    return re.findall(r" UPDATE PASS \S+ \((\w+)\)", device.worker.log_text())


def test_nodes_added_and_removed_at_run_time_under_load_drop_nothing(device, http_backend):
    """50 UPDATEs add and remove a third node while clients keep coming.  HAProxy 3.0 takes
    all of them at run time (one HAProxy worker throughout); 2.6 adds an HTTP node by a
    reload (it refuses `cookie` on `add server`) and removes it at run time."""
    backends = [http_backend("rt-a"), http_backend("rt-b"), http_backend("rt-c")]
    port = free_port()
    device.must_pass(http_update(port, backends[:2], (1, 1)))
    first_worker = current_worker(device)
    paths_before = len(_update_paths(device))

    load = Load(port).start()
    keepalive = KeepAliveClients(port).start()
    workers = {first_worker}
    try:
        time.sleep(FIRST_RELOAD_AT)
        for index in range(RUNTIME_UPDATES):
            adding = index % 2 == 0
            device.must_pass(http_update(port, backends if adding else backends[:2], (1, 1, 1)))
            workers.add(current_worker(device))
            time.sleep(RELOAD_GAP)
        time.sleep(TAIL_SECONDS)
    finally:
        load.stop()
        keepalive.stop()

    paths = _update_paths(device)[paths_before:]
    print(f"{load.total} requests at {load.rate:.0f}/s; paths {collections.Counter(paths)}; "
          f"outcomes {dict(load.outcomes)}; keep-alive {dict(keepalive.outcomes)}")
    assert load.rate >= MIN_RATE, f"only {load.rate:.0f} new connections/s (want >= {MIN_RATE})"
    failures = {outcome: count for outcome, count in load.outcomes.items() if outcome != "ok"}
    assert not failures, f"{sum(failures.values())} of {load.total} requests failed: {load.failures[:10]}"
    assert keepalive.outcomes["failed"] == 0 and keepalive.outcomes["non_2xx"] == 0, keepalive.failures[:5]
    assert keepalive.total > 2 * keepalive.connections
    assert len(paths) == RUNTIME_UPDATES
    if dynamic_cookie():
        assert paths == ["runtime"] * RUNTIME_UPDATES, paths
        assert workers == {first_worker}, f"HAProxy workers across the UPDATEs: {workers}"
    else:
        assert paths[1::2] == ["runtime"] * (RUNTIME_UPDATES // 2), paths      # removals
        assert paths[0::2] == ["reload"] * (RUNTIME_UPDATES // 2), paths       # additions
    counts = collections.Counter(one_request_backend(port) for _ in range(6))
    assert set(counts) == {"rt-a", "rt-b"}, counts
