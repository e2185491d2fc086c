"""gear, tuned for a worker that lives for months next to flaky job servers.

- TCP_NODELAY on every socket: without it each reply waits ~40 ms on
  Nagle + delayed ACK.
- Replies are sent with sendall (gear's own loop resends from the start of
  the buffer after a partial send).
- Reconnects back off exponentially per job server, capped at
  `reconnect_sleep`, and an outage is logged once when it starts and once
  when it ends, instead of gear's line per attempt.
"""
import logging
import os
import socket
import ssl
import time

import gear

LOG = logging.getLogger(__name__)
FIRST_RETRY_DELAY = 0.5
READ_CHUNK = 1 << 20
CONNECT_TIMEOUT = 5.0


class NoDelayConnection(gear.Connection):
    def connect(self):
        """Connect within CONNECT_TIMEOUT: gear's own connect has none, and one
        job server that swallows SYNs would stall every reconnect behind it."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        except OSError as error:
            raise gear.ConnectionError(f"cannot connect to {self.host}:{self.port}: {error}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, self.tcp_keepidle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, self.tcp_keepintvl)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, self.tcp_keepcnt)
            if self.use_ssl:  # the handshake is bounded by the same timeout
                context = gear.create_ssl_context()
                context.verify_mode = ssl.CERT_REQUIRED
                context.check_hostname = False
                context.load_cert_chain(self.ssl_cert, self.ssl_key)
                context.load_verify_locations(self.ssl_ca)
                sock = context.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(None)
        except (OSError, ssl.SSLError) as error:
            sock.close()
            raise gear.ConnectionError(f"cannot set up {self.host}:{self.port}: {error}") from None
        self.conn = sock
        self.connected = True
        self.connect_time = time.time()
        self.input_buffer = b""
        self.need_bytes = False

    def _readRawBytes(self, bytes_to_read):
        # gear appends each segment to one bytes buffer, quadratic in the packet
        # size with its 4 KiB reads; large reads keep a 10 MB job from costing
        # the worker seconds of CPU.
        return super()._readRawBytes(max(bytes_to_read, READ_CHUNK))

    def sendRaw(self, data):
        with self.send_lock:
            self.conn.sendall(data)


class _ServerPool:
    """addServer() that builds NoDelayConnections; shared by worker and client."""

    def addServer(self, host, port=4730, ssl_key=None, ssl_cert=None, ssl_ca=None,
                  keepalive=False, tcp_keepidle=7200, tcp_keepintvl=75, tcp_keepcnt=9):
        with self.connections_condition:
            for conn in self.active_connections + self.inactive_connections:
                if (conn.host, conn.port) == (host, port):
                    raise gear.ConfigurationError(f"job server {host}:{port} given twice")
            self.inactive_connections.append(NoDelayConnection(
                host, port, ssl_key, ssl_cert, ssl_ca, self.client_id,
                keepalive, tcp_keepidle, tcp_keepintvl, tcp_keepcnt))
            self.connections_condition.notify_all()


class Client(_ServerPool, gear.Client):
    """A gear client with TCP_NODELAY (bin/client.py, tests, bench)."""


class Worker(_ServerPool, gear.Worker):
    """A gear worker with per-server backoff and one log line per outage."""

    def __init__(self, client_id, reconnect_sleep):
        self.reconnect_cap = max(reconnect_sleep, 0.1)
        self._retry_delay = {}   # connection → seconds before the next attempt
        self._retry_at = {}      # connection → monotonic time of the next attempt
        self._down_since = {}    # connection → wall time its outage started
        super().__init__(client_id)

    @staticmethod
    def _label(conn):
        return f"{conn.host}:{conn.port}"

    def _note_down(self, conn, why):
        if conn not in self._down_since:
            self._down_since[conn] = time.time()
            LOG.warning("job server %s is unreachable (%s); retrying with backoff up to %gs",
                        self._label(conn), why, self.reconnect_cap)

    def _lostConnection(self, conn):
        self._note_down(conn, "connection lost")
        super()._lostConnection(conn)

    def _doConnectLoop(self):
        # Replaces gear's fixed 2 s retry: each server has its own backoff,
        # and a freshly lost server is retried at once.
        while self.running:
            with self.connections_condition:
                now = time.monotonic()
                due = [conn for conn in self.inactive_connections
                       if self._retry_at.get(conn, 0) <= now]
                if not due:
                    waits = [self._retry_at.get(conn, 0) - now for conn in self.inactive_connections]
                    self.connections_condition.wait(min(waits) if waits else None)
                    continue
            for conn in due:
                if self.running:
                    try:
                        self._try_connect(conn)
                    except Exception:  # this thread must outlive any one bad attempt
                        LOG.exception("reconnecting to job server %s failed", self._label(conn))

    def _try_connect(self, conn):
        try:
            conn.reconnect()
            self._onConnect(conn)
        except Exception as error:  # socket, TLS or protocol error: all mean "retry later"
            conn.disconnect()
            self._note_down(conn, str(error) or type(error).__name__)
            delay = min(self._retry_delay.get(conn, FIRST_RETRY_DELAY / 2) * 2, self.reconnect_cap)
            self._retry_delay[conn] = delay
            self._retry_at[conn] = time.monotonic() + delay
            return
        with self.connections_condition:
            self.inactive_connections.remove(conn)
            self.active_connections.append(conn)
            self._retry_delay.pop(conn, None)
            self._retry_at.pop(conn, None)
            self.connections_condition.notify_all()
            os.write(self.wake_write, b"1\n")
        self._onActiveConnection(conn)
        down_since = self._down_since.pop(conn, None)
        if down_since is None:
            LOG.info("connected to job server %s", self._label(conn))
        else:
            LOG.warning("job server %s is back after %.1fs", self._label(conn), time.time() - down_since)


def add_servers(pool, gearman_settings):
    """Connect a Worker or Client to every configured job server."""
    for host, port in gearman_settings.servers:
        pool.addServer(host, port,
                       ssl_key=gearman_settings.ssl_key,
                       ssl_cert=gearman_settings.ssl_cert,
                       ssl_ca=gearman_settings.ssl_ca,
                       keepalive=gearman_settings.keepalive,
                       tcp_keepidle=gearman_settings.keepidle,
                       tcp_keepintvl=gearman_settings.keepintvl,
                       tcp_keepcnt=gearman_settings.keepcnt)
