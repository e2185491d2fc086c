"""libra_worker run as a real process (`--nodaemon`) with its files in a temp dir."""
import configparser
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .client import GearClient

VENV_BIN = Path(sys.executable).parent     # not resolved: the venv's bin, not /usr/bin
LIBRA_WORKER = VENV_BIN / "libra_worker"
PYTHON = VENV_BIN / Path(sys.executable).name
PROJECT = Path(__file__).resolve().parents[2]
CLIENT_SCRIPT = PROJECT / "bin" / "client.py"
# The HAProxy under test: the distribution's, or the other supported series
# built by scripts/build-haproxy (scripts/test runs the suite on both).
HAPROXY = os.environ.get("LIBRA_TEST_HAPROXY", "/usr/sbin/haproxy")
SOCAT = "/usr/bin/socat"


def unique_name(prefix="test"):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def sudo_ini(**haproxy_options):
    """extra_ini for a worker that runs HAProxy through sudo, as the contract's production setting."""
    return {"worker:haproxy": {"sudo": "true", **haproxy_options}}


def _address(server):
    return str(getattr(server, "address", server))


def write_config(path, tmpdir, servers, name=None, extra_ini=None):
    """A complete, valid INI for a worker whose files all live in `tmpdir`.

    `extra_ini` maps section → {key: value}; a value of None removes the key.
    `name=None` leaves [worker] name out (the worker then uses the hostname).
    """
    tmpdir = Path(tmpdir)
    sections = {
        "gearman": {
            "servers": ", ".join(_address(server) for server in servers),
            "reconnect_sleep": "2",
        },
        "worker": {
            "driver": "haproxy",
            "logfile": str(tmpdir / "worker.log"),
            "pid": str(tmpdir / "worker.pid"),
        },
        "worker:haproxy": {
            "service": "process",
            "haproxy": HAPROXY,
            "socat": SOCAT,
            "config": str(tmpdir / "haproxy" / "haproxy.cfg"),
            "pidfile": str(tmpdir / "haproxy" / "haproxy.pid"),
            "stats_socket": str(tmpdir / "haproxy" / "stats.sock"),
            "master_socket": str(tmpdir / "haproxy" / "master.sock"),
            "statsfile": str(tmpdir / "haproxy" / "haproxy.stats"),
            "logfile": str(tmpdir / "haproxy" / "haproxy.log"),
            "log_target": "/dev/log",  # not the default's /run/libra socket, shared by every test
            "bind_address": "127.0.0.1",
            "sudo": "false",
        },
    }
    if name is not None:
        sections["worker"]["name"] = name
    for section, values in (extra_ini or {}).items():
        target = sections.setdefault(section, {})
        for key, value in values.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = str(value)
    (tmpdir / "haproxy").mkdir(parents=True, exist_ok=True)
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_dict(sections)
    with open(path, "w", encoding="utf-8") as stream:
        ini.write(stream)
    return sections


def run_worker(args, timeout=15.0, cwd=None):
    """`libra_worker ARGS` to completion → CompletedProcess (text)."""
    return subprocess.run([str(LIBRA_WORKER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)


class WorkerProcess:
    """`libra_worker --nodaemon --config <tmpdir>/worker.ini [args]` as a child process."""

    def __init__(self, tmpdir, servers, name=None, extra_ini=None, args=()):
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if isinstance(servers, str) or hasattr(servers, "address"):
            servers = [servers]
        self.servers = [_address(server) for server in servers]
        self.config_path = self.dir / "worker.ini"
        self.sections = write_config(self.config_path, self.dir, self.servers,
                                     unique_name() if name is None else name, extra_ini)
        worker = self.sections["worker"]
        self.name = worker.get("name") or socket.gethostname()
        self.logfile = Path(worker["logfile"]) if worker.get("logfile") else None
        self.args = [str(arg) for arg in args]
        self.stdout_path = self.dir / "stdout.txt"
        self.stderr_path = self.dir / "stderr.txt"
        self.proc = None

    @property
    def command(self):
        return [str(LIBRA_WORKER), "--nodaemon", "--config", str(self.config_path), *self.args]

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def __repr__(self):
        return f"<WorkerProcess {self.name} pid={self.pid}>"


    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            return self
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.stdout_path, "ab") as stdout, open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=stdout,
                                         stderr=stderr, cwd=self.dir, env=environment)
        return self

    def alive(self):
        """the worker process exited"""
        return self.proc is not None and self.proc.poll() is None

    def wait_registered(self, timeout=15.0, servers=None):
        """Send DISCOVER until the worker answers; returns that reply.

        The job waits in gearmand until the worker registers its function,
        so one job is enough; fails at once if the process exits.
        """
        deadline = time.monotonic() + timeout
        with GearClient(servers or self.servers, connect_timeout=timeout) as client:
            job = client.send(self.name, {"hpcs_action": "DISCOVER"})
            try:
                raw = client.wait(job, max(0.1, deadline - time.monotonic()), alive=self.alive)
            except (AssertionError, TimeoutError) as error:
                raise AssertionError(f"worker {self.name} never answered DISCOVER ({error}); "
                                     f"exit status {self.proc.poll()}; {self.diagnosis()}") from None
        return raw

    def wait_exit(self, timeout=10.0):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout=10.0):
        """SIGTERM, wait, then SIGKILL; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(timeout) is None:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        return self.proc.returncode if self.proc else None

    def log_text(self):
        try:
            return self.logfile.read_text(errors="replace")
        except (AttributeError, FileNotFoundError):
            return ""

    def stdout_text(self):
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr_text(self):
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def diagnosis(self, lines=15):
        """The tail of stderr and of the log, for assertion messages."""
        stderr = self.stderr_text().splitlines()[-lines:]
        log = self.log_text().splitlines()[-lines:]
        return "stderr: " + " | ".join(stderr) + " ;; log: " + " | ".join(log)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


class PrefixedWorker(WorkerProcess):
    """The worker started through `prefix` (an argv: setpriv, unshare...), as a unit or a script would."""

    def __init__(self, *args, prefix, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix = prefix

    @property
    def command(self):
        return [*self.prefix, *super().command]
