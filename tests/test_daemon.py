"""libra_worker as a real daemon: started as root, running as haproxy:haproxy.

Issue 5.  Every test starts `libra_worker` WITHOUT --nodaemon, as root,
with `--user haproxy --group haproxy` (the Debian haproxy package creates
them), against a real gearmand; the worker's files live in a temp dir
under /tmp whose run/, log/ and haproxy/ subdirectories belong to haproxy.

The daemon is not our child.  To see its exit status the command is run
by a small launcher that makes itself a child subreaper
(prctl PR_SET_CHILD_SUBREAPER): the detached daemon is re-parented to the
launcher, which waits for it and writes down how it ended.
"""
import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from support.client import GearClient
from support.ports import free_port
from support.traffic import lb, node, stop_haproxy, update, wait_until
from support.worker import HAPROXY, LIBRA_WORKER, SOCAT, unique_name, write_config

RUN_USER = "haproxy"
START_SECONDS = 10      # a refusal or a start must be decided well within this
JOB_TIMEOUT = 30
SLOW_VALIDATION = 3     # seconds the fake haproxy sleeps before `haproxy -c`
O_CLOEXEC = 0o2000000   # in /proc/<pid>/fdinfo flags


def _run_user():
    try:
        return pwd.getpwnam(RUN_USER), grp.getgrnam(RUN_USER)
    except KeyError:
        return None, None


USER, GROUP = _run_user()

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="DAEMON TESTS SKIPPED: they start libra_worker "
                       "as root and drop to haproxy; run pytest as root (CI does)"),
    pytest.mark.skipif(USER is None, reason="DAEMON TESTS SKIPPED: no user/group 'haproxy' "
                       "(apt-get install haproxy creates them)"),
]

LAUNCHER = textwrap.dedent("""\
    import ctypes, os, subprocess, sys
    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("launcher: prctl(PR_SET_CHILD_SUBREAPER) failed")
    with open(sys.argv[1], "a", buffering=1) as record:
        status = subprocess.run(sys.argv[2:], stdin=subprocess.DEVNULL).returncode
        record.write(f"command {status}\\n")
        while True:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            record.write(f"{pid} {os.waitstatus_to_exitcode(wait_status)}\\n")
""")


# --------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------

def proc_status(pid):
    """/proc/<pid>/status as {field: value}."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def processes_naming(text):
    """Live pids whose command line contains `text`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if os.fsencode(text) in cmdline and alive(int(entry)):
                found.append(int(entry))
    return found


# --------------------------------------------------------------------------
# One device: config, directories, the daemon
# --------------------------------------------------------------------------

class Device:
    """A temp dir laid out like a device, and the daemons started on it."""

    def __init__(self, root, gearmand):
        self.root = root
        self.gearmand = gearmand
        self.name = unique_name("daemon")
        self.run_dir = root / "run"
        self.log_dir = root / "log"
        self.haproxy_dir = root / "haproxy"
        for directory in (self.run_dir, self.log_dir, self.haproxy_dir):
            directory.mkdir()
            self.give_to_run_user(directory)
        self.config = root / "worker.ini"
        self.pidfile = self.run_dir / "worker.pid"
        self.logfile = self.log_dir / "worker.log"
        self.haproxy_config = self.haproxy_dir / "haproxy.cfg"
        self.ini = {"worker": {"pid": self.pidfile, "logfile": self.logfile},
                    "worker:haproxy": {"sudo": "false"}}
        self.args = ["--user", RUN_USER, "--group", RUN_USER]
        self.launchers = []

    @staticmethod
    def give_to_run_user(path):
        os.chown(path, USER.pw_uid, GROUP.gr_gid)

    def set(self, section, key, value):
        self.ini.setdefault(section, {})[key] = value
        return self

    def write_config(self):
        write_config(self.config, self.root, [self.gearmand], self.name, self.ini)
        self.give_to_run_user(self.haproxy_dir)
        return self.config

    @property
    def command(self):
        return [str(LIBRA_WORKER), "--config", str(self.config), *self.args]

    def run(self, extra_args=()):
        """The command to completion (a refusal): (CompletedProcess, seconds)."""
        self.write_config()
        started = time.monotonic()
        result = subprocess.run(self.command + list(extra_args), capture_output=True, text=True,
                                timeout=START_SECONDS * 3, stdin=subprocess.DEVNULL)
        return result, time.monotonic() - started

    def start(self):
        """Start the daemon through the launcher; returns a Launch once the command returned."""
        self.write_config()
        launch = Launch(self.root / f"launch{len(self.launchers) + 1}", self.command)
        self.launchers.append(launch)
        launch.wait_command()
        return launch

    def daemon_pid(self):
        return int(self.pidfile.read_text().split()[0])

    def discover(self, timeout=JOB_TIMEOUT):
        with GearClient([self.gearmand]) as client:
            return client.submit(self.name, {"hpcs_action": "DISCOVER"}, timeout=timeout)

    def log_text(self):
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def stop_all(self):
        for pid in processes_naming(str(self.config)):
            os.kill(pid, signal.SIGKILL)
        stop_haproxy(self.haproxy_config)
        for launch in self.launchers:
            launch.close()


class Launch:
    """The command run under the subreaper launcher; records how each child ended."""

    def __init__(self, directory, command):
        directory.mkdir()
        self.record = directory / "exits"
        self.stdout = directory / "stdout"
        self.stderr = directory / "stderr"
        launcher = directory / "launcher.py"
        launcher.write_text(LAUNCHER)
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(launcher), str(self.record), *command],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.started = time.monotonic()
        self.command_seconds = None

    def exits(self):
        """{'command' or pid: exit status} recorded so far."""
        if not self.record.exists():
            return {}
        found = {}
        for line in self.record.read_text().splitlines():
            who, status = line.split()
            found[who if who == "command" else int(who)] = int(status)
        return found

    def wait_command(self, timeout=START_SECONDS):
        status = wait_until(lambda: self.exits().get("command", False) is not False, timeout,
                            what=f"the libra_worker command returning ({self.diagnosis()})")
        self.command_seconds = time.monotonic() - self.started
        return status

    @property
    def command_status(self):
        return self.exits().get("command")

    def wait_exit(self, pid, timeout):
        """The exit status of `pid` (a re-parented daemon), waiting up to timeout."""
        wait_until(lambda: pid in self.exits(), timeout,
                   what=f"daemon {pid} exiting ({self.diagnosis()})")
        return self.exits()[pid]

    def stderr_text(self):
        return self.stderr.read_text(errors="replace")

    def diagnosis(self):
        return f"stderr: {self.stderr_text().strip()!r}"

    def close(self):
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def device_factory(gearmand):
    """device_factory() → a Device in its own temp dir (pytest's tmp_path is 0700 root's)."""
    made = []

    def make():
        root = Path(tempfile.mkdtemp(prefix="libra-daemon-", dir="/tmp"))
        root.chmod(0o755)  # haproxy must reach run/, log/, haproxy/ and read worker.ini
        device = Device(root, gearmand)
        made.append(device)
        return device

    yield make
    for device in made:
        try:
            device.stop_all()
        finally:
            shutil.rmtree(device.root, ignore_errors=True)


@pytest.fixture
def device(device_factory):
    return device_factory()


def started(device):
    """Start the daemon, insist the command said nothing and exited 0; the daemon's pid."""
    launch = device.start()
    assert launch.command_status == 0, (
        f"libra_worker exited {launch.command_status}: {launch.diagnosis()}; log: {device.log_text()!r}")
    assert launch.stderr_text() == "", launch.diagnosis()
    assert launch.command_seconds < START_SECONDS
    # The command returns only after the daemon wrote its pid file.
    assert device.pidfile.exists(), "the command returned before the pid file was written"
    return launch, device.daemon_pid()


def write_fake_haproxy(device):
    """A haproxy that takes SLOW_VALIDATION seconds over `haproxy -c`: a job that lasts."""
    calls = device.haproxy_dir / "haproxy-calls"
    fake = device.haproxy_dir / "slow-haproxy"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$*" >> {calls}
        if [ "$1" = "-c" ]; then sleep {SLOW_VALIDATION}; fi
        exec {HAPROXY} "$@"
        """))
    fake.chmod(0o755)
    # Root's start-up checks run it too (`-v`): the daemon, as haproxy, must still append.
    calls.touch(mode=0o666)
    calls.chmod(0o666)
    device.set("worker:haproxy", "haproxy", fake)
    return calls


def one_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("libra_worker: "), lines
    assert "Traceback" not in stderr
    return lines[0]


# --------------------------------------------------------------------------
# Starting, and what the daemon looks like
# --------------------------------------------------------------------------

def test_daemon_detaches_runs_as_haproxy_and_serves(device):
    launch, pid = started(device)

    assert pid != launch.proc.pid and alive(pid)
    assert str(device.config).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    status = proc_status(pid)
    uid, gid = str(USER.pw_uid), str(GROUP.gr_gid)
    assert status["Uid"].split() == [uid] * 4, status["Uid"]
    assert status["Gid"].split() == [gid] * 4, status["Gid"]
    assert "0" not in status["Groups"].split(), f"root's groups kept: {status['Groups']}"
    assert status["Umask"] == "0022"
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
        # ... and handed on to the programs it runs (not close-on-exec).
        flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
        assert not flags & O_CLOEXEC, f"fd {fd} of the daemon is close-on-exec"
    # Detached: no controlling terminal, not in the launcher's session.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    session, tty = int(fields[3]), int(fields[4])
    assert tty == 0 and session != os.getsid(launch.proc.pid)

    assert device.pidfile.stat().st_uid == USER.pw_uid
    assert stat.S_IMODE(device.pidfile.stat().st_mode) == 0o644
    assert device.logfile.stat().st_uid == USER.pw_uid
    assert device.discover()["hpcs_response"] == "PASS"
    assert f"daemon running as {RUN_USER}:{RUN_USER}, pid {pid}" in device.log_text()

    os.kill(pid, signal.SIGTERM)
    assert launch.wait_exit(pid, 15) == 0, device.log_text()
    assert not device.pidfile.exists()
    assert "stopped serving" in device.log_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_finishes_the_job_in_hand_then_exits_0(device, http_backend, signum):
    calls = write_fake_haproxy(device)
    launch, pid = started(device)
    backend = http_backend()
    port = free_port()
    message = update(lb("HTTP", port, [node(1, backend)]))

    with GearClient([device.gearmand]) as client:
        job = client.send(device.name, message)
        wait_until(lambda: any(line.startswith("-c") for line in calls.read_text().splitlines()), 10,
                   what="the worker validating the UPDATE (the job in hand)")
        signalled = time.monotonic()
        os.kill(pid, signum)
        time.sleep(0.5)
        assert alive(pid), "the daemon did not wait for the job in hand"
        reply = client.wait(job, JOB_TIMEOUT)
    reply = json.loads(reply)
    assert reply["hpcs_response"] == "PASS", reply

    assert launch.wait_exit(pid, 15) == 0, device.log_text()
    assert time.monotonic() - signalled >= SLOW_VALIDATION - 0.5
    assert not device.pidfile.exists()
    log = device.log_text()
    assert "stopping after the job in hand" in log
    assert log.index("stopping after the job in hand") < log.index("UPDATE PASS")
    # Unregistered and gone: gearmand has nobody serving the function.
    assert device.gearmand.status().get(device.name, (0, 0, 0))[2] == 0


def test_second_stop_signal_exits_at_once_and_the_next_start_works(device):
    calls = write_fake_haproxy(device)
    launch, pid = started(device)
    with GearClient([device.gearmand]) as client:
        client.send(device.name, update(lb("HTTP", free_port(), [
            {"id": 1, "address": "127.0.0.1", "port": free_port()}])))
        # The file exists from the start (the start-up checks run `-v`): wait for the job's `-c`.
        wait_until(lambda: "-c" in calls.read_text().split(), 10, what="the worker taking the UPDATE")
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        assert launch.wait_exit(pid, SLOW_VALIDATION - 1) == 1
    # It left its pid file behind; that stale file does not stop the next start.
    assert device.pidfile.exists()
    launch2, pid2 = started(device)
    assert pid2 != pid
    assert device.discover()["hpcs_response"] == "PASS"
    assert f"removed the stale pid file {device.pidfile}" in device.log_text()


def test_sighup_reopens_the_log_after_logrotate_moved_it(device):
    launch, pid = started(device)
    assert device.discover()["hpcs_response"] == "PASS"
    rotated = device.log_dir / "worker.log.1"
    device.logfile.rename(rotated)

    os.kill(pid, signal.SIGHUP)
    # The new file appears at the configured path on the signal, not on the next line.
    wait_until(device.logfile.exists, 5, what="a new log file after SIGHUP")
    assert alive(pid), "SIGHUP killed the daemon"
    assert device.logfile.stat().st_uid == USER.pw_uid

    before = rotated.read_text()
    assert device.discover()["hpcs_response"] == "PASS"
    wait_until(lambda: "DISCOVER PASS" in device.log_text(), 5, what="the job line in the new log")
    assert rotated.read_text() == before, "lines still go to the rotated file"


# --------------------------------------------------------------------------
# The pid file
# --------------------------------------------------------------------------

def test_live_pid_file_refuses_a_second_instance(device):
    launch, pid = started(device)
    result, seconds = device.run()
    assert result.returncode != 0
    line = one_line(result.stderr)
    assert "--pid" in line and str(device.pidfile) in line and str(pid) in line
    assert seconds < START_SECONDS
    assert alive(pid) and device.daemon_pid() == pid
    assert device.discover()["hpcs_response"] == "PASS"


def dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    assert not alive(process.pid)
    return process.pid


def test_stale_pid_file_is_replaced(device):
    stale = dead_pid()
    device.pidfile.write_text(f"{stale}\n")
    launch, pid = started(device)
    assert pid != stale and alive(pid)
    assert device.discover()["hpcs_response"] == "PASS"
    assert f"removed the stale pid file {device.pidfile} (process {stale} is gone)" in device.log_text()


def test_pid_file_naming_another_program_is_stale(device):
    """A pid reused by an unrelated process does not keep the worker down."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        device.pidfile.write_text(f"{other.pid}\n")
        launch, pid = started(device)
        assert pid != other.pid and other.poll() is None
        assert device.discover()["hpcs_response"] == "PASS"
        assert f"(process {other.pid} is not a libra_worker)" in device.log_text()
    finally:
        other.kill()
        other.wait()


# --------------------------------------------------------------------------
# Never a silent exit: each reason not to start, on stderr, before detaching
# --------------------------------------------------------------------------

def _pid_dir_missing(device):
    device.set("worker", "pid", device.root / "missing" / "worker.pid")
    return "--pid", str(device.root / "missing")


def _pid_dir_not_writable(device):
    root_owned = device.root / "root-run"
    root_owned.mkdir(mode=0o755)
    device.set("worker", "pid", root_owned / "worker.pid")
    return "--pid", str(root_owned)


def _log_dir_missing(device):
    device.set("worker", "logfile", device.root / "nolog" / "worker.log")
    return "--logfile", str(device.root / "nolog")


def _log_dir_not_writable(device):
    root_owned = device.root / "root-log"
    root_owned.mkdir(mode=0o755)
    device.set("worker", "logfile", root_owned / "worker.log")
    return "--logfile", str(root_owned)


def _log_file_not_writable(device):
    device.logfile.write_text("")
    device.logfile.chmod(0o644)  # root's, in haproxy's directory
    return "--logfile", str(device.logfile)


def _unknown_user(device):
    device.args[1] = "no-such-user-libra"
    return "--user", "no-such-user-libra"


def _unknown_group(device):
    device.args[3] = "no-such-group-libra"
    return "--group", "no-such-group-libra"


def _unreadable_config(device):
    device.write_config()
    device.config.chmod(0o600)  # root's: the daemon, as haproxy, could not read it again
    device.write_config = lambda: device.config
    return "--config", str(device.config)


def _haproxy_missing(device):
    missing = device.root / "bin" / "haproxy"
    device.set("worker:haproxy", "haproxy", missing)
    return "haproxy", str(missing)


def _socat_missing(device):
    missing = device.root / "bin" / "socat"
    device.set("worker:haproxy", "socat", missing)
    return "socat", str(missing)


def _fifo_statsfile(device):
    # Never waited on (a plain open() of a FIFO blocks until a writer comes).
    fifo = device.haproxy_dir / "haproxy.stats"
    device.set("worker:haproxy", "statsfile", fifo)
    os.mkfifo(fifo)
    return "statsfile", f"{fifo} is a FIFO"


def _fifo_pid_file(device):
    os.mkfifo(device.pidfile)
    return "--pid", f"{device.pidfile} is a FIFO"


def _symlink_log_file(device):
    # To a file the run user may write: only the link itself is wrong.
    canary = device.log_dir / "canary"
    canary.write_text("canary\n")
    device.give_to_run_user(canary)
    os.symlink(canary, device.logfile)
    return "--logfile", f"{device.logfile} is a symbolic link"


REFUSALS = [_pid_dir_missing, _pid_dir_not_writable, _log_dir_missing, _log_dir_not_writable,
            _log_file_not_writable, _unknown_user, _unknown_group, _unreadable_config,
            _haproxy_missing, _socat_missing, _fifo_statsfile, _fifo_pid_file, _symlink_log_file]


@pytest.mark.parametrize("breakage", REFUSALS, ids=[f.__name__.strip("_") for f in REFUSALS])
def test_never_a_silent_exit(device, breakage):
    option, named = breakage(device)
    result, seconds = device.run()

    assert result.returncode != 0, f"started anyway: {result.stderr!r}"
    line = one_line(result.stderr)
    assert option in line and named in line, line
    assert seconds < START_SECONDS
    assert not device.pidfile.exists() or stat.S_ISFIFO(os.lstat(device.pidfile).st_mode)
    assert processes_naming(str(device.config)) == [], "a daemon was left running"


def test_the_reason_is_given_before_anything_is_created(device):
    """A refusal leaves no pid file and no log file behind."""
    _haproxy_missing(device)
    result, _ = device.run()
    assert result.returncode != 0
    assert not device.pidfile.exists() and not device.logfile.exists()
