"""New HTTP connections at a steady rate, each one classified.

    python -m bench.httpload PORT RATE MAX_SECONDS [KEEPALIVE_CLIENTS]

Runs until a line arrives on stdin (or stdin closes, or MAX_SECONDS pass),
then prints one JSON object: the counts of each outcome and the achieved
rate.  Every request is `GET /` on a fresh TCP connection with
`Connection: close`; it counts as `ok` only with a 2xx status and a body
of exactly Content-Length bytes.  Anything else is one of:
  refused    connect() refused
  timeout    no connection or no whole answer within TIMEOUT
  reset      ECONNRESET / EPIPE, or the connection closed before the answer was whole
  non_2xx    a whole answer with another status
  error      any other socket error

KEEPALIVE_CLIENTS more clients (default 0) send `GET /` after `GET /` on
persistent HTTP/1.1 connections, opening a new one only after an answer
that announced the close; a request that gets no answer on a kept-alive
connection counts as `failed` (reported under "keepalive").
"""
import collections
import errno
import http.client
import json
import socket
import sys
import threading
import time

TIMEOUT = 5.0
THREADS = 24
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nConnection: close\r\n\r\n"


def one_request(port, host="127.0.0.1"):
    """→ outcome name (see module docstring) and a short detail."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            return "refused", "connect refused"
        except socket.timeout:
            return "timeout", "connect timed out"
        sock.sendall(REQUEST)
        data = bytearray()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        return "timeout", "answer timed out"
    except (ConnectionResetError, BrokenPipeError) as error:
        return "reset", type(error).__name__
    except OSError as error:
        if error.errno in (errno.ECONNRESET, errno.EPIPE):
            return "reset", errno.errorcode.get(error.errno, str(error))
        return "error", str(error)
    finally:
        sock.close()
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        return "reset", f"closed after {len(data)} bytes, no whole header"
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return "reset", f"bad status line {lines[0][:40]!r}"
    status = int(parts[1])
    length = None
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is not None and len(body) != length:
        return "reset", f"body {len(body)} of {length} bytes"
    if not 200 <= status < 300:
        return "non_2xx", f"status {status}"
    return "ok", ""


class Load:
    """RATE new connections per second from THREADS threads, paced on a schedule."""

    def __init__(self, port, rate, threads=THREADS):
        self.port = port
        self.rate = rate
        self.threads = threads
        self.outcomes = collections.Counter()
        self.details = collections.Counter()
        self.slots = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.started = None
        self.ended = None
        self._threads = []

    def _next_slot(self):
        with self.lock:
            slot = self.slots
            self.slots += 1
        return self.started + slot / self.rate

    def _run(self):
        while not self.stopping.is_set():
            due = self._next_slot()
            delay = due - time.monotonic()
            if delay > 0 and self.stopping.wait(delay):
                return
            outcome, detail = one_request(self.port)
            with self.lock:
                self.outcomes[outcome] += 1
                if outcome != "ok":
                    self.details[f"{outcome}: {detail}"] += 1

    def start(self):
        self.started = time.monotonic()
        for index in range(self.threads):
            thread = threading.Thread(target=self._run, name=f"load-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self):
        self.stopping.set()
        self.ended = time.monotonic()
        for thread in self._threads:
            thread.join(TIMEOUT + 2)

    def result(self):
        total = sum(self.outcomes.values())
        seconds = (self.ended or time.monotonic()) - self.started
        return {
            "requests": total,
            "seconds": round(seconds, 3),
            "rate": round(total / seconds, 1) if seconds > 0 else 0.0,
            "ok": self.outcomes["ok"],
            "failed": total - self.outcomes["ok"],
            "outcomes": dict(self.outcomes),
            "details": dict(self.details.most_common(10)),
        }


class KeepAlive:
    """Clients reusing their connection; the server may close it only on an answer."""

    PAUSE = 0.01

    def __init__(self, port, clients):
        self.port = port
        self.outcomes = collections.Counter()
        self.details = collections.Counter()
        self.connections = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(self.PAUSE + 0.005 * index,), daemon=True)
                        for index in range(clients)]

    def _run(self, pause):
        conn = None
        while not self.stopping.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
                with self.lock:
                    self.connections += 1
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as error:
                with self.lock:
                    self.outcomes["failed"] += 1
                    self.details[type(error).__name__] += 1
                conn.close()
                conn = None
            else:
                with self.lock:
                    self.outcomes["ok" if 200 <= response.status < 300 else "non_2xx"] += 1
                if response.will_close:
                    conn.close()
                    conn = None
            self.stopping.wait(pause)
        if conn is not None:
            conn.close()

    def start(self):
        for thread in self.threads:
            thread.start()
        return self

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(TIMEOUT + 2)

    def result(self):
        total = sum(self.outcomes.values())
        return {"clients": len(self.threads), "requests": total, "connections": self.connections,
                "ok": self.outcomes["ok"], "failed": total - self.outcomes["ok"],
                "outcomes": dict(self.outcomes), "details": dict(self.details)}


def main(argv):
    port, rate, max_seconds = int(argv[0]), float(argv[1]), float(argv[2])
    keepalive = KeepAlive(port, int(argv[3]) if len(argv) > 3 else 0).start()
    load = Load(port, rate).start()
    waiter = threading.Thread(target=sys.stdin.readline, daemon=True)
    waiter.start()
    waiter.join(max_seconds)
    load.stop()
    keepalive.stop()
    print(json.dumps({**load.result(), "keepalive": keepalive.result()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
