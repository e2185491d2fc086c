"""Helpers for the STATS and METRICS tests: a METRICS reply checked for
shape, traffic of a known size, HAProxy's own counters read straight from
its stats socket, and a fake stats socket that answers nonsense.
"""
import csv
import datetime
import os
import socket
import threading
import time

from .traffic import http_get, tcp_exchange, unix_command

UTC_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
HEADER_SLACK = 1024          # bytes of response headers allowed per HTTP request


class Metrics:
    """A METRICS reply, checked for shape: bytes per protocol, times parsed."""

    def __init__(self, reply):
        self.reply = reply
        self.utc_start = parse_utc(reply["utc_start"])
        self.utc_end = parse_utc(reply["utc_end"])
        assert self.utc_start <= self.utc_end, reply
        self.bytes = {}
        for entry in reply["loadBalancers"]:
            protocol, count = entry["protocol"], entry["bytes_out"]
            # Libra's billing (stats_sched._update_stats) only reads "http" and "tcp" rows.
            assert protocol in ("http", "tcp"), reply
            assert type(count) is int and count >= 0, f"bytes_out must be a non-negative int: {reply}"
            assert protocol not in self.bytes, f"{protocol} reported twice: {reply}"
            self.bytes[protocol] = count

    def get(self, protocol):
        """The bytes of a load balancer of `protocol` (HTTP, TCP, GALERA), found as Libra's billing finds them."""
        row = "http" if protocol.lower() == "http" else "tcp"
        return self.bytes.get(row, 0)

    def __repr__(self):
        return f"<Metrics {self.reply['utc_start']}..{self.reply['utc_end']} {self.bytes}>"


def parse_utc(text):
    """'YYYY-MM-DD HH:MM:SS.ffffff' → aware datetime (ValueError when not that format)."""
    assert isinstance(text, str), text
    return datetime.datetime.strptime(text, UTC_FORMAT).replace(tzinfo=datetime.timezone.utc)


def assert_http_bytes(reported, payload, requests, what="HTTP bytes_out"):
    """`reported` covers `payload` body bytes plus at most HEADER_SLACK per request."""
    assert payload <= reported <= payload + requests * HEADER_SLACK, (
        f"{what}: {reported} reported for {payload} body bytes in {requests} request(s)")


# --------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------

def download(port, size, chunk=None):
    """GET /bytes/<size> through :port (in requests of at most `chunk`) → requests made."""
    chunk = chunk or size
    remaining, requests = size, 0
    while remaining:
        part = min(chunk, remaining)
        response = http_get(port, f"/bytes/{part}", timeout=15.0)
        assert response.status == 200 and len(response.body) == part, (
            f"GET /bytes/{part} through :{port}: {response.status}, {len(response.body)} bytes")
        remaining -= part
        requests += 1
    return requests


def echo(port, size):
    """One TCP exchange of `size` bytes through :port → bytes the client received."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    banner, echoed = tcp_exchange(port, payload, timeout=15.0)
    assert echoed == payload, f"the TCP LB on :{port} echoed {len(echoed)} of {size} bytes"
    return len(banner) + 1 + len(echoed)       # the banner line ends with "\n"


# --------------------------------------------------------------------------
# HAProxy's stats socket, read directly (not through the worker)
# --------------------------------------------------------------------------

def info(stats_socket):
    """`show info` → {field: value}."""
    fields = {}
    for line in unix_command(stats_socket, "show info").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def frontend_bytes_out(stats_socket, frontend):
    """bout of the FRONTEND row of `frontend`, as HAProxy reports it now."""
    text = unix_command(stats_socket, "show stat")
    rows = csv.DictReader(text.lstrip("# ").splitlines())
    for row in rows:
        if row.get("pxname") == frontend and row.get("svname") == "FRONTEND":
            return int(row["bout"] or 0)
    raise AssertionError(f"no FRONTEND row for {frontend} in `show stat`")


def wait_counted(stats_socket, frontend, minimum, timeout=10.0):
    """Wait until HAProxy's own counter shows `minimum` bytes (it closes streams lazily)."""
    deadline = time.monotonic() + timeout
    while True:
        count = frontend_bytes_out(stats_socket, frontend)
        if count >= minimum:
            return count
        assert time.monotonic() < deadline, f"{frontend} bout stays at {count} < {minimum}"
        time.sleep(0.02)


# --------------------------------------------------------------------------
# A fake stats socket
# --------------------------------------------------------------------------

class FakeStatsSocket:
    """A unix socket server at `path`: reads what arrives, waits `delay` seconds,
    answers `answer`, closes.  `connections` counts the clients served.
    """

    def __init__(self, path, answer, delay=0.0):
        self.path = str(path)
        self.answer = answer
        self.delay = delay
        self.connections = 0
        self.received = []
        self._sock = None
        self._thread = None
        self._stopping = threading.Event()

    def start(self):
        if os.path.lexists(self.path):
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._serve, name="fake stats socket", daemon=True)
        self._thread.start()
        return self

    def _serve(self):
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    self.received.append(conn.recv(4096))
                    time.sleep(self.delay)
                    conn.sendall(self.answer)
                except OSError:
                    pass
            self.connections += 1

    def stop(self):
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        if os.path.lexists(self.path):
            os.unlink(self.path)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
