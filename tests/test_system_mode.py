"""service = system end to end, through sudo and the distribution's haproxy service (issue 15).

The worker runs as haproxy with the repository's system-mode sudo rule (and
only it) and runs `sudo -n service haproxy start|stop|reload`, which runs
Debian's /etc/init.d/haproxy as root.  The worker's config path is given to
that service through /etc/default/haproxy `CONFIG=` (and `PIDFILE=`),
never by writing the haproxy package's /etc/haproxy/haproxy.cfg.

All of it happens in a private mount namespace (support.namespace) where the
test's own sudoers directory, /etc/default/haproxy and /run/haproxy are
mounted over the machine's: the root HAProxy the init script starts sees
them, nothing outside does.

Checked: UPDATE, STATS, a reload, SUSPEND, ENABLE, DELETE pass; every
HAProxy process runs as haproxy:haproxy, chrooted in /var/lib/haproxy, with
no capability; the worker never ran anything as root but `service haproxy
<action>`; /etc/haproxy/haproxy.cfg is untouched.
"""
import hashlib
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from support import namespace
from support.backends import HttpBackend
from support.client import GearClient
from support.traffic import (backend_counts, haproxy_processes, http_get, lb, node, refuses,
                             stop_haproxy, update, wait_until)
from support.worker import PROJECT, PrefixedWorker

SUDOERS = PROJECT / "debian" / "sudoers.d" / "libra-worker"
INIT_SCRIPT = Path("/etc/init.d/haproxy")
DEFAULTS = Path("/etc/default/haproxy")
PACKAGE_CONFIG = Path("/etc/haproxy/haproxy.cfg")
CHROOT = "/var/lib/haproxy"
RUN_USER = "haproxy"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="SYSTEM MODE TESTS SKIPPED: they need "
                                "root (a mount namespace, sudo); run pytest as root (CI does)")


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture
def system_device(gearmand):
    for needed in (INIT_SCRIPT, DEFAULTS, Path("/usr/sbin/service"), Path(CHROOT)):
        if not needed.exists():
            pytest.fail(f"{needed} is missing: install Debian's haproxy package (apt-get install haproxy)")
    user = pwd.getpwnam(RUN_USER)
    root = Path(tempfile.mkdtemp(prefix="libra-system-", dir="/tmp"))
    root.chmod(0o755)
    sudoers = root / "sudoers.d"
    sudoers.mkdir(mode=0o755)
    rule = "\n".join(line[1:] if line.startswith("#haproxy ALL") else line
                     for line in SUDOERS.read_text().splitlines()) + "\n"
    (sudoers / "libra-worker").write_text(rule)
    (sudoers / "libra-worker").chmod(0o440)
    run = root / "run-haproxy"  # /run/haproxy, as the init script makes it
    run.mkdir()
    os.chown(run, user.pw_uid, user.pw_gid)
    run.chmod(0o2775)
    worker_dir = root / "worker"
    worker_dir.mkdir()
    (worker_dir / "haproxy").mkdir()
    for path in (worker_dir, worker_dir / "haproxy"):
        os.chown(path, user.pw_uid, user.pw_gid)
    config = worker_dir / "haproxy" / "haproxy.cfg"
    defaults = root / "default-haproxy"
    defaults.write_text(f'CONFIG="{config}"\nPIDFILE="/run/haproxy/haproxy.pid"\n')
    binds = [(sudoers, "/etc/sudoers.d"), (defaults, str(DEFAULTS)), (run, "/run/haproxy")]
    setpriv = ["setpriv", "--reuid", RUN_USER, "--regid", RUN_USER, "--init-groups"]
    name = f"system-{os.getpid()}"
    process = PrefixedWorker(worker_dir, [gearmand], name=name, prefix=namespace.wrap(binds, setpriv),
                               extra_ini={"worker:haproxy": {
                                   "service": "system", "sudo": "true",
                                   "pidfile": "/run/haproxy/haproxy.pid",
                                   "stats_socket": "/run/haproxy/admin.sock",
                                   "log_target": "/dev/log", "chroot": CHROOT,
                                   "user": RUN_USER, "group": RUN_USER}}, args=["--debug"])
    process.config_path.chmod(0o644)
    assert process.sections["worker:haproxy"]["config"] == str(config)
    before = _digest(PACKAGE_CONFIG)
    try:
        yield process, config
    finally:
        process.stop()
        stop_haproxy(config)
        shutil.rmtree(root, ignore_errors=True)
    assert _digest(PACKAGE_CONFIG) == before, f"{PACKAGE_CONFIG} (the haproxy package's) was changed"


def _assert_dropped(config):
    haproxy = pwd.getpwnam(RUN_USER)
    pids = haproxy_processes(config)
    assert pids, "no HAProxy runs"
    for pid in pids:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        uids = {int(uid) for uid in status["Uid"].split()}
        gids = {int(gid) for gid in status["Gid"].split()}
        assert uids == {haproxy.pw_uid} and gids == {haproxy.pw_gid}, \
            f"HAProxy {pid} did not drop to haproxy:haproxy: Uid {uids} Gid {gids}"
        assert int(status["CapEff"].strip(), 16) == 0, f"HAProxy {pid} kept capabilities {status['CapEff']}"
        assert os.readlink(f"/proc/{pid}/root") == CHROOT, f"HAProxy {pid} is not chrooted"


def test_system_mode_through_sudo_and_the_distribution_service(system_device, gearmand):
    process, config = system_device
    web = [HttpBackend(f"system-web-{index}").start() for index in range(2)]
    port = None
    try:
        process.start()
        process.wait_registered(20)
        from support.ports import free_port
        port = free_port()
        with GearClient([gearmand]) as client:
            def must_pass(message):
                reply = client.submit(process.name, message, timeout=60, alive=process.alive)
                assert reply.get("hpcs_response") == "PASS", (reply, process.diagnosis())
                return reply

            must_pass(update(lb("HTTP", port, [node("a", web[0])])))
            assert backend_counts(port, 2) == {"system-web-0": 2}
            text = config.read_text()
            assert f"chroot {CHROOT}" in text and f"user {RUN_USER}" in text and f"group {RUN_USER}" in text
            info = config.stat()
            assert info.st_uid == pwd.getpwnam(RUN_USER).pw_uid, "the worker writes its own config"
            _assert_dropped(config)
            stats = must_pass({"hpcs_action": "STATS"})
            assert [entry["id"] for entry in stats["nodes"]] == ["a"], stats

            must_pass(update(lb("HTTP", port, [node("a", web[0]), node("b", web[1])])))
            assert set(backend_counts(port, 6)) == {"system-web-0", "system-web-1"}
            _assert_dropped(config)
            must_pass({"hpcs_action": "METRICS"})

            must_pass({"hpcs_action": "SUSPEND"})
            wait_until(lambda: refuses(port), 10, what="SUSPEND to stop HAProxy")
            must_pass({"hpcs_action": "ENABLE"})
            wait_until(lambda: http_get(port).status == 200, 10, what="ENABLE")
            _assert_dropped(config)
            must_pass({"hpcs_action": "DELETE"})
            wait_until(lambda: refuses(port), 10, what="DELETE to stop HAProxy")
            assert not config.exists()
        assert process.stop() == 0
        # --debug logs each command run as root: only `service haproxy <action>`.
        ran = [line.split("privileged: ", 1)[1].split() for line in process.log_text().splitlines()
               if "privileged: " in line]
        assert {tuple(argv) for argv in ran} == {("/usr/sbin/service", "haproxy", action)
                                                 for action in ("start", "stop", "reload")}, ran
    finally:
        for backend in web:
            backend.stop()
