"""The one place that starts processes: argument lists, never a shell.

Only `service = system` runs anything as root: `service haproxy
start|stop|reload`, through `privileged()`, which prefixes `sudo -n` when
`[worker:haproxy] sudo = true`; the sudoers file lists exactly those argv.
Files are never copied, moved or removed through root: the worker writes
its own (libra_worker.safe_files).
"""
import collections
import logging
import os
import subprocess
import time

from libra_worker import safe_files
from libra_worker.errors import CommandFailed

LOG = logging.getLogger(__name__)

SUDO = "/usr/bin/sudo"
SERVICE = "/usr/sbin/service"
DEFAULT_TIMEOUT = 30.0


def last_lines(text, count=3):
    """HAProxy and friends put the reason last; keep it on one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-count:])


class Commands:
    def __init__(self, sudo, timeout=DEFAULT_TIMEOUT):
        self.sudo = sudo
        self.timeout = timeout
        # the last argv run as root, for audits and tests; bounded: a worker runs for months
        self.privileged_log = collections.deque(maxlen=1000)

    def run(self, argv, stdin=None, timeout=None, check=True):
        """Run argv; returns CompletedProcess (text) or raises CommandFailed."""
        return self.start(argv, stdin=stdin, timeout=timeout).result(check=check)

    def start(self, argv, stdin=None, timeout=None):
        """Start argv and return at once: Running.result() waits for it."""
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       errors="replace", close_fds=True)
        except FileNotFoundError:
            raise CommandFailed(f"{argv[0]} not found") from None
        except OSError as error:
            raise CommandFailed(f"cannot start {argv[0]}: {error.strerror}") from None
        return Running(process, argv, stdin, timeout or self.timeout)

    def spawn(self, argv, output_path):
        """Start a long-lived process in its own session, output appended to a file."""
        try:
            output = safe_files.open_append(output_path, 0o600)
        except safe_files.OddFile as error:
            raise CommandFailed(str(error)) from None
        except OSError as error:
            raise CommandFailed(f"cannot open {output_path}: {error.strerror}") from None
        try:
            # Its own session and process group: a signal to the worker's group
            # (a terminal's ^C, a restart) never reaches HAProxy.
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                    close_fds=True, start_new_session=True)
        except FileNotFoundError:
            raise CommandFailed(f"{argv[0]} not found") from None
        except OSError as error:
            raise CommandFailed(f"cannot start {argv[0]}: {error}") from None
        finally:
            os.close(output)

    def open_pipe(self, argv):
        """Start a command to talk to through its stdin and stdout (binary, unbuffered)."""
        try:
            return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, close_fds=True, bufsize=0)
        except OSError as error:
            raise CommandFailed(f"cannot start {argv[0]}: {error}") from None

    def privileged(self, argv, stdin=None, timeout=None, check=True):
        """Run an absolute-path command as root (through `sudo -n` when configured)."""
        self.privileged_log.append(list(argv))
        LOG.debug("privileged: %s", " ".join(argv))
        return self.run([SUDO, "-n", *argv] if self.sudo else list(argv),
                        stdin=stdin, timeout=timeout, check=check)

    def service(self, name, action):
        self.privileged([SERVICE, name, action])


class Running:
    """A command started by Commands.start(), running while the worker does something else."""

    def __init__(self, process, argv, stdin, timeout):
        self.process = process
        self.name = os.path.basename(argv[2] if argv[0] == SUDO else argv[0])
        self.stdin = stdin
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout

    def result(self, check=True):
        """Wait for it: CompletedProcess (text), or CommandFailed (timed out, or failed and `check`)."""
        try:
            stdout, stderr = self.process.communicate(
                self.stdin, timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.abandon()
            raise CommandFailed(f"{self.name} timed out after {self.timeout:g}s") from None
        result = subprocess.CompletedProcess(self.process.args, self.process.returncode, stdout, stderr)
        if check and result.returncode != 0:
            reason = last_lines(stderr or stdout) or f"exit status {result.returncode}"
            raise CommandFailed(f"{self.name} failed: {reason}")
        return result

    def abandon(self):
        """Its result is no longer wanted: kill it if it still runs, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()
