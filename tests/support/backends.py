"""Back-end servers on 127.0.0.1 that HAProxy balances to and health-checks.

HttpBackend answers GET, HEAD and OPTIONS (HAProxy's default health check
is `OPTIONS /`) over HTTP/1.1 with Content-Length:
  /                    the backend's name
  /bytes/<n>           exactly n bytes
  /slow/<n>/<seconds>  n bytes, streamed over that many seconds
Set `healthy = False` and every request answers 500.

TcpEchoBackend sends one line with its name, then echoes what it gets.

Both count what they serve, can be stopped and started again on the same
port, and stop() also closes the connections that are still open.
"""
import http.server
import re
import socket
import socketserver
import threading
import time

from .ports import LOOPBACK, free_port


class _TrackingMixin:
    """Remembers open client sockets so stop() can cut them."""

    daemon_threads = True
    allow_reuse_address = True

    def process_request(self, request, client_address):
        with self.backend._lock:
            self.backend._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.backend._lock:
            self.backend._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        # A client (or stop()) cutting a connection is routine here.
        pass


class _Backend:
    """Start/stop bookkeeping shared by the HTTP and TCP back-ends."""

    server_class = None
    handler_class = None

    def __init__(self, name, port=None):
        self.name = name
        self.host = LOOPBACK
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._connections = set()
        self._server = None
        self._thread = None
        self.requests = 0
        self.connections = 0

    @property
    def address(self):
        return f"{self.host}:{self.port}"

    @property
    def running(self):
        return self._server is not None

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} {self.address}>"

    def _count(self, attribute):
        with self._lock:
            setattr(self, attribute, getattr(self, attribute) + 1)

    def start(self):
        if self._server is not None:
            return self
        server = self.server_class((self.host, self.port), self.handler_class)
        server.backend = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"backend {self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._thread.join(5)
        with self._lock:
            open_connections, self._connections = list(self._connections), set()
        for connection in open_connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "test-backend"
    _SLOW = re.compile(r"^/slow/(\d+)/(\d+(?:\.\d+)?)$")
    _BYTES = re.compile(r"^/bytes/(\d+)$")

    def log_message(self, format, *args):
        pass

    def _respond(self, status, body=b"", with_body=True, content_type="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", self.server.backend.name)
        self.end_headers()
        if with_body and body:
            self.wfile.write(body)

    def _serve(self, with_body):
        backend = self.server.backend
        backend._count("requests")
        path = self.path.split("?", 1)[0]
        if not backend.healthy:
            self._respond(500, b"unhealthy\n", with_body)
            return
        if self.command == "OPTIONS" or path == "/":
            self._respond(200, backend.name.encode(), with_body)
            return
        match = self._BYTES.match(path)
        if match:
            self._respond(200, _payload(int(match.group(1))), with_body, "application/octet-stream")
            return
        match = self._SLOW.match(path)
        if match:
            self._stream(int(match.group(1)), float(match.group(2)), with_body)
            return
        self._respond(404, b"not found\n", with_body)

    def _stream(self, size, seconds, with_body):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.send_header("X-Backend", self.server.backend.name)
        self.end_headers()
        if not with_body:
            return
        self.wfile.flush()
        body = _payload(size)
        steps = max(1, min(size, 20))
        chunk = -(-size // steps)
        started = time.monotonic()
        for index, offset in enumerate(range(0, size, chunk)):
            delay = started + seconds * index / steps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.wfile.write(body[offset:offset + chunk])
            self.wfile.flush()

    def do_GET(self):
        self._serve(with_body=True)

    def do_HEAD(self):
        self._serve(with_body=False)

    def do_OPTIONS(self):
        self._serve(with_body=True)


def _payload(size):
    pattern = b"0123456789abcdef"
    return (pattern * (size // len(pattern) + 1))[:size]


class _HttpServer(_TrackingMixin, http.server.ThreadingHTTPServer):
    def server_bind(self):
        # HTTPServer.server_bind() resolves the host name (getfqdn): skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class HttpBackend(_Backend):
    """A threaded HTTP/1.1 server named `name`; see the module docstring."""

    server_class = _HttpServer
    handler_class = _HttpHandler

    def __init__(self, name, port=None):
        super().__init__(name, port)
        self.healthy = True


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        backend = self.server.backend
        backend._count("connections")
        self.request.sendall(backend.name.encode() + b"\n")
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.request.sendall(data)


class _TcpServer(_TrackingMixin, socketserver.ThreadingTCPServer):
    pass


class TcpEchoBackend(_Backend):
    """Sends '<name>\\n' on connect, then echoes; counts connections."""

    server_class = _TcpServer
    handler_class = _EchoHandler
