"""The processes a bench run starts, each in the run's temp dir, on 127.0.0.1.

- Gearmand: the tests' own (tests/support/gearmand.py), a real gearmand on a
  free port tracked by its pid file;
- LibraWorker: `libra_worker --nodaemon` configured like scripts/demo
  (service = process, sudo = false, every HAProxy path in the temp dir);
- EchoWorker: bench/echo.py, the floor for a Gearman round trip;
- HttpBackend: bench/backend.py, a real HTTP server behind the load balancer.

Every process is stopped by its own pid; HAProxy processes are found by the
unique config path of this run, never by name alone.
"""
import configparser
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.gearmand import GEARMAND, Gearmand  # the bench's job servers, as the tests start them
from tests.support.ports import LOOPBACK, free_port, port_open
from tests.support.traffic import haproxy_processes

PROJECT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
HAPROXY = os.environ.get("LIBRA_TEST_HAPROXY", "/usr/sbin/haproxy")
SOCAT = "/usr/bin/socat"


def libra_worker_command():
    candidate = Path(sys.executable).parent / "libra_worker"
    if candidate.exists():
        return [str(candidate)]
    return [PYTHON, "-m", "libra_worker.main"]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.02)


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def rss_mb(pid):
    """VmRSS of `pid` in MB (from /proc/<pid>/status)."""
    return _status_kb(pid, "VmRSS") / 1024.0


def hwm_mb(pid):
    """VmHWM (peak RSS) of `pid` in MB."""
    return _status_kb(pid, "VmHWM") / 1024.0


def _status_kb(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def set_cpus(pid, cpus):
    """Run every thread of `pid` on `cpus` only (threads started later inherit it)."""
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            pass


def signal_and_wait(pid, timeout=5.0):
    """SIGTERM, then SIGKILL, one pid."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not alive(pid):
            return


class _Child:
    """A child process with its output in files; stop() by pid."""

    def __init__(self, workdir, label):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.label = label
        self.proc = None

    def _spawn(self, argv, env=None):
        environment = dict(os.environ, PYTHONPATH=str(PROJECT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        environment.update(env or {})
        with open(self.dir / f"{self.label}.stdout", "ab") as out, \
                open(self.dir / f"{self.label}.stderr", "ab") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         cwd=self.dir, env=environment)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=10.0):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def stderr_tail(self, lines=10):
        try:
            text = (self.dir / f"{self.label}.stderr").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.splitlines()[-lines:])


class EchoWorker(_Child):
    """bench/echo.py: the bare gear worker that sends every payload back."""

    def __init__(self, workdir, gearmand, name):
        super().__init__(workdir, "echo")
        self.gearmand = gearmand
        self.name = name

    def start(self):
        return self._spawn([PYTHON, "-m", "bench.echo", self.gearmand.address, self.name])


class HttpBackend(_Child):
    """bench/backend.py on a free port."""

    def __init__(self, workdir, name):
        super().__init__(workdir, f"backend-{name}")
        self.name = name
        self.port = free_port()

    def start(self):
        self._spawn([PYTHON, "-m", "bench.backend", str(self.port), self.name])
        wait_for(lambda: port_open(LOOPBACK, self.port), 10, f"back-end {self.name} listening")
        return self


class LibraWorker(_Child):
    """libra_worker --nodaemon, configured like scripts/demo (process mode, sudo = false)."""

    def __init__(self, workdir, gearmand, name, reconnect_sleep=5):
        super().__init__(workdir, "libra_worker")
        servers = list(gearmand) if isinstance(gearmand, (list, tuple)) else [gearmand]
        self.gearmand = servers[0]
        self.name = name
        haproxy_dir = self.dir / "haproxy"
        haproxy_dir.mkdir(parents=True, exist_ok=True)
        self.config = haproxy_dir / "haproxy.cfg"
        self.pidfile = haproxy_dir / "haproxy.pid"
        self.stats_socket = haproxy_dir / "stats.sock"
        self.master_socket = haproxy_dir / "master.sock"
        self.config_path = self.dir / "libra.cfg"
        ini = configparser.ConfigParser(interpolation=None)
        ini.read_dict({
            "gearman": {"servers": ", ".join(server.address for server in servers),
                        "reconnect_sleep": str(reconnect_sleep)},
            "worker": {"name": name, "logfile": str(self.dir / "libra_worker.log"),
                       "network_check": servers[0].address},
            "worker:haproxy": {
                "service": "process",
                "haproxy": HAPROXY,
                "socat": SOCAT,
                "config": str(self.config),
                "pidfile": str(self.pidfile),
                "stats_socket": str(self.stats_socket),
                "master_socket": str(self.master_socket),
                "statsfile": str(haproxy_dir / "haproxy.stats"),
                "logfile": str(haproxy_dir / "haproxy.log"),
                "bind_address": LOOPBACK,
                "sudo": "false",
            },
        })
        with open(self.config_path, "w") as stream:
            ini.write(stream)

    def start(self):
        # BENCH_WORKER_SRC=DIR runs the worker from another checkout (A/B of a patch);
        # the harness itself always runs from this one.
        env = {}
        source = os.environ.get("BENCH_WORKER_SRC")
        if source:
            env["PYTHONPATH"] = os.path.abspath(source) + os.pathsep + str(PROJECT)
        return self._spawn(libra_worker_command() + ["--nodaemon", "--config", str(self.config_path)], env)

    def stop(self, timeout=10.0):
        super().stop(timeout)
        # The worker leaves HAProxy serving when it exits: stop what it started.
        for pid in haproxy_processes(self.config):
            signal_and_wait(pid, 3.0)
