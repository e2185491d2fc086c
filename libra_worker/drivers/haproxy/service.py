"""Starting, reloading and stopping HAProxy, in the two service modes.

process: the worker runs `haproxy -W -S <master socket>` itself, as its own
         user, and talks to the master CLI (reload, then `show proc` to see
         the new worker and that no reload failed).  The master runs in a
         session of its own and outlives the worker (under systemd the unit's
         KillMode=process keeps it too): a restarted worker adopts it.
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

from libra_worker import safe_files
from libra_worker.drivers.haproxy.config_files import haproxy_alerts
from libra_worker.errors import ServiceError
from libra_worker.processes import pid_alive

LOG = logging.getLogger(__name__)

POLL_INTERVAL = 0.01
_PROC_LINE = re.compile(r"^(\d+)\s+(master|worker)\s+(\d+)(?:\s+\[failed:\s*(\d+)\])?", re.M)


def unix_request(path, command, timeout=5.0):
    """Send one command to an HAProxy CLI socket and return the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(os.fspath(path))
        conn.sendall(command.encode() + b"\n")
        conn.shutdown(socket.SHUT_WR)  # end of input: the CLI answers, then closes
        chunks = []
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return b"".join(chunks).decode("utf-8", "replace")
            chunks.append(chunk)


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
    def worker_pids(self):
        return {pid for pid, _ in self.workers}

    @property
    def current_worker(self):
        """The newest worker (fewest reloads survived); after a failed reload, the old one."""
        return min(self.workers, key=lambda worker: (worker[1], -worker[0]))[0] if self.workers else None


class ProcessService:
    """HAProxy in master-worker mode, started and reloaded by the worker itself.

    The master runs in its own session, not daemonized (-D would close its
    stderr): its output goes to `<master_socket>.log`, where a failed start
    or reload leaves HAProxy's own [ALERT] lines for the reply.
    """

    MAX_OUTPUT_BYTES = 1 << 20

    def __init__(self, settings, commands, start_timeout=10.0):
        self.settings = settings
        self.commands = commands
        self.start_timeout = start_timeout
        self.output_path = f"{settings.master_socket}.log"
        self._child = None  # the master we started, reaped when it exits

    def state(self):
        """ProcState, or None when no master answers."""
        self._reap()
        try:
            return ProcState(unix_request(self.settings.master_socket, "show proc"))
        except OSError:
            return None

    def running(self):
        state = self.state()
        return bool(state and state.workers)

    def worker_pid(self):
        state = self.state()
        return state.current_worker if state else None

    def ask_worker(self, pid, commands):
        """Commands (`;`-separated) for one worker process, through the master CLI."""
        line = ";".join(f"@!{pid} {command}" for command in commands.strip().split(";"))
        try:
            answer = unix_request(self.settings.master_socket, line)
        except OSError as error:
            raise ServiceError(f"cannot reach HAProxy's master socket: {error}") from None
        if answer.startswith("Can't find the target PID"):
            raise ServiceError(f"no HAProxy process {pid}")
        return answer

    def start(self):
        if self.running():
            return
        offset = self._output_offset()
        self._child = self.commands.spawn(
            [self.settings.haproxy, "-W", "-S", f"{self.settings.master_socket},mode,600",
             "-f", self.settings.config], self.output_path)
        self._wait(lambda state: state is not None and state.workers,
                   lambda: self._child is None or self._child.poll() is not None,
                   "HAProxy did not start", offset)

    def reload(self):
        before = self.state()
        if before is None or not before.workers:
            return self.start()
        offset = self._output_offset()
        try:
            unix_request(self.settings.master_socket, "reload")
        except OSError as error:
            raise ServiceError(f"cannot reach HAProxy's master socket: {error}") from None
        state = self._wait(
            lambda state: state is not None and (
                state.failed_reloads > before.failed_reloads
                or bool(state.worker_pids - before.worker_pids)),
            lambda: False, "HAProxy did not finish the reload", offset)
        if state.failed_reloads > before.failed_reloads:
            raise ServiceError(f"HAProxy failed to reload: {self._alerts_since(offset)}")

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
        workers = state.worker_pids if state else set()
        while True:
            self._reap()  # our own master stays a zombie, "alive", until collected
            if not pid_alive(master) and not any(pid_alive(pid) for pid in workers):
                return
            if time.monotonic() > deadline:
                raise ServiceError(f"HAProxy (pid {master}) did not stop")
            time.sleep(POLL_INTERVAL)

    def _reap(self):
        """Collect our master if it exited, so it leaves no zombie."""
        if self._child is not None and self._child.poll() is not None:
            self._child = None

    def _output_offset(self):
        """Where new output starts; the file restarts when it grew large (HAProxy appends)."""
        try:
            if not safe_files.check(self.output_path):
                return 0
            fd = safe_files.open_append(self.output_path, 0o600)
        except OSError:
            return 0  # an odd file there is refused when HAProxy is started
        try:
            size = os.fstat(fd).st_size
            if size > self.MAX_OUTPUT_BYTES:
                os.ftruncate(fd, 0)  # on the descriptor: a path could have become a link
                return 0
            return size
        finally:
            os.close(fd)

    def _alerts_since(self, offset):
        try:
            data = safe_files.read_bytes(self.output_path, offset + self.MAX_OUTPUT_BYTES) or b""
        except OSError as error:
            return str(error) if isinstance(error, safe_files.OddFile) else "no reason given"
        text = data[offset:].decode("utf-8", "replace")
        return haproxy_alerts(text) or "no reason given"

    def _pid_from_file(self):
        try:
            return int((safe_files.read_bytes(self.settings.pidfile, 64) or b"").split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _wait(self, done, gave_up, what, offset):
        deadline = time.monotonic() + self.start_timeout
        while True:
            state = self.state()
            if done(state):
                return state
            if gave_up():
                raise ServiceError(f"{what}: {self._alerts_since(offset)}")
            if time.monotonic() > deadline:
                raise ServiceError(f"{what} within {self.start_timeout:g}s: {self._alerts_since(offset)}")
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

    def ask_worker(self, pid, commands):
        raise ServiceError("old HAProxy processes cannot be read without a master CLI")

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

