"""HAProxy's log, received by the worker itself in `service = process` mode.

On a packaged device (`service = system`) the system's syslog (rsyslog)
receives HAProxy's messages at `log_target` (/dev/log) and writes
`[worker:haproxy] logfile`.  In process mode there may be no syslog at all,
so when `log_target` is a socket path of its own (not /dev/log) the worker
binds a unix datagram socket there and appends every message HAProxy sends
to `logfile`, one line each, in the shape rsyslog writes:

    Nov 22 18:26:39 <hostname> haproxy[19896]: 127.0.0.1:38016 [...] http http_servers/101 ...

The file is reopened when it was moved or removed (logrotate, DELETE), and
HAProxy addresses every message to the socket's path, so a restarted
worker that binds the path again keeps receiving from a running HAProxy.
"""
import errno
import logging
import os
import re
import select
import socket
import stat
import threading

from libra_worker import safe_files

LOG = logging.getLogger(__name__)

SYSTEM_LOG_SOCKET = "/dev/log"
FILE_MODE = 0o640
SOCKET_MODE = 0o660
MAX_DATAGRAM = 65536
_PRI = re.compile(rb"^<\d{1,3}>")
_RFC3164_TIME = re.compile(rb"^[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d ")


def format_line(datagram, hostname):
    """One syslog datagram from HAProxy → one log file line (bytes, ending in b'\\n')."""
    message = _PRI.sub(b"", datagram, count=1).rstrip(b"\r\n\0")
    message = message.replace(b"\r", b" ").replace(b"\n", b" ").replace(b"\0", b" ")
    match = _RFC3164_TIME.match(message)
    if match:
        message = match.group(0) + hostname + b" " + message[match.end():]
    return message + b"\n"


def wanted(settings):
    """True when HAProxy's log target is a socket this worker should serve."""
    target = settings.log_target
    return (settings.service == "process" and os.path.isabs(target)
            and os.path.normpath(target) != SYSTEM_LOG_SOCKET)


def for_settings(settings):
    """The sink these HaproxySettings call for, or None (syslog writes the file)."""
    if wanted(settings):
        return LogSink(settings.log_target, settings.logfile)
    LOG.debug("HAProxy logs to %s; %s is written by the system's syslog",
              settings.log_target, settings.logfile)
    return None


class LogSink:
    """A unix datagram socket at `socket_path` whose messages are appended to `logfile`."""

    def __init__(self, socket_path, logfile):
        self.socket_path = socket_path
        self.logfile = logfile
        self.hostname = socket.gethostname().encode("ascii", "replace") or b"localhost"
        self._sock = None
        self._thread = None
        self._wake_read = self._wake_write = None
        self._stopping = threading.Event()
        self._fd = None
        self._fd_id = None
        self.lines_written = 0
        self.write_errors = 0

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    # -- start / stop ----------------------------------------------------
    def start(self):
        """Bind the socket and start the receiving thread; OSError if the path is not ours to take."""
        if self.running:
            return self
        self._clear_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.socket_path)
            os.chmod(self.socket_path, SOCKET_MODE)
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            except OSError:
                pass
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._wake_read, self._wake_write = os.pipe()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="haproxy-log-sink", daemon=True)
        self._thread.start()
        LOG.info("receiving HAProxy's log at %s into %s", self.socket_path, self.logfile)
        return self

    def _clear_stale_socket(self):
        """Remove a socket file that nobody receives on (a previous worker's); refuse anything else."""
        try:
            mode = os.lstat(self.socket_path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, f"{self.socket_path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(self.socket_path)
        except ConnectionRefusedError:
            os.unlink(self.socket_path)
            return
        except OSError as error:
            raise OSError(error.errno, f"{self.socket_path}: {error.strerror}") from None
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, f"another process receives on {self.socket_path}")

    def stop(self, timeout=5.0):
        """Stop receiving, write what arrived, close the file and remove the socket."""
        if self._thread is None:
            return
        self._stopping.set()
        try:
            os.write(self._wake_write, b"x")
        except OSError:
            pass
        self._thread.join(timeout)
        self._thread = None
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_read = self._wake_write = None
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass
        self._sock.close()
        self._sock = None
        self._close_file()

    # -- the receiving thread ----------------------------------------------
    def _run(self):
        while not self._stopping.is_set():
            try:
                readable, _, _ = select.select([self._sock, self._wake_read], [], [])
            except InterruptedError:
                continue
            if self._sock in readable:
                self._write(self._drain())
        # What HAProxy sent before the stop is written too.
        self._write(self._drain())

    def _drain(self, limit=512):
        lines = []
        while len(lines) < limit:
            try:
                datagram = self._sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                LOG.warning("HAProxy log socket %s: %s", self.socket_path, error.strerror)
                break
            if datagram:
                lines.append(format_line(datagram, self.hostname))
        return lines

    def _write(self, lines):
        if not lines:
            return
        data = b"".join(lines)
        try:
            fd = self._file()
            while data:
                data = data[os.write(fd, data):]
            self.lines_written += len(lines)
        except OSError as error:
            self.write_errors += 1
            if self.write_errors in (1, 10, 100) or self.write_errors % 1000 == 0:
                LOG.error("cannot write HAProxy's log to %s: %s (%d failed writes)",
                          self.logfile, error.strerror, self.write_errors)
            self._close_file()

    def _file(self):
        """The open log file; reopened when the path now names another file or none."""
        try:
            info = os.lstat(self.logfile)
            current = (info.st_dev, info.st_ino)
        except FileNotFoundError:
            current = None
        if self._fd is None or current != self._fd_id:
            self._close_file()
            # A link, FIFO or directory planted there is refused (OddFile), never followed or waited on.
            fd = safe_files.open_append(self.logfile, FILE_MODE)
            info = os.fstat(fd)
            self._fd, self._fd_id = fd, (info.st_dev, info.st_ino)
        return self._fd

    def _close_file(self):
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = self._fd_id = None
