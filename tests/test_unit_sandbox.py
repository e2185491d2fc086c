"""The worker run exactly as debian/libra-worker.service runs it (issue 15).

systemd is not PID 1 on the test machines, so the unit's process
credentials are emulated with setpriv, read from the unit file itself:
User=/Group= (with the user's groups), AmbientCapabilities= (inheritable and
ambient), CapabilityBoundingSet=, NoNewPrivileges=, UMask=.  Under them the
worker, with service = process and sudo = false, must do every action:
UPDATE (an HTTP load balancer on a port below 1024 and a TCP one), STATS,
METRICS, SUSPEND, ENABLE, ARCHIVE (a real Swift) and DELETE, with every
HAProxy process at a non-root uid, holding no capability but
CAP_NET_BIND_SERVICE.  A restart of the worker under ~50 requests/s loses no
request, and the restarted worker adopts the same HAProxy master.

The unit's file-system sandbox is emulated too, in a private mount
namespace: ProtectSystem=strict (the root file system read-only but the
device's directory), PrivateTmp=, ProtectHome=.  What needs systemd itself
(the system call filter, PrivateDevices=, ProtectKernel*=,
RestrictAddressFamilies=) is not: the unit's exposure score is measured with
`systemd-analyze security --offline=yes`, and every path the packaged config
names is checked to be inside the unit's writable directories.
"""
import configparser
import grp
import http.client
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from support.backends import HttpBackend, TcpEchoBackend
from support.client import GearClient
from support.ports import LOOPBACK
from support.traffic import (backend_counts, haproxy_masters, haproxy_processes, http_get, lb, node,
                             refuses, stop_haproxy, tcp_exchange, update, wait_until)
from support.worker import PROJECT, PrefixedWorker

UNIT = PROJECT / "debian" / "libra-worker.service"
PACKAGED_CONFIG = PROJECT / "debian" / "libra.cfg"
MAX_EXPOSURE = 2.0
RUN_USER = "haproxy"
CAP_NET_BIND_SERVICE = 10
LOAD_RATE = 50  # requests per second through the restart

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="UNIT SANDBOX TESTS SKIPPED: they run "
                                "setpriv and drop to haproxy; run pytest as root (CI does)")


def read_unit(path=UNIT):
    unit = configparser.ConfigParser(interpolation=None, strict=False, empty_lines_in_values=False)
    unit.optionxform = str
    unit.read(path)
    return unit["Service"]


def _caps(text):
    return [word.lower().removeprefix("cap_") for word in text.split()]


def setpriv_argv(service):
    """The unit's credentials as a setpriv command line (what systemd would set up)."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv not found (util-linux): the unit cannot be emulated")
    ambient = _caps(service.get("AmbientCapabilities", ""))
    bounding = _caps(service.get("CapabilityBoundingSet", ""))
    assert set(ambient) <= set(bounding), "an ambient capability outside the bounding set"
    argv = ["setpriv", "--reuid", service["User"], "--regid", service["Group"], "--init-groups",
            "--bounding-set", ",".join(["-all"] + [f"+{cap}" for cap in bounding])]
    if ambient:
        wanted = ",".join(f"+{cap}" for cap in ambient)
        argv += ["--inh-caps", wanted, "--ambient-caps", wanted]
    if service.get("NoNewPrivileges", "no").lower() in ("yes", "true", "1"):
        argv.append("--no-new-privs")
    umask = service.get("UMask", "0022")
    return ["/bin/sh", "-c", f'umask {umask} && exec "$@"', "unit-credentials", *argv]


def proc_status(pid):
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def low_free_port(exclude=()):
    """A free TCP port below 1024 on the loopback (binding it here needs root)."""
    for port in range(900, 1024):
        if port in exclude:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    pytest.fail("no free port between 900 and 1023 on 127.0.0.1")


def _yes(service, key):
    return service.get(key, "no").lower() in ("yes", "true", "1", "strict")


def _hidden_by(service, path):
    """The directory PrivateTmp= or ProtectHome= hides `path` under, or None."""
    hidden = []
    if _yes(service, "PrivateTmp"):
        hidden += ["/tmp", "/var/tmp"]
    if _yes(service, "ProtectHome"):
        hidden += ["/root", "/home"]
    real = os.path.realpath(path)
    return next((top for top in hidden if real == top or real.startswith(top + "/")), None)


def sandbox_argv(service, writable, code=PROJECT, holder=None):
    """The unit's file-system sandbox as a private mount namespace (`unshare --mount`).

    ProtectSystem=strict: the root file system read-only, `writable` (the
    ReadWritePaths of this device) bound read-write; PrivateTmp=: empty /tmp
    and /var/tmp; ProtectHome=: empty, read-only /root and /home.  The rest
    of the sandbox (seccomp, PrivateDevices, ProtectKernel*) needs systemd.

    `code`, the checkout whose worker runs (a packaged one lives in /usr),
    stays visible read-only even when it lies under a hidden directory (a CI
    clone in /tmp): it is parked on `holder` (an empty directory elsewhere)
    before the hiding mounts and moved back into place after them.
    """
    code = os.path.realpath(code)
    keep = _hidden_by(service, code) is not None
    if keep and holder is None:
        raise ValueError(f"{code} is hidden by the sandbox: give a holder directory")
    steps = ["set -e"]
    if service.get("ProtectSystem") == "strict":
        steps += [f'mount --bind "{path}" "{path}"' for path in writable]
    if keep:
        steps.append(f'mount -n --bind "{code}" "{holder}"')
    if service.get("ProtectSystem") == "strict":
        steps.append("mount -o remount,bind,ro /")
    if _yes(service, "PrivateTmp"):
        steps += ["mount -t tmpfs -o mode=1777 tmpfs /tmp", "mount -t tmpfs -o mode=1777 tmpfs /var/tmp"]
    if _yes(service, "ProtectHome"):
        steps += ["mount -t tmpfs -o mode=0755 tmpfs /root", "mount -t tmpfs -o mode=0755 tmpfs /home"]
    if keep:
        steps += [f'mkdir -p "{code}"', f'mount -n --move "{holder}" "{code}"',
                  f'mount -n -o remount,bind,ro "{code}"']
    if _yes(service, "ProtectHome"):
        steps += ["mount -n -o remount,ro /root", "mount -n -o remount,ro /home"]
    steps.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", "; ".join(steps), "sandbox"]


class Load:
    """~LOAD_RATE new HTTP connections per second, every failure kept."""

    def __init__(self, port):
        self.port = port
        self.ok = 0
        self.failures = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        started = time.monotonic()
        sent = 0
        while not self.stop_event.is_set():
            delay = started + sent / LOAD_RATE - time.monotonic()
            if delay > 0 and self.stop_event.wait(delay):
                return
            sent += 1
            try:
                status = http_get(self.port).status
                if status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"status {status}")
            except (OSError, http.client.HTTPException) as error:
                self.failures.append(repr(error))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop_event.set()
        self.thread.join(15)


@pytest.fixture
def device_dir():
    """A device's directories, given to the run user like the unit's State/Logs/RuntimeDirectory."""
    user = pwd.getpwnam(RUN_USER)
    # Not in /tmp: PrivateTmp= hides it from the worker.
    root = Path(tempfile.mkdtemp(prefix="libra-unit-", dir="/run"))
    root.chmod(0o755)
    (root / "haproxy").mkdir()
    for sub in ("", "haproxy"):
        os.chown(root / sub, user.pw_uid, user.pw_gid)
    yield root
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(root.parent / f"{root.name}.code", ignore_errors=True)


def _start(device_dir, gearmand, name, log_target):
    (device_dir / "haproxy").mkdir(exist_ok=True)
    service = read_unit()
    holder = device_dir.parent / f"{device_dir.name}.code"  # beside the device dir, removed with it
    holder.mkdir(exist_ok=True)
    prefix = [*sandbox_argv(service, [device_dir], holder=holder), *setpriv_argv(service)]
    process = PrefixedWorker(device_dir, [gearmand], name=name, prefix=prefix,
                         extra_ini={"worker:haproxy": {"log_target": log_target, "sudo": "false",
                                                       "job_timeout": "30"}})
    for path in (process.config_path,):
        path.chmod(0o644)
    process.start()
    process.wait_registered(20)
    return process


def _haproxy_credentials(config):
    pids = haproxy_processes(config)
    assert pids, f"no HAProxy runs for {config}"
    return {pid: proc_status(pid) for pid in pids}


def _assert_unprivileged(status, what):
    uids = [int(uid) for uid in status["Uid"].split()]
    gids = [int(gid) for gid in status["Gid"].split()]
    assert 0 not in uids and 0 not in gids, f"{what} runs as root: Uid {uids} Gid {gids}"
    for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(status[field], 16) & ~(1 << CAP_NET_BIND_SERVICE) == 0, \
            f"{what} holds capabilities beyond CAP_NET_BIND_SERVICE: {field} {status[field]}"
    assert status["NoNewPrivs"] == "1", f"{what} may gain privileges (NoNewPrivs {status['NoNewPrivs']})"


def _assert_sandboxed(pid, what):
    """In the emulated sandbox: another mount namespace, whose / is read-only."""
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"), f"{what}: no sandbox"
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            assert "ro" in fields[5].split(","), f"{what}: / is writable ({fields[5]})"
            break
    else:
        raise AssertionError(f"{what}: no / in its mountinfo")


@pytest.mark.no_haproxy
def test_setpriv_follows_the_unit():
    service = read_unit()
    argv = setpriv_argv(service)
    assert service["User"] == RUN_USER and service["Group"] == RUN_USER
    assert "--no-new-privs" in argv
    assert _caps(service["AmbientCapabilities"]) == ["net_bind_service"]
    assert _caps(service["CapabilityBoundingSet"]) == ["net_bind_service"]
    assert service["KillMode"] == "process", "HAProxy would die with the worker's cgroup"
    assert "sudo" not in UNIT.read_text().split("[Service]")[1].split("\n#")[0]


def test_every_action_as_the_unit_runs_it(device_dir, gearmand, swift):
    haproxy = pwd.getpwnam(RUN_USER)
    web = [HttpBackend(f"unit-web-{index}").start() for index in range(2)]
    echo = TcpEchoBackend("unit-tcp").start()
    http_port = low_free_port()
    tcp_port = low_free_port(exclude={http_port})
    name = f"unit-{os.getpid()}"
    process = _start(device_dir, gearmand, name, str(device_dir / "haproxy" / "log.sock"))
    config = process.sections["worker:haproxy"]["config"]
    container = f"unit-{os.getpid()}"
    try:
        worker_status = proc_status(process.pid)
        # The worker itself: the unit's credentials, not root.
        assert int(worker_status["Uid"].split()[0]) == haproxy.pw_uid, worker_status["Uid"]
        _assert_unprivileged(worker_status, "the worker")
        _assert_sandboxed(process.pid, "the worker")

        with GearClient([gearmand]) as client:
            def must_pass(message, timeout=30):
                reply = client.submit(name, message, timeout=timeout, alive=process.alive)
                assert reply.get("hpcs_response") == "PASS", (message.get("hpcs_action"), reply,
                                                              process.diagnosis())
                return reply

            must_pass(update(lb("HTTP", http_port, [node("a", web[0]), node("b", web[1])]),
                             lb("TCP", tcp_port, [node("t", echo)])))
            assert set(backend_counts(http_port, 6)) == {"unit-web-0", "unit-web-1"}
            assert tcp_exchange(tcp_port, b"ping\n")
            credentials = _haproxy_credentials(config)
            assert len(credentials) >= 2, credentials  # a master and a worker
            for pid, status in credentials.items():
                _assert_unprivileged(status, f"HAProxy {pid}")
                _assert_sandboxed(pid, f"HAProxy {pid}")

            stats = must_pass({"hpcs_action": "STATS"})
            assert sorted(entry["id"] for entry in stats["nodes"]) == ["a", "b", "t"], stats
            metrics = must_pass({"hpcs_action": "METRICS"})
            assert "utc_start" in metrics, metrics

            must_pass({"hpcs_action": "SUSPEND"})
            wait_until(lambda: refuses(http_port) and refuses(tcp_port), 10, what="SUSPEND")
            must_pass({"hpcs_action": "ENABLE"})
            wait_until(lambda: http_get(http_port)[0] == 200, 10, what="ENABLE")
            for pid, status in _haproxy_credentials(config).items():
                _assert_unprivileged(status, f"HAProxy {pid} (after ENABLE)")

            # HAProxy's log goes through the worker's sink into the file ARCHIVE uploads.
            logfile = Path(process.sections["worker:haproxy"]["logfile"])
            backend_counts(http_port, 3)
            wait_until(lambda: logfile.exists() and logfile.stat().st_size > 0, 10,
                       what="HAProxy's log reaching the worker's file")
            archive = must_pass({"hpcs_action": "ARCHIVE", "hpcs_object_store_type": "swift",
                                 "hpcs_object_store_basepath": container,
                                 "hpcs_object_store_endpoint": swift.storage_url,
                                 "hpcs_object_store_token": swift.token,
                                 "loadBalancers": [{"id": "15", "protocol": "HTTP"}]}, timeout=60)
            assert archive.get("hpcs_response") == "PASS", archive
            _, objects = swift.connection().get_container(container)
            assert objects, "ARCHIVE uploaded nothing"

            must_pass({"hpcs_action": "DELETE"})
            wait_until(lambda: refuses(http_port), 10, what="DELETE to close the port")
            assert not os.path.exists(config)
            assert haproxy_processes(config) == {}
        assert process.stop() == 0
    finally:
        process.stop()
        stop_haproxy(config)
        for backend in (*web, echo):
            backend.stop()


def test_a_worker_restart_under_load_loses_no_request(device_dir, gearmand):
    web = [HttpBackend(f"restart-web-{index}").start() for index in range(2)]
    port = low_free_port()
    name = f"restart-{os.getpid()}"
    log_target = str(device_dir / "haproxy" / "log.sock")
    process = _start(device_dir, gearmand, name, log_target)
    config = process.sections["worker:haproxy"]["config"]
    try:
        with GearClient([gearmand]) as client:
            message = update(lb("HTTP", port, [node("a", web[0]), node("b", web[1])]))
            assert client.submit(name, message, timeout=30)["hpcs_response"] == "PASS"
            masters = haproxy_masters(config)
            assert len(masters) == 1, masters
            with Load(port) as load:
                time.sleep(1.0)
                assert process.stop() == 0  # SIGTERM, as systemd's KillMode=process sends it
                assert haproxy_masters(config) == masters, "HAProxy died with the worker"
                time.sleep(1.0)
                process = _start(device_dir, gearmand, name, log_target)  # Restart=
                reply = client.submit(name, {"hpcs_action": "STATS"}, timeout=30)
                assert reply["hpcs_response"] == "PASS", reply
                # The restarted worker drives the same HAProxy: an UPDATE reloads it.
                message = update(lb("HTTP", port, [node("a", web[0])]))
                assert client.submit(name, message, timeout=30)["hpcs_response"] == "PASS"
                time.sleep(1.0)
            assert haproxy_masters(config) == masters, "the restarted worker did not adopt HAProxy"
            assert "adopted the running HAProxy" in process.log_text()
        assert load.ok >= 3 * LOAD_RATE * 0.8, f"only {load.ok} requests went through"
        assert load.failures == [], f"{len(load.failures)} of {load.ok + len(load.failures)} " \
                                    f"requests failed: {load.failures[:5]}"
    finally:
        process.stop()
        stop_haproxy(config)
        for backend in web:
            backend.stop()


@pytest.mark.no_haproxy
def test_unit_exposure_score():
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze not found (apt-get install systemd): the unit's exposure is unmeasured")
    result = subprocess.run([analyze, "security", "--offline=yes", str(UNIT)], capture_output=True,
                            text=True, timeout=60)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "Overall exposure" in line]
    assert lines, result.stdout + result.stderr
    score = float(lines[-1].split(":")[1].split()[0])
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}: {lines[-1]}"
    verify = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (verify.stdout + verify.stderr).splitlines() if UNIT.name in line]
    assert not complaints, complaints


@pytest.mark.no_haproxy
def test_every_packaged_path_is_writable_under_the_unit():
    """ProtectSystem=strict: each file the packaged config names lies in a ReadWritePaths entry
    that the unit creates for haproxy (RuntimeDirectory=, StateDirectory=, LogsDirectory=)."""
    from libra_worker import settings as settings_module
    service = read_unit()
    assert service["ProtectSystem"] == "strict"
    writable = service["ReadWritePaths"].split()
    created = ([f"/run/{name}" for name in service["RuntimeDirectory"].split()]
               + [f"/var/lib/{name}" for name in service["StateDirectory"].split()]
               + [f"/var/log/{name}" for name in service["LogsDirectory"].split()])
    loaded = settings_module.load(["--config", str(PACKAGED_CONFIG), "--nodaemon"])
    haproxy = loaded.haproxy
    assert haproxy.service == "process" and haproxy.sudo is False
    paths = [loaded.logfile, haproxy.config, f"{haproxy.config}.NEW", haproxy.pidfile,
             haproxy.stats_socket, haproxy.master_socket, haproxy.statsfile, haproxy.logfile,
             haproxy.log_target]
    for path in paths:
        directory = os.path.dirname(path)
        assert any(directory == entry or directory.startswith(entry + "/") for entry in writable), \
            f"{path} is read-only under ProtectSystem=strict"
        assert directory in created, f"nothing in the unit creates {directory} for {RUN_USER}"
    assert not haproxy.config.startswith("/etc/haproxy/"), "the haproxy package's conffile"
    assert grp.getgrnam(RUN_USER)


def test_daemon_mode_keeps_cap_net_bind_service_alone(gearmand, http_backend):
    """The SysV init script's way: started as root, --user haproxy, service = process.

    The daemon sets up what the unit would: only CAP_NET_BIND_SERVICE (bounding,
    permitted, effective, ambient) and no new privileges; HAProxy binds below 1024.
    """
    from support.worker import LIBRA_WORKER, write_config
    user = pwd.getpwnam(RUN_USER)
    root = Path(tempfile.mkdtemp(prefix="libra-daemoncap-", dir="/tmp"))
    pidfile = root / "run" / "worker.pid"
    try:
        root.chmod(0o755)
        for sub in ("run", "log", "haproxy"):
            (root / sub).mkdir()
            os.chown(root / sub, user.pw_uid, user.pw_gid)
        name = f"daemoncap-{os.getpid()}"
        config = root / "worker.ini"
        write_config(config, root, [gearmand], name=name, extra_ini={
            "worker": {"pid": pidfile, "logfile": root / "log" / "worker.log"}})
        started = subprocess.run([str(LIBRA_WORKER), "--config", str(config), "--user", RUN_USER,
                                  "--group", RUN_USER], capture_output=True, text=True, timeout=40)
        assert started.returncode == 0, started.stderr
        pid = int(pidfile.read_text())
        status = proc_status(pid)
        assert int(status["Uid"].split()[0]) == user.pw_uid
        for field in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
            assert int(status[field], 16) == 1 << CAP_NET_BIND_SERVICE, (field, status[field])
        assert status["NoNewPrivs"] == "1"
        web = http_backend("daemoncap-web")
        port = low_free_port()
        with GearClient([gearmand]) as client:
            reply = client.submit(name, update(lb("HTTP", port, [node("a", web)])), timeout=30)
            assert reply["hpcs_response"] == "PASS", reply
            assert backend_counts(port, 2) == {"daemoncap-web": 2}
        haproxy_config = root / "haproxy" / "haproxy.cfg"
        for hpid, hstatus in _haproxy_credentials(str(haproxy_config)).items():
            _assert_unprivileged(hstatus, f"HAProxy {hpid}")
        os.kill(pid, 15)
        wait_until(lambda: not pidfile.exists(), 15, what="the daemon stopping")
    finally:
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), 9)
            except (ValueError, ProcessLookupError):
                pass
        stop_haproxy(root / "haproxy" / "haproxy.cfg")
        shutil.rmtree(root, ignore_errors=True)
