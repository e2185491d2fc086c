"""A back-end that records the raw request line of every HTTP request it gets.

Python's http.server rewrites what it parses (a leading '//' collapses);
this one keeps the bytes as they came, so a test can say that HAProxy's
health check sent exactly the path it was given.  Each request gets
`200 OK` (or 500 while `healthy` is False) and the connection is closed;
`answer(method, path)`, when set, gives (status line, [extra header lines])
instead.  `heads` keeps every request's head (request line and headers).
"""
import socket
import socketserver
import threading

from .ports import LOOPBACK, free_port

MAX_HEAD = 64 * 1024


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        recorder = self.server.recorder
        self.request.settimeout(5.0)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
                chunk = self.request.recv(65536)
                if not chunk:
                    break
                head += chunk
        except OSError:
            return
        head, _, rest = head.partition(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0]
        with recorder.lock:
            recorder.lines.append(line)
            recorder.heads.append(head)
        self._read_body(head, len(rest))
        body = recorder.name.encode()
        status = b"200 OK" if recorder.healthy else b"500 Internal Server Error"
        extra = []
        if recorder.answer is not None:
            method, _, path = line.partition(b" ")
            status, extra = recorder.answer(method.decode(), path.rpartition(b" ")[0].decode())
            status = status.encode()
        try:
            self.request.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\nX-Backend: " + body + b"\r\n"
                                 + b"".join(header.encode() + b"\r\n" for header in extra)
                                 + b"Connection: close\r\n\r\n" + body)
        except OSError:
            pass

    def _read_body(self, head, received):
        """Read a Content-Length body to its end, so the client sees the answer, not a reset."""
        length = 0
        for header in head.split(b"\r\n")[1:]:
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value)
        left = length - received
        try:
            while left > 0:
                chunk = self.request.recv(min(left, 65536))
                if not chunk:
                    return
                left -= len(chunk)
        except OSError:
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass


class RequestLineRecorder:
    """Listens on 127.0.0.1:<port>; `lines` holds every request line (bytes), oldest first."""

    def __init__(self, name="recorder", port=None):
        self.name = name
        self.host = LOOPBACK
        self.port = port or free_port()
        self.lines = []
        self.heads = []
        self.answer = None
        self.lock = threading.Lock()
        self.healthy = True
        self._server = None
        self._thread = None

    @property
    def address(self):
        return f"{self.host}:{self.port}"

    def start(self):
        self._server = _Server((self.host, self.port), _Handler)
        self._server.recorder = self
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join(5)

    def seen(self):
        with self.lock:
            return list(self.lines)

    def count(self, line):
        with self.lock:
            return self.lines.count(line)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


def check_line(path):
    """The request line of HAProxy's `option httpchk GET <path>` health check."""
    return b"GET " + path.encode("ascii") + b" HTTP/1.0"


def raw_get(port, path, host=LOOPBACK, timeout=5.0):
    """One GET of `path` sent byte for byte (no client-side quoting) → (status, body)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"GET " + path.encode("ascii") + b" HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body
