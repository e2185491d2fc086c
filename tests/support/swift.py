"""A real, one-replica OpenStack Swift on 127.0.0.1, its files in a temp dir.

Debian's Swift (.ci/install-swift): proxy, account, container and object
servers, one process each (`workers = 0`), on free ports; rings built with
`swift-ring-builder` (one device, one replica); `mount_check = false` and
the device a plain directory of the temp dir, whose filesystem must have
user xattrs (ext4 here; a tmpfs has them too on Linux >= 6.6); `tempauth`
in the proxy for a token and a storage URL, with its tokens in a memcached
of its own.  Swift's servers log over syslog to a socket of this module,
written to `<dir>/swift.log` for failure messages.

Swift reads its hash path prefix/suffix from /etc/swift/swift.conf (not
from its `swift_dir`): Debian's package installs that file.
"""
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .ports import LOOPBACK, free_port, port_open, wait_port_closed

RING_BUILDER = "/usr/bin/swift-ring-builder"
SERVER_COMMANDS = {
    "account": "/usr/bin/swift-account-server",
    "container": "/usr/bin/swift-container-server",
    "object": "/usr/bin/swift-object-server",
    "proxy": "/usr/bin/swift-proxy-server",
}
MEMCACHED = "/usr/bin/memcached"
SWIFT_CONF = "/etc/swift/swift.conf"
PART_POWER = 6
DEVICE = "d1"
ACCOUNT, USER, KEY = "test", "tester", "testing"
STORAGE_SERVERS = ("account", "container", "object")


def missing_programs():
    """What this machine lacks to run Swift here (empty when nothing)."""
    needed = [RING_BUILDER, MEMCACHED, SWIFT_CONF, *SERVER_COMMANDS.values()]
    return [path for path in needed if not os.path.exists(path)]


class _SyslogCollector:
    """A unix datagram socket whose messages are appended to a file (Swift's log_address)."""

    def __init__(self, socket_path, logfile):
        self.socket_path = str(socket_path)
        self.logfile = Path(logfile)
        self._sock = None
        self._thread = None
        self._wake = None

    def start(self):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.socket_path)
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._run, name="swift-syslog", daemon=True)
        self._thread.start()
        return self

    def _run(self):
        with open(self.logfile, "ab", buffering=0) as out:
            while True:
                readable, _, _ = select.select([self._sock, self._wake[0]], [], [])
                if self._sock in readable:
                    out.write(self._sock.recv(65536).rstrip(b"\0\n") + b"\n")
                if self._wake[0] in readable:
                    return

    def stop(self):
        if self._thread is None:
            return
        os.write(self._wake[1], b"x")
        self._thread.join(5)
        self._thread = None
        for fd in self._wake:
            os.close(fd)
        self._sock.close()
        Path(self.socket_path).unlink(missing_ok=True)


class Swift:
    """`Swift(tmpdir).start()`: a whole Swift; `.storage_url`, `.token`, `.connection()`.

    stop_server/start_server/pause/resume act on one server ("proxy",
    "account", "container", "object"); stop() stops everything, start()
    brings it back on the same ports with the same data and token.
    """

    def __init__(self, tmpdir):
        self.dir = Path(tmpdir)
        self.etc = self.dir / "etc"
        self.devices = self.dir / "srv"
        self.run_dir = self.dir / "run"
        self.logfile = self.dir / "swift.log"
        self.log_socket = self.run_dir / "log.sock"
        self.ports = {name: free_port() for name in (*SERVER_COMMANDS, "memcached")}
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.processes = {}
        self.token = None
        self.storage_url = None
        self._collector = None
        self._configured = False

    # -- addresses --------------------------------------------------------------
    @property
    def proxy_port(self):
        return self.ports["proxy"]

    @property
    def auth_url(self):
        return f"http://{LOOPBACK}:{self.proxy_port}/auth/v1.0"

    def __repr__(self):
        return f"<Swift proxy {LOOPBACK}:{self.proxy_port}>"

    # -- set-up -------------------------------------------------------------------
    def _configure(self):
        for directory in (self.etc, self.devices / DEVICE, self.run_dir):
            directory.mkdir(parents=True, exist_ok=True)
        common = (f"[DEFAULT]\nbind_ip = {LOOPBACK}\nworkers = 0\nuser = {self.user}\n"
                  f"swift_dir = {self.etc}\ndevices = {self.devices}\nmount_check = false\n"
                  f"disable_fallocate = true\nlog_address = {self.log_socket}\n"
                  f"log_name = {{name}}\nlog_level = INFO\n")
        for name in STORAGE_SERVERS:
            text = (common.format(name=f"{name}-server") + f"bind_port = {self.ports[name]}\n\n"
                    f"[pipeline:main]\npipeline = {name}-server\n\n"
                    f"[app:{name}-server]\nuse = egg:swift#{name}\n")
            if name == "object":
                text += "\n[object-updater]\n[object-auditor]\n"
            (self.etc / f"{name}-server.conf").write_text(text)
        (self.etc / "proxy-server.conf").write_text(
            common.format(name="proxy-server") + f"bind_port = {self.ports['proxy']}\n\n"
            "[pipeline:main]\n"
            "pipeline = catch_errors proxy-logging cache tempauth proxy-logging proxy-server\n\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n"
            # One node: a node that fails stays usable (tests stop and restart it).
            "error_suppression_limit = 1000\n\n"
            "[filter:catch_errors]\nuse = egg:swift#catch_errors\n\n"
            "[filter:proxy-logging]\nuse = egg:swift#proxy_logging\n\n"
            f"[filter:cache]\nuse = egg:swift#memcache\nmemcache_servers = {LOOPBACK}:{self.ports['memcached']}\n\n"
            f"[filter:tempauth]\nuse = egg:swift#tempauth\nuser_{ACCOUNT}_{USER} = {KEY} .admin\n"
            "token_life = 86400\n")
        # The three rings side by side: each is create, add, rebalance.
        with ThreadPoolExecutor(3) as pool:
            for future in [pool.submit(self._build_ring, name) for name in STORAGE_SERVERS]:
                future.result()
        self._configured = True

    def _build_ring(self, name):
        builder = str(self.etc / f"{name}.builder")
        for args in (["create", str(PART_POWER), "1", "1"],
                     ["add", "--region", "1", "--zone", "1", "--ip", LOOPBACK,
                      "--port", str(self.ports[name]), "--device", DEVICE, "--weight", "100"],
                     ["rebalance"]):
            result = subprocess.run([RING_BUILDER, builder, *args], capture_output=True, text=True,
                                    timeout=60, cwd=self.etc)
            # rebalance exits 1 for warnings ("balance too high" cannot happen with one device)
            if result.returncode not in (0, 1):
                raise RuntimeError(f"swift-ring-builder {name} {args[0]} exited {result.returncode}: "
                                   f"{result.stdout.strip()} {result.stderr.strip()}")
        if not (self.etc / f"{name}.ring.gz").exists():
            raise RuntimeError(f"swift-ring-builder wrote no {name}.ring.gz in {self.etc}")

    # -- processes ------------------------------------------------------------------
    def _spawn(self, name):
        if name == "memcached":
            command = [MEMCACHED, "-l", LOOPBACK, "-p", str(self.ports[name]), "-U", "0",
                       "-m", "16", "-t", "1"] + (["-u", "nobody"] if os.getuid() == 0 else [])
        else:
            command = [SERVER_COMMANDS[name], str(self.etc / f"{name}-server.conf")]
        with open(self.dir / f"{name}.out", "ab") as output:
            self.processes[name] = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                                    stderr=subprocess.STDOUT, cwd=self.dir,
                                                    start_new_session=True)

    def start_server(self, name, timeout=30.0):
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            return
        if port_open(LOOPBACK, self.ports[name]):
            raise RuntimeError(f"cannot start Swift's {name}: port {self.ports[name]} is taken")
        self._spawn(name)
        self._wait_listening(name, timeout)

    def _wait_listening(self, name, timeout):
        deadline = time.monotonic() + timeout
        while not port_open(LOOPBACK, self.ports[name], timeout=0.2):
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"Swift's {name} exited {self.processes[name].returncode}: "
                                   f"{self.output(name)[-1500:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Swift's {name} did not listen within {timeout}s: "
                                   f"{self.output(name)[-1500:]}")
            time.sleep(0.05)

    def stop_server(self, name, timeout=10.0):
        process = self.processes.get(name)
        if process is None:
            return
        if process.poll() is None:
            self.resume(name)
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        wait_port_closed(LOOPBACK, self.ports[name], timeout)

    def pause(self, name):
        """SIGSTOP one server: it keeps its port (connections queue up) and answers nothing."""
        os.kill(self.processes[name].pid, signal.SIGSTOP)

    def resume(self, name):
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)

    def start(self, timeout=60.0):
        if not self._configured:
            self._configure()
        if self._collector is None:
            self._collector = _SyslogCollector(self.log_socket, self.logfile).start()
        try:
            for name in ("memcached", *STORAGE_SERVERS, "proxy"):
                process = self.processes.get(name)
                if process is None or process.poll() is not None:
                    self._spawn(name)
            for name in ("memcached", *STORAGE_SERVERS, "proxy"):
                self._wait_listening(name, timeout)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout):
        """Until tempauth hands out a token and the account answers with it."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                if self.token is None:
                    self.token, self.storage_url = self.authenticate()
                request = urllib.request.Request(self.storage_url, method="HEAD",
                                                 headers={"X-Auth-Token": self.token})
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status in (200, 204):
                        return
                    last = f"HEAD account answered {response.status}"
            except OSError as error:        # urllib's HTTPError and URLError are OSErrors
                last = repr(error)
                if getattr(error, "code", None) == 401:
                    self.token = None       # memcached was restarted: a new token
            if time.monotonic() > deadline:
                raise TimeoutError(f"Swift was not ready within {timeout}s ({last}); "
                                   f"log: {self.log_tail()}")
            time.sleep(0.1)

    def authenticate(self, user=f"{ACCOUNT}:{USER}", key=KEY):
        """tempauth v1.0 → (token, storage URL)."""
        request = urllib.request.Request(self.auth_url, headers={"X-Auth-User": user, "X-Auth-Key": key})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers["X-Auth-Token"], response.headers["X-Storage-Url"]

    def stop(self):
        for name in ("proxy", *STORAGE_SERVERS, "memcached"):
            self.stop_server(name)
        if self._collector is not None:
            self._collector.stop()
            self._collector = None

    def remove(self):
        """stop() and delete every file (rings, data, logs)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- client side ------------------------------------------------------------------
    def connection(self, token=None):
        """A python-swiftclient Connection with the storage URL and token (no retries)."""
        import swiftclient.client
        return swiftclient.client.Connection(preauthurl=self.storage_url, preauthtoken=token or self.token,
                                             retries=0, timeout=30)

    # -- diagnosis --------------------------------------------------------------------
    def output(self, name):
        path = self.dir / f"{name}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, lines=20):
        text = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
        return " | ".join(text.splitlines()[-lines:])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
