"""Fault injection and oracles for test_fuzz, test_faults and test_privilege.

- `SlowHaproxy`: a wrapper script used as `[worker:haproxy] haproxy`.  It
  runs the real /usr/sbin/haproxy, but a `-c` check first waits for a
  delay read from a file (changeable while the worker runs), marks that a
  check is in progress, counts the checks and records any check that
  overlaps another one (two jobs applied at once).
- `Killer`: a thread that SIGKILLs a process the instant a condition on
  the file system becomes true (a `.BKUP` or `config.NEW` appearing, the
  live config's inode changing).
- `TemplateOracle`: the lines the HAProxy template may emit, as regexes; a
  rendered config with any other line is a config a job wrote into.
- `strict_json`: RFC 8259 JSON only (no NaN / Infinity), UTF-8 only.
- `WorkerLog`: reads a worker's log incrementally and checks that each job
  wrote exactly one well-formed line.
- `Tmpfs`: a small tmpfs mounted for a test (file system full).
- `PortHolder`: another process that holds a TCP port.
"""
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

HAPROXY = os.environ.get("LIBRA_TEST_HAPROXY", "/usr/sbin/haproxy")


# --------------------------------------------------------------------------
# JSON as the contract defines it
# --------------------------------------------------------------------------

def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def strict_json(data):
    """bytes → the decoded JSON value; ValueError unless it is RFC 8259 JSON in UTF-8.

    Python's json module accepts NaN, Infinity and -Infinity, and writes
    them for non-finite floats; no other JSON parser does.
    """
    text = bytes(data).decode("utf-8")

    def finite(literal):
        value = float(literal)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{literal} is not a finite number")
        return value

    return json.loads(text, parse_constant=_no_constants, parse_float=finite)


# --------------------------------------------------------------------------
# HAProxy
# --------------------------------------------------------------------------

def haproxy_check(config_path, haproxy=HAPROXY):
    """`haproxy -c -f config` → CompletedProcess (text)."""
    return subprocess.run([haproxy, "-c", "-f", str(config_path)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


_WRAPPER = """#!/bin/sh
# Test wrapper around {real}: slow and watchful `-c` checks (tests/support/faults.py).
state={state}
for arg in "$@"; do
    if [ "$arg" = "-c" ]; then
        echo check >> "$state/calls"
        if mkdir "$state/lock" 2>/dev/null; then owner=1; else owner=0; echo overlap >> "$state/overlaps"; fi
        : > "$state/checking"
        delay=$(cat "$state/delay" 2>/dev/null)
        [ -n "$delay" ] && sleep "$delay"
        if [ -e "$state/reject" ]; then
            echo "[ALERT]    (1) : config : wrapper refuses every candidate (test)" >&2
            status=1
        else
            {real} "$@"
            status=$?
        fi
        rm -f "$state/checking"
        [ "$owner" = 1 ] && rmdir "$state/lock"
        echo done >> "$state/finished"
        exit $status
    fi
done
exec {real} "$@"
"""


class SlowHaproxy:
    """An executable to use as `[worker:haproxy] haproxy` (see the module docstring).

    Anything but `-c` is exec'ed straight into the real haproxy, so the
    processes that serve are the real binary with its real command line.
    """

    def __init__(self, directory, delay=0.0, real=HAPROXY):
        self.dir = Path(directory)
        self.state = self.dir / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "haproxy-wrapper"
        self.path.write_text(_WRAPPER.format(real=real, state=self.state))
        self.path.chmod(0o755)
        self.set_delay(delay)

    def set_delay(self, seconds):
        (self.state / "delay").write_text(f"{seconds:g}\n")

    def set_reject(self, reject):
        """Make every `-c` check fail with an [ALERT], as HAProxy does on a config it refuses."""
        flag = self.state / "reject"
        if reject:
            flag.touch()
        else:
            flag.unlink(missing_ok=True)

    def _count(self, name):
        try:
            return len((self.state / name).read_text().split())
        except FileNotFoundError:
            return 0

    @property
    def checks(self):
        """`-c` checks started so far."""
        return self._count("calls")

    @property
    def finished(self):
        return self._count("finished")

    @property
    def overlaps(self):
        """`-c` checks that started while another one was running."""
        return self._count("overlaps")

    def checking(self):
        return (self.state / "checking").exists()

    def wait_checking(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not self.checking():
            if time.monotonic() > deadline:
                raise AssertionError(f"no haproxy -c started within {timeout}s")
            time.sleep(0.005)

    def wait_idle(self, timeout=30.0):
        """Until every check started has finished (the wrapper outlives a killed worker)."""
        deadline = time.monotonic() + timeout
        while self.finished < self.checks:
            if time.monotonic() > deadline:
                raise AssertionError(f"haproxy -c still running after {timeout}s")
            time.sleep(0.01)


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

def rss_kib(pid):
    """Resident set size of `pid` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid):
    """User + system CPU time `pid` has used, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Killer(threading.Thread):
    """SIGKILLs `pid` as soon as `condition()` is true (polled in a tight loop).

    `fired` tells whether it did, `elapsed` how long after start().
    """

    def __init__(self, pid, condition, timeout=15.0):
        super().__init__(name=f"killer {pid}", daemon=True)
        self.pid = pid
        self.condition = condition
        self.timeout = timeout
        self.fired = False
        self.elapsed = None
        self._began = None

    def run(self):
        self._began = time.monotonic()
        deadline = self._began + self.timeout
        while time.monotonic() < deadline:
            try:
                hit = self.condition()
            except OSError:
                hit = False
            if hit:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    return
                self.fired = True
                self.elapsed = time.monotonic() - self._began
                return
            time.sleep(0)  # let the GIL go; still polls every few microseconds

    def wait(self):
        self.join(self.timeout + 5)
        return self.fired


def file_identity(path):
    """(inode, device) of `path`, or None."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_dev


class PortHolder:
    """Another process listening on 127.0.0.1:`port` (no SO_REUSEPORT), until stop()."""

    _CODE = ("import socket, sys, time\n"
             "s = socket.socket()\n"
             "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
             "s.listen(8)\n"
             "print('ready', flush=True)\n"
             "sys.stdin.read()\n")

    def __init__(self, port):
        self.port = port
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", self._CODE, str(self.port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"the port holder could not take port {self.port}")
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # its stdin read returns: it exits
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self.proc.stdout.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


class HostileHttpServer:
    """An HTTP server on 127.0.0.1 (an object store gone bad): answers every request with
    `status`, and puts the request's X-Auth-Token back in its reason phrase, a header
    and the body.  `tokens_seen` lists the tokens it received."""

    def __init__(self, status):
        import http.server

        owner = self
        self.status = status
        self.tokens_seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):
                pass

            def _answer(self):
                token = self.headers.get("X-Auth-Token", "")
                owner.tokens_seen.append(token)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = f"token {token} is no good\n".encode()
                self.send_response(owner.status, f"Bad {token}")
                self.send_header("X-Echo-Token", token)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _answer

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# --------------------------------------------------------------------------
# Mounts
# --------------------------------------------------------------------------

class MountRefused(Exception):
    """mount(8) is not permitted here; the caller skips loudly."""


class Tmpfs:
    """`mount -t tmpfs -o size=<size> tmpfs <directory>`, unmounted by stop()."""

    def __init__(self, directory, size="64k"):
        self.dir = Path(directory)
        self.size = size
        self.mounted = False

    def start(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["/bin/mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755",
                                 "tmpfs", str(self.dir)], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise MountRefused(result.stderr.strip() or f"mount exited {result.returncode}")
        self.mounted = True
        return self

    def fill(self, name="filler"):
        """Write zeros until the file system is full; returns the filler's path."""
        filler = self.dir / name
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (65536, 4096, 1):
                try:
                    while os.write(fd, b"\0" * size):
                        pass
                except OSError:
                    pass
        finally:
            os.close(fd)
        return filler

    def stop(self):
        if self.mounted:
            result = subprocess.run(["/bin/umount", str(self.dir)], capture_output=True, timeout=30)
            if result.returncode != 0:
                subprocess.run(["/bin/umount", "-l", str(self.dir)], capture_output=True, timeout=30)
            self.mounted = False


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------
# What the template may write
# --------------------------------------------------------------------------

_ID = r"[A-Za-z0-9._-]{1,64}"
_IPV4 = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}"
_IPV6 = r"\[[0-9a-f:.]{2,45}\]"
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
_PORT = r"(?:6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3})"
_NUM = r"(?:0|[1-9]\d{0,9})"
_STATE_FILE = r"/[!$%&()*+,\-./0-9:;<=>?@A-Z\[\]^_`a-z|~]*haproxy\.server-state"
# An HTTP check path in single quotes: '/' then printable ASCII but space, a quote
# in it written as '\'' (close, escaped quote, open again).
_PATH = r"'/(?:[!-&(-~]|'\\'')*'"


class TemplateOracle:
    """Every line the template can emit, as one regex each (written from the
    protocol and the template's intent, not from the renderer's code)."""

    def __init__(self, settings):
        word = re.escape
        bind = (f"\\[{word(settings.bind_address)}\\]" if ":" in settings.bind_address
                else word(settings.bind_address))
        lines = [
            r"# Generated by libra_worker: every UPDATE replaces this file\.",
            r"",
            r"global",
            rf"    log {word(settings.log_target)} local0",
            rf"    pidfile {word(settings.pidfile)}",
            rf"    stats socket {word(settings.stats_socket)} mode 660 level admin expose-fd listeners",
            r"    stats timeout 30s",
            r"    maxconn 4096",
            r"    hard-stop-after 30s",
            rf"    server-state-file {_STATE_FILE}",
            r"    (?:user|group) [a-z_][a-z0-9_-]{0,31}",
            r"defaults",
            r"    log global",
            r"    option (?:dontlognull|redispatch)",
            r"    retries 3",
            r"    timeout (?:connect|client|server|check) \d+s",
            r"    load-server-state-from-file global",
            r"frontend (?:http|tcp|galera)",
            r"    mode (?:http|tcp)",
            rf"    bind {bind}:{_PORT}",
            r"    option (?:httplog|forwardfor|idle-close-on-response|tcplog)",
            rf"    timeout client {_NUM}",
            r"    default_backend (?:http|tcp|galera)_servers",
            r"backend (?:http|tcp|galera)_servers",
            r"    balance (?:roundrobin|leastconn)",
            rf"    timeout (?:server|connect) {_NUM}",
            rf"    retries {_NUM}",
            r"    cookie SERVERID insert indirect nocache",
            r"    stick-table type ip(?:v6)? size (?:200k expire 30m|1)",
            r"    stick on (?:src|dst)",
            rf"    option httpchk GET {_PATH}",
            rf"    timeout check {_NUM}s",
            (rf"    server (?P<id>{_ID}) (?:{_IPV4}|{_IPV6}|{_HOST}):{_PORT} id {_NUM} weight {_NUM}"
             rf" check inter {_NUM}s rise {_NUM} fall {_NUM}( backup)?"
             rf"(?: cookie (?P<cookie>{_ID}))?( on-marked-down shutdown-sessions)?"),
        ]
        self.patterns = [re.compile(line) for line in lines]
        self.server = self.patterns[-1]

    def foreign_lines(self, text):
        """Lines of `text` that no template line describes."""
        return [line for line in text.split("\n")
                if not any(pattern.fullmatch(line) for pattern in self.patterns)]

    def servers(self, text):
        """[(server id, cookie or None)] of the server lines."""
        found = []
        for line in text.split("\n"):
            match = self.server.fullmatch(line)
            if match:
                found.append((match.group("id"), match.group("cookie")))
        return found

    def check(self, text, expected_ids=None):
        """AssertionError naming what is wrong with a rendered config."""
        assert "\0" not in text and "\r" not in text, "a NUL or CR in the config"
        foreign = self.foreign_lines(text)
        assert not foreign, f"lines the template does not write: {[line[:120] for line in foreign[:5]]}"
        servers = self.servers(text)
        for server_id, cookie in servers:
            assert cookie in (None, server_id), f"server {server_id} has cookie {cookie}"
        ids = [server_id for server_id, _ in servers]
        assert ids, "a config without a server"
        if expected_ids is not None:
            assert sorted(ids) == sorted(expected_ids), \
                f"server ids {sorted(ids)[:10]} are not the requested {sorted(expected_ids)[:10]}"
        frontends = re.findall(r"^frontend (\w+)$", text, re.M)
        backends = re.findall(r"^backend (\w+)_servers$", text, re.M)
        assert frontends and sorted(frontends) == sorted(backends), (frontends, backends)
        assert len(set(frontends)) == len(frontends), f"a frontend twice: {frontends}"


# --------------------------------------------------------------------------
# The worker's log
# --------------------------------------------------------------------------

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                      r"\S+: .*")
JOB_LINE = re.compile(r"(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO libra_worker\.job_loop: "
                      r"job (?P<head>.*?) (?P<status>PASS|FAIL) (?P<seconds>\d+\.\d{3})s(?P<rest>.*)")
# Control characters (C0, DEL, C1) and bidi/format characters: a job that gets
# one of these into a log line can rewrite what an operator sees.
_UNSAFE_IN_LOG = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2028\u2029\u2066-\u2069\ufeff]")


class WorkerLog:
    """A worker's log file, read from where the previous read stopped."""

    def __init__(self, path):
        self.path = Path(path)
        self.offset = 0

    def skip_to_end(self):
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def read_new(self):
        try:
            with open(self.path, "rb") as stream:
                stream.seek(self.offset)
                data = stream.read()
        except FileNotFoundError:
            return b""
        # Only whole lines; a line being written stays for the next read.
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end]

    def wait_job_lines(self, count, timeout=10.0):
        """The next lines of the log up to and including `count` job lines.

        AssertionError when a line is not one the logging format writes
        (a job smuggled a line break, NUL or undecodable text in), when a
        traceback shows up, or when the job lines do not come.
        """
        deadline = time.monotonic() + timeout
        lines, jobs = [], []
        while len(jobs) < count:
            chunk = self.read_new()
            for raw in chunk.split(b"\n")[:-1] if chunk else []:
                assert b"\0" not in raw, f"a NUL byte in a log line: {raw[:200]!r}"
                line = raw.decode("utf-8")
                assert LOG_LINE.fullmatch(line), f"a log line that logging did not format: {line[:200]!r}"
                unsafe = _UNSAFE_IN_LOG.search(line)
                assert not unsafe, f"a control character {unsafe.group()!r} in a log line: {line[:200]!r}"
                lines.append(line)
                match = JOB_LINE.fullmatch(line)
                if match:
                    jobs.append(match)
            if len(jobs) < count:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(jobs)} job log lines instead of {count} within "
                                         f"{timeout}s; new lines: {[line[:160] for line in lines[-5:]]}")
                time.sleep(0.005)
        assert len(jobs) == count, f"{len(jobs)} job lines for {count} jobs: {[j.group(0)[:160] for j in jobs]}"
        return lines, jobs


def job_intervals(job_lines):
    """[(start, end)] in epoch seconds from job log lines (end = the line's time), by end."""
    import datetime
    intervals = []
    for match in job_lines:
        end = datetime.datetime.strptime(match.group("time"), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        intervals.append((end - float(match.group("seconds")), end))
    return sorted(intervals, key=lambda interval: interval[1])
