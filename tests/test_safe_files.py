"""Every file the worker writes is symlink-safe; odd files are refused, never waited on (issue 15).

* safe_files itself: a link, FIFO, socket or directory at a path is refused
  with an OddFile naming it, in well under a second; a write replaces the
  file by rename (never through a link); ownership is set on the descriptor.
* The worker, running as root (the worst case: a followed link would write
  anywhere), with a link planted to a root-owned canary at `<config>.NEW`,
  at `<config>.BKUP`, at the HAProxy log its sink writes: each canary is
  unchanged, the job says which path it refused, HAProxy keeps serving.
* The daemon's own log, created as root: a process running as haproxy
  toggles a link to a root canary at that path while the daemon starts,
  again and again; the canary is never written or chowned.
* A FIFO statsfile is refused within 10 s with one line naming it: at start
  (--nodaemon, as the unit runs it), at --check, and when planted while the
  worker runs (METRICS still answers).
"""
import os
import pwd
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from libra_worker import safe_files
from support.backends import HttpBackend
from support.ports import free_port
from support.traffic import backend_counts, lb, node, stop_haproxy, update, wait_until
from support.worker import LIBRA_WORKER, run_worker, write_config

ODD_SECONDS = 10
RUN_USER = "haproxy"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="SKIPPED: needs root (a root canary, "
                                "a daemon that drops to haproxy); run pytest as root (CI does)")


class Canary(type(Path())):
    """A root-owned file outside the worker's directories; unchanged() says it is untouched."""

    def snapshot(self):
        info = os.stat(self)
        return self.read_bytes(), info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)

    def unchanged(self):
        return self.snapshot() == self.before


@pytest.fixture
def canary(tmp_path):
    path = Canary(tmp_path / "outside" / "canary")
    path.parent.mkdir()
    path.write_text("canary: must never change\n")
    path.chmod(0o644)
    path.before = path.snapshot()
    return path


# ==========================================================================
# safe_files
# ==========================================================================

def _odd_things(directory):
    """{kind: path} of a link, a FIFO, a socket and a directory."""
    import socket
    things = {"a symbolic link": directory / "link", "a FIFO": directory / "fifo",
              "a socket": directory / "sock", "a directory": directory / "dir"}
    os.symlink("/etc/hostname", things["a symbolic link"])
    os.mkfifo(things["a FIFO"])
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(things["a socket"]))
    server.close()
    things["a directory"].mkdir()
    return things


@pytest.mark.no_haproxy
def test_odd_files_are_refused_at_once_by_every_operation(tmp_path, canary):
    things = _odd_things(tmp_path)
    os.unlink(things["a symbolic link"])
    os.symlink(canary, things["a symbolic link"])
    operations = {
        "check": lambda path: safe_files.check(path),
        "read": lambda path: safe_files.read_bytes(path),
        "append": lambda path: os.close(safe_files.open_append(path)),
        "write": lambda path: safe_files.write_atomic(path, b"x"),
        "rename onto": lambda path: safe_files.rename(str(tmp_path / "src"), path),
    }
    for kind, path in things.items():
        for name, operation in operations.items():
            (tmp_path / "src").write_bytes(b"src")
            started = time.monotonic()
            with pytest.raises(safe_files.OddFile) as refused:
                operation(str(path))
            assert time.monotonic() - started < 1.0, f"{name} waited on {kind}"
            assert str(path) in str(refused.value) and kind in str(refused.value), str(refused.value)
    assert canary.unchanged()
    assert os.path.islink(things["a symbolic link"]) and stat.S_ISFIFO(os.lstat(things["a FIFO"]).st_mode)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")], "a temp file was left"


@pytest.mark.no_haproxy
def test_a_hard_link_to_another_file_is_refused(tmp_path, canary):
    link = tmp_path / "hard"
    os.link(canary, link)
    with pytest.raises(safe_files.OddFile, match="hard links"):
        os.close(safe_files.open_append(str(link)))
    assert canary.unchanged()


@pytest.mark.no_haproxy
def test_write_atomic_replaces_by_rename_with_the_mode_and_owner_set_on_the_descriptor(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"old")
    old_inode = os.stat(path).st_ino
    previous = os.umask(0)
    try:
        safe_files.write_atomic(str(path), b"new", 0o600)
    finally:
        os.umask(previous)
    assert path.read_bytes() == b"new" and os.stat(path).st_ino != old_inode
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    if os.geteuid() == 0:
        haproxy = pwd.getpwnam(RUN_USER)
        safe_files.write_atomic(str(path), b"owned", 0o640, owner=(haproxy.pw_uid, haproxy.pw_gid))
        fd = safe_files.open_append(str(tmp_path / "log"), 0o640, (haproxy.pw_uid, haproxy.pw_gid))
        os.close(fd)
        for name in ("file", "log"):
            info = os.stat(tmp_path / name)
            assert (info.st_uid, info.st_gid) == (haproxy.pw_uid, haproxy.pw_gid), name


# ==========================================================================
# The worker: planted links at the config's .NEW and .BKUP, and at HAProxy's log
# ==========================================================================

@pytest.fixture
def web():
    started = [HttpBackend(f"safe-{index}").start() for index in range(2)]
    yield started
    for backend in started:
        backend.stop()


@needs_root
@pytest.mark.parametrize("planted", [".NEW", ".BKUP"])
def test_a_link_at_the_configs_staging_or_backup_is_refused(device, web, canary, planted):
    port = free_port()
    first = update(lb("HTTP", port, [node("a", web[0])]))
    second = update(lb("HTTP", port, [node("a", web[0]), node("b", web[1])]))
    device.must_pass(first)
    live = device.config_bytes()
    link = Path(f"{device.config}{planted}")
    if link.exists():
        link.unlink()
    os.symlink(canary, link)

    reply = device.submit(second)
    assert reply["hpcs_response"] == "FAIL", reply
    assert str(link) in reply["hpcs_error"] and "symbolic link" in reply["hpcs_error"], reply
    assert canary.unchanged(), f"the worker wrote through {link}"
    assert os.path.islink(link), "the planted link was replaced: refusing it is the contract"
    assert device.config_bytes() == live and not os.path.islink(device.config)
    assert backend_counts(port, 3) == {"safe-0": 3}, "HAProxy stopped serving the old config"

    link.unlink()  # once the operator removes it, the next UPDATE goes through
    device.must_pass(second)
    assert set(backend_counts(port, 6)) == {"safe-0", "safe-1"}
    assert canary.unchanged()


@needs_root
def test_a_link_at_the_haproxy_log_is_not_followed(tmp_path, worker, web, canary):
    process = worker(extra_ini={"worker:haproxy": {"log_target": str(tmp_path / "haproxy-log.sock")}})
    haproxy_log = Path(process.sections["worker:haproxy"]["logfile"])
    port = free_port()
    from support.client import GearClient
    with GearClient(process.servers) as client:
        reply = client.submit(process.name, update(lb("HTTP", port, [node("a", web[0])])), timeout=30)
        assert reply["hpcs_response"] == "PASS", reply
        backend_counts(port, 3)
        wait_until(lambda: haproxy_log.exists() and haproxy_log.stat().st_size > 0, 10,
                   what="HAProxy's log reaching the worker's file")
        haproxy_log.unlink()
        os.symlink(canary, haproxy_log)
        backend_counts(port, 5)
        wait_until(lambda: "cannot write HAProxy's log" in process.log_text(), 10,
                   what="the refusal of the planted link to be logged")
        time.sleep(0.5)
        assert canary.unchanged(), "HAProxy's log was written through a planted link"
        assert os.path.islink(haproxy_log)
        line = [entry for entry in process.log_text().splitlines() if "cannot write HAProxy's log" in entry]
        assert str(haproxy_log) in line[0] and "symbolic link" in line[0], line
        # DELETE removes the name (the link), never its target.
        reply = client.submit(process.name, {"hpcs_action": "DELETE"}, timeout=30)
        assert reply["hpcs_response"] == "PASS", reply
    stop_haproxy(process.sections["worker:haproxy"]["config"])
    assert not os.path.lexists(haproxy_log) and canary.unchanged()


# ==========================================================================
# The daemon's own log, created as root while haproxy plays with the path
# ==========================================================================

TOGGLER = """
import os, sys, time
target, link, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        os.symlink(target, link)
    except FileExistsError:
        pass
    time.sleep(0.002)
    try:
        os.unlink(link)
    except FileNotFoundError:
        pass
    time.sleep(0.002)
"""


@needs_root
def test_the_daemon_log_race_never_writes_or_chowns_the_canary(gearmand):
    haproxy = pwd.getpwnam(RUN_USER)
    root = Path(tempfile.mkdtemp(prefix="libra-race-", dir="/tmp"))
    canary_dir = Path(tempfile.mkdtemp(prefix="libra-canary-", dir="/tmp"))
    try:
        root.chmod(0o755)
        canary_dir.chmod(0o755)
        for sub in ("log", "run", "haproxy"):
            (root / sub).mkdir()
            os.chown(root / sub, haproxy.pw_uid, haproxy.pw_gid)
        canary = canary_dir / "canary"
        canary.write_text("root's file\n")
        canary.chmod(0o666)  # writable by anyone: only the link decides whether it is written
        before = (canary.read_bytes(), os.stat(canary).st_uid)
        logfile = root / "log" / "worker.log"
        config = root / "worker.ini"
        write_config(config, root, [gearmand], name=f"race-{os.getpid()}",
                     extra_ini={"worker": {"logfile": logfile, "pid": root / "run" / "worker.pid"}})
        toggler = subprocess.Popen(["setpriv", "--reuid", RUN_USER, "--regid", RUN_USER, "--init-groups",
                                    sys.executable, "-c", TOGGLER, str(canary), str(logfile), "60"])
        outcomes = []
        try:
            for _ in range(10):
                result = subprocess.run([str(LIBRA_WORKER), "--config", str(config), "--user", RUN_USER,
                                         "--group", RUN_USER], capture_output=True, text=True, timeout=40)
                outcomes.append((result.returncode, result.stderr.strip()[-200:]))
                pid_path = root / "run" / "worker.pid"
                if result.returncode == 0:
                    pid = int(pid_path.read_text())
                    os.kill(pid, signal.SIGTERM)
                    wait_until(lambda: not pid_path.exists(), 15, what="the daemon stopping")
                assert (canary.read_bytes(), os.stat(canary).st_uid) == before, \
                    f"the daemon wrote or chowned the canary through the link: {outcomes}"
        finally:
            toggler.kill()
            toggler.wait()
        assert (canary.read_bytes(), os.stat(canary).st_uid) == before
        # Each start either ran or said in one line which path it refused.
        for status, stderr in outcomes:
            assert status == 0 or (str(logfile) in stderr and "\n" not in stderr), outcomes
    finally:
        stop_haproxy(root / "haproxy" / "haproxy.cfg")
        subprocess.run(["rm", "-rf", "--", str(root), str(canary_dir)], check=False)


# ==========================================================================
# A FIFO at the statsfile
# ==========================================================================

def _fifo_config(tmp_path, gearmand):
    config = tmp_path / "worker.ini"
    write_config(config, tmp_path, [gearmand], name=f"fifo-{os.getpid()}")
    fifo = tmp_path / "haproxy" / "haproxy.stats"
    os.mkfifo(fifo)
    return config, fifo


@pytest.mark.no_haproxy
def test_a_fifo_statsfile_is_refused_at_start_within_10s(tmp_path, gearmand):
    config, fifo = _fifo_config(tmp_path, gearmand)
    started = time.monotonic()
    result = run_worker(["--nodaemon", "--config", config], timeout=ODD_SECONDS + 5)
    assert time.monotonic() - started < ODD_SECONDS
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(fifo) in lines[0] and "FIFO" in lines[0], result.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced: refusing it is the contract"


@pytest.mark.parametrize("odd", ["directory", "symlink"])
@pytest.mark.no_haproxy
def test_a_directory_or_link_at_the_statsfile_is_refused_at_start(tmp_path, gearmand, odd, canary):
    config = tmp_path / "worker.ini"
    write_config(config, tmp_path, [gearmand], name=f"odd-{os.getpid()}")
    statsfile = tmp_path / "haproxy" / "haproxy.stats"
    statsfile.mkdir() if odd == "directory" else os.symlink(canary, statsfile)
    result = run_worker(["--nodaemon", "--config", config], timeout=ODD_SECONDS + 5)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(statsfile) in lines[0], result.stderr
    assert ("a directory" if odd == "directory" else "a symbolic link") in lines[0], lines
    assert canary.unchanged()


def test_a_fifo_statsfile_fails_check_within_10s(tmp_path, gearmand):
    config, fifo = _fifo_config(tmp_path, gearmand)
    started = time.monotonic()
    result = run_worker(["--check", "--nodaemon", "--config", config], timeout=ODD_SECONDS + 5)
    assert time.monotonic() - started < ODD_SECONDS
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and str(fifo) in failed[0] and "FIFO" in failed[0], result.stdout


def test_a_fifo_planted_at_the_statsfile_while_running_is_never_waited_on(device, web):
    port = free_port()
    device.must_pass(update(lb("HTTP", port, [node("a", web[0])])))
    statsfile = device.haproxy_dir / "haproxy.stats"
    statsfile.unlink()
    os.mkfifo(statsfile)
    started = time.monotonic()
    reply = device.submit({"hpcs_action": "METRICS"}, timeout=ODD_SECONDS)
    assert time.monotonic() - started < ODD_SECONDS
    assert reply["hpcs_response"] in ("PASS", "FAIL"), reply
    wait_until(lambda: f"{statsfile} is a FIFO" in device.worker.log_text(), 5,
               what="the refusal being logged")
    assert stat.S_ISFIFO(os.lstat(statsfile).st_mode)
    assert device.submit({"hpcs_action": "STATS"}, timeout=ODD_SECONDS)["hpcs_response"] == "PASS"
