"""A real gearmand on 127.0.0.1 and a free port, its files in a temp dir."""
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from .ports import LOOPBACK, free_port, port_open, wait_port, wait_port_closed

GEARMAND = "/usr/sbin/gearmand"


def _process_state(pid):
    """'R', 'S', 'Z', ... for a live pid; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[0]


def _alive(pid):
    return _process_state(pid) not in (None, "Z", "X")


class Gearmand:
    """gearmand -d with its pid file and log in `tmpdir`.

    The daemon detaches, so it is tracked by its pid file; `stop()` and
    `kill()` signal that pid only after checking it is this gearmand.
    """

    def __init__(self, tmpdir, port=None, threads=1):
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = LOOPBACK
        self.port = port or free_port()
        self.threads = threads
        self.pidfile = self.dir / f"gearmand-{self.port}.pid"
        self.logfile = self.dir / f"gearmand-{self.port}.log"
        self.pid = None

    @property
    def address(self):
        return f"{self.host}:{self.port}"

    @property
    def running(self):
        return self.pid is not None and _alive(self.pid)

    def __repr__(self):
        return f"<Gearmand {self.address} pid={self.pid}>"

    def start(self, timeout=10.0):
        if self.running:
            return self
        if port_open(self.host, self.port):
            raise RuntimeError(f"cannot start gearmand: {self.address} is already taken")
        self.pidfile.unlink(missing_ok=True)
        command = [GEARMAND, "-L", self.host, "-p", str(self.port), "-d",
                   "--pid-file", str(self.pidfile), "-l", str(self.logfile),
                   "-t", str(self.threads), "--verbose", "WARNING"]
        # -d forks and the parent exits at once; the daemon keeps running.
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: "
                               f"{result.stderr.strip()} {self._log_tail()}")
        deadline = time.monotonic() + timeout
        while self.pid is None:
            try:
                self.pid = int(self.pidfile.read_text().strip())
            except (FileNotFoundError, ValueError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gearmand wrote no pid file {self.pidfile}: "
                                       f"{self._log_tail()}") from None
                time.sleep(0.01)
        try:
            wait_port(self.host, self.port, max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"gearmand never listened on {self.address}: {self._log_tail()}") from None
        return self

    def _is_ours(self):
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return False
        return bool(cmdline) and cmdline[0].endswith(b"gearmand") and str(self.pidfile).encode() in cmdline

    def _signal_and_wait(self, signum, timeout):
        if self.pid is None:
            return True
        if _alive(self.pid) and self._is_ours():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while _alive(self.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, timeout=5.0):
        """SIGTERM, then SIGKILL; returns once the port is closed."""
        if self.pid is not None:
            if not self._signal_and_wait(signal.SIGTERM, timeout):
                self._signal_and_wait(signal.SIGKILL, timeout)
            self.pid = None
        wait_port_closed(self.host, self.port, timeout)

    def kill(self, timeout=5.0):
        """SIGKILL: the job server vanishes without closing anything politely."""
        if self.pid is not None:
            self._signal_and_wait(signal.SIGKILL, timeout)
            self.pid = None
        wait_port_closed(self.host, self.port, timeout)

    def restart(self, timeout=10.0):
        """Stop and start again on the same port (queued jobs are lost)."""
        self.stop()
        return self.start(timeout)

    def admin(self, command, timeout=5.0):
        """A text admin command → its reply lines.

        'status' and 'workers' answer a list ended by '.'; the others
        ('version', 'maxqueue', ...) answer one line.
        """
        multi_line = command.split()[0] in ("status", "workers")
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(command.encode() + b"\n")
            buffer = b""
            while True:
                chunk = sock.recv(65536)
                buffer += chunk
                if not chunk or buffer.startswith(b"ERR"):
                    break
                if buffer.endswith(b".\n" if multi_line else b"\n"):
                    break
        lines = buffer.decode(errors="replace").splitlines()
        return lines[:-1] if multi_line and lines and lines[-1] == "." else lines

    def status(self):
        """{function: (queued, running, available_workers)} from the admin 'status'."""
        functions = {}
        for line in self.admin("status"):
            parts = line.split("\t")
            if len(parts) == 4:
                functions[parts[0]] = tuple(int(part) for part in parts[1:])
        return functions

    def _log_tail(self, lines=5):
        try:
            return " | ".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
