"""Starting, reloading and stopping HAProxy, in the two service modes.

process: the worker runs `haproxy -W -S <master socket> -D` itself and talks
         to the master CLI (reload, then `show proc` to see the new worker
         and that no reload failed).
system:  `sudo -n service haproxy start|stop|reload`, as on a packaged
         device; a reload counts as done when the stats socket answers from
         a new process.
"""
import logging
import os
import re
import signal
import socket
import time

from libra_worker.errors import ServiceError

LOG = logging.getLogger(__name__)

POLL_INTERVAL = 0.01
_PROC_LINE = re.compile(r"^(\d+)\s+(master|worker)\s+(\d+)(?:\s+\[failed:\s*(\d+)\])?", re.M)


def unix_request(path, command, timeout=5.0):
    """Send one command to an HAProxy CLI socket and return the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(command.encode() + b"\n")
        conn.shutdown(socket.SHUT_WR)  # end of input: the CLI answers, then closes
        chunks = []
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return b"".join(chunks).decode("utf-8", "replace")
            chunks.append(chunk)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ProcState:
    """What the master CLI's `show proc` says."""

    def __init__(self, text):
        self.master_pid = None
        self.failed_reloads = 0
        self.workers = []  # (pid, reloads survived)
        for match in _PROC_LINE.finditer(text):
            pid, kind, reloads, failed = match.groups()
            if kind == "master":
                self.master_pid = int(pid)
                self.failed_reloads = int(failed or 0)
            else:
                self.workers.append((int(pid), int(reloads)))

    @property
    def current_worker(self):
        """The worker started by the last successful (re)load: it has survived no reload."""
        fresh = [pid for pid, reloads in self.workers if reloads == 0]
        return fresh[0] if fresh else None


class ProcessService:
    """HAProxy in master-worker mode, started and reloaded by the worker itself."""

    def __init__(self, settings, commands, start_timeout=10.0):
        self.settings = settings
        self.commands = commands
        self.start_timeout = start_timeout

    def _show_proc(self):
        return ProcState(unix_request(self.settings.master_socket, "show proc"))

    def state(self):
        """ProcState, or None when no master answers."""
        try:
            return self._show_proc()
        except OSError:
            return None

    def running(self):
        state = self.state()
        return bool(state and state.current_worker)

    def worker_pid(self):
        state = self.state()
        return state.current_worker if state else None

    def start(self):
        if self.running():
            return
        self.commands.run([self.settings.haproxy, "-W", "-S", f"{self.settings.master_socket},mode,600",
                           "-f", self.settings.config, "-D"], timeout=self.start_timeout)
        self._wait(lambda state: state is not None and state.current_worker,
                   "HAProxy did not start its worker")

    def reload(self):
        before = self.state()
        if before is None or before.current_worker is None:
            return self.start()
        try:
            unix_request(self.settings.master_socket, "reload")
        except OSError as error:
            raise ServiceError(f"cannot reach HAProxy's master socket: {error}") from None
        state = self._wait(
            lambda state: state is not None and (
                state.failed_reloads > before.failed_reloads
                or state.current_worker not in (None, before.current_worker)),
            "HAProxy did not finish the reload")
        if state.failed_reloads > before.failed_reloads:
            raise ServiceError(f"HAProxy failed to reload: {self._startup_error()}")

    def _startup_error(self):
        try:
            text = unix_request(self.settings.master_socket, "show startup-logs")
        except OSError:
            return "no startup log"
        alerts = [line.strip() for line in text.splitlines() if "ALERT" in line]
        return " | ".join(alerts[-3:]) or "no reason given"

    def stop(self):
        state = self.state()
        master = state.master_pid if state else self._pid_from_file()
        if master is None or not pid_alive(master):
            return
        try:
            os.kill(master, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + self.start_timeout
        while pid_alive(master) or (state and any(pid_alive(pid) for pid, _ in state.workers)):
            if time.monotonic() > deadline:
                raise ServiceError(f"HAProxy (pid {master}) did not stop")
            time.sleep(POLL_INTERVAL)

    def _pid_from_file(self):
        try:
            with open(self.settings.pidfile) as stream:
                return int(stream.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _wait(self, done, what):
        deadline = time.monotonic() + self.start_timeout
        while True:
            state = self.state()
            if done(state):
                return state
            if time.monotonic() > deadline:
                raise ServiceError(f"{what} within {self.start_timeout:g}s")
            time.sleep(POLL_INTERVAL)


class SystemService:
    """HAProxy as the device's packaged service (init script or systemd unit)."""

    def __init__(self, settings, commands, query_pid, start_timeout=10.0):
        self.settings = settings
        self.commands = commands
        self.query_pid = query_pid  # () -> pid answering the stats socket, or None
        self.start_timeout = start_timeout

    def worker_pid(self):
        return self.query_pid()

    def running(self):
        return self.worker_pid() is not None

    def start(self):
        self.commands.service("haproxy", "start")
        self._wait(lambda pid: pid is not None, "HAProxy did not start")

    def reload(self):
        before = self.worker_pid()
        if before is None:
            return self.start()
        self.commands.service("haproxy", "reload")
        self._wait(lambda pid: pid not in (None, before), "HAProxy did not reload")

    def stop(self):
        self.commands.service("haproxy", "stop")
        self._wait(lambda pid: pid is None, "HAProxy did not stop")

    def _wait(self, done, what):
        deadline = time.monotonic() + self.start_timeout
        while not done(self.worker_pid()):
            if time.monotonic() > deadline:
                raise ServiceError(f"{what} within {self.start_timeout:g}s")
            time.sleep(POLL_INTERVAL * 5)


def make_service(settings, commands, query_pid):
    if settings.service == "process":
        return ProcessService(settings, commands)
    return SystemService(settings, commands, query_pid)

