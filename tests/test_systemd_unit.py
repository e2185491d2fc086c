"""The packaged unit and maintainer scripts under a REAL systemd (PID 1 of a
systemd-nspawn container of Debian 12; tests/support/nspawn.py).

Inside the container: the .deb built from this tree is installed with apt,
libra-worker.service runs under systemd against the container's gearmand,
jobs come from the packaged libra_client, traffic from curl-like Python in the
container's own network namespace.  One test, in order, because each step
stands on the one before (install -> actions -> restart -> stop -> upgrade ->
remove -> purge).

Skipped LOUDLY (with the reason) only when no systemd container can boot:
no systemd-nspawn/debootstrap, not root, or nspawn failing.  LIBRA_SYSTEMD_TESTS=1
(scripts/test's systemd stage) turns that skip into a failure.
"""
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from support.nspawn import CannotBoot, Container

REPO = Path(__file__).resolve().parent.parent
LOCK = "/tmp/libra-package.lock"
NAME = "libra-systemd-test"
BACKEND_PORTS = (8081, 8082)
CAP_NET_BIND_SERVICE = 1 << 10

LOAD = r"""
import json, sys, time, urllib.request
port, seconds, rate = int(sys.argv[1]), float(sys.argv[2]), 50
ok, failed, start, slot = 0, [], time.monotonic(), 0
while time.monotonic() - start < seconds:
    delay = start + slot / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    slot += 1
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            response.read()
            ok += 1 if response.status == 200 else 0
            if response.status != 200:
                failed.append(response.status)
    except Exception as error:
        failed.append(repr(error))
print(json.dumps({"ok": ok, "failed": failed, "seconds": time.monotonic() - start}))
"""


def loud_skip(reason):
    if os.environ.get("LIBRA_SYSTEMD_TESTS") == "1":
        pytest.fail(f"NO SYSTEMD CONTAINER: {reason}")
    pytest.skip(f"NO SYSTEMD CONTAINER CAN BOOT HERE, THE UNIT IS NOT PROVEN: {reason}")


def build_deb(tree, outdir):
    """.ci/build-deb under the package lock; the .deb's path."""
    result = subprocess.run(["flock", LOCK, str(tree / ".ci/build-deb"), str(outdir)], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


def next_version_tree(tmp_path):
    """This tree with __version__ one step on and a Debian revision to match."""
    tree = tmp_path / "next"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    init = tree / "libra_worker/__init__.py"
    version = re.search(r'__version__ = "([^"]+)"', init.read_text()).group(1)
    new = f"{version}.2"
    init.write_text(init.read_text().replace(f'__version__ = "{version}"', f'__version__ = "{new}"'))
    changelog = tree / "debian/changelog"
    date = subprocess.run(["date", "-R"], capture_output=True, text=True).stdout.strip()
    changelog.write_text(f"libra-worker ({new}-1) unstable; urgency=medium\n\n  * The next release "
                         f"(tests/test_systemd_unit.py).\n\n -- Libra CI <ci@libra.invalid>  {date}\n\n"
                         + changelog.read_text())
    return tree, new


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    if os.geteuid() != 0:
        loud_skip("not root (systemd-nspawn needs root)")
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            loud_skip(f"{tool} is not installed (scripts/bootstrap installs systemd-container and debootstrap)")
    tmp = tmp_path_factory.mktemp("systemd-debs")
    first = build_deb(REPO, tmp / "first")
    tree, version = next_version_tree(tmp)
    second = build_deb(tree, tmp / "second")
    return first, second, version


@pytest.fixture(scope="module")
def container(debs):
    first, second, _ = debs
    try:
        with Container(NAME, binds=[(first.parent, "/debs/first"), (second.parent, "/debs/second")]) as box:
            yield box
    except CannotBoot as error:
        loud_skip(str(error))


def client(box, payload, timeout=60):
    result = box.run(["libra_client", "--timeout", "30", "--json", json.dumps(payload)],
                     check=False, timeout=timeout)
    assert result.returncode in (0, 1), f"libra_client: {result.returncode} {result.stderr}"
    return json.loads(result.stdout)


def unit_pid(box):
    return int(box.run(["systemctl", "show", "-P", "MainPID", "libra-worker.service"]).stdout.strip())


def unit_processes(box):
    """Every pid in the unit's cgroup (systemd's own view)."""
    group = box.run(["systemctl", "show", "-P", "ControlGroup", "libra-worker.service"]).stdout.strip()
    procs = box.run(["bash", "-c", f"cat /sys/fs/cgroup/unified{group}/cgroup.procs 2>/dev/null"
                                   f" || cat /sys/fs/cgroup{group}/cgroup.procs"]).stdout
    return sorted(int(pid) for pid in procs.split())


def status(box, pid):
    text = box.run(["cat", f"/proc/{pid}/status"]).stdout
    return {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in text.splitlines() if ":" in line}


def haproxy_pids(box):
    result = box.run(["pgrep", "-x", "haproxy", "-u", "haproxy"], check=False)
    return sorted(int(pid) for pid in result.stdout.split())


def haproxy_master(box):
    return int(box.run(["cat", "/run/libra/haproxy.pid"]).stdout.split()[0])


def http_get(box, port):
    return box.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                    f"http://127.0.0.1:{port}/"], check=False).stdout


def wait_for(what, predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def journal(box):
    """The worker's unit status, journal and log: what a failure message needs."""
    return "\n".join(box.run(argv, check=False).stdout[-3000:] for argv in (
        ["systemctl", "status", "--no-pager", "libra-worker"],
        ["journalctl", "--no-pager", "-n", "60", "-u", "libra-worker"],
        ["tail", "-n", "40", "/var/log/libra/libra_worker.log"]))


def under_load(box, port, seconds, action):
    """Run `action()` while 50 GET/s go to port inside the container; the load's counts."""
    load = subprocess.Popen(box.nsenter() + ["python3", "-c", LOAD, str(port), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    action()
    out, _ = load.communicate(timeout=seconds + 30)
    return json.loads(out)


def update(port):
    return {"hpcs_action": "UPDATE", "loadBalancers": [{
        "name": "systemd-lb", "protocol": "HTTP", "port": str(port),
        "nodes": [{"id": str(i + 1), "address": "127.0.0.1", "port": str(p), "weight": "1"}
                  for i, p in enumerate(BACKEND_PORTS)]}]}


def test_the_packaged_unit_under_a_real_systemd(container, debs):
    box = container
    try:
        the_packaged_unit_under_a_real_systemd(box, debs)
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- in the container:\n{journal(box)}") from None


def the_packaged_unit_under_a_real_systemd(box, debs):
    first, second, next_version = debs
    assert box.run(["readlink", "/proc/1/exe"]).stdout.strip().endswith("systemd")
    for port in BACKEND_PORTS:
        box.run(["systemd-run", f"--unit=backend-{port}", "python3", "-m", "http.server", "--bind", "127.0.0.1",
                 str(port), "--directory", "/usr/share/doc"])
    # Our own gearmand (Debian's unit and its root HAProxy are masked in the tree: support/nspawn.py).
    box.run(["systemd-run", "--unit=test-gearmand", "/usr/sbin/gearmand", "--listen=127.0.0.1", "--port=4730",
             "--log-file=stderr"])
    wait_for("gearmand", lambda: box.run(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/4730"],
                                         check=False).returncode == 0)

    # Install: enabled, not started (README: the operator names the job servers first), then started.
    box.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", f"/debs/first/{first.name}"])
    assert box.run(["systemctl", "is-enabled", "libra-worker"]).stdout.strip() == "enabled"
    assert box.run(["systemctl", "is-active", "libra-worker"], check=False).stdout.strip() == "inactive"
    box.run(["systemctl", "start", "libra-worker"])
    wait_for("the unit active", lambda: box.run(["systemctl", "is-active", "libra-worker"], check=False)
             .stdout.strip() == "active")
    wait_for("DISCOVER", lambda: client(box, {"hpcs_action": "DISCOVER"}).get("hpcs_response") == "PASS")
    worker = unit_pid(box)
    st = status(box, worker)
    assert st["Uid"].split()[0] == box.run(["id", "-u", "haproxy"]).stdout.strip()
    assert st["Gid"].split()[0] == box.run(["id", "-g", "haproxy"]).stdout.strip()
    for field in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[field], 16) == CAP_NET_BIND_SERVICE, (field, st[field])
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st      # SystemCallFilter is on
    namespace = box.run(["readlink", f"/proc/{worker}/ns/mnt"]).stdout
    assert namespace != box.run(["readlink", "/proc/1/ns/mnt"]).stdout, "the unit's sandbox has no mount namespace"
    mounts = [line.split() for line in box.run(["cat", f"/proc/{worker}/mountinfo"]).stdout.splitlines()]
    root_options = [fields[5].split(",") for fields in mounts if fields[4] == "/"][-1]
    assert "ro" in root_options, f"ProtectSystem=strict: / is mounted {root_options}"

    # UPDATE to port 80 (below 1024) under the seccomp filter and address-family restriction.
    reply = client(box, update(80))
    assert reply["hpcs_response"] == "PASS", reply
    wait_for("HAProxy on port 80", lambda: http_get(box, 80) == "200")
    pids = haproxy_pids(box)
    assert pids and not box.run(["pgrep", "-x", "haproxy", "-u", "root"], check=False).stdout.split(), \
        "some HAProxy runs as root"
    assert set(pids) < set(unit_processes(box)), "HAProxy is not in the unit's cgroup"
    master = haproxy_master(box)
    assert master in pids
    for pid in pids:
        st = status(box, pid)
        assert int(st["CapEff"], 16) & ~CAP_NET_BIND_SERVICE == 0, st
        assert st["Uid"].split()[0] != "0" and st["Seccomp"] == "2", st
    cgroup = box.run(["cat", f"/proc/{master}/cgroup"]).stdout
    assert "libra-worker.service" in cgroup, cgroup

    for action in ("STATS", "METRICS", "SUSPEND", "ENABLE"):
        reply = client(box, {"hpcs_action": action})
        assert reply["hpcs_response"] == "PASS", (action, reply)
    assert http_get(box, 80) == "200"

    # Restart under load: KillMode=process stops the worker alone; HAProxy stays in the cgroup, adopted.
    master = haproxy_master(box)     # SUSPEND/ENABLE may have started a new one
    load = under_load(box, 80, 8, lambda: box.run(["systemctl", "restart", "libra-worker"]))
    print(f"systemctl restart under load: {load}")
    assert load["failed"] == [] and load["ok"] >= 300, load
    new_worker = unit_pid(box)
    assert new_worker != worker
    assert haproxy_master(box) == master
    assert client(box, {"hpcs_action": "STATS"})["hpcs_response"] == "PASS"

    # Stop leaves HAProxy serving; start adopts it again.
    box.run(["systemctl", "stop", "libra-worker"])
    assert http_get(box, 80) == "200" and haproxy_master(box) == master
    box.run(["systemctl", "start", "libra-worker"])
    wait_for("DISCOVER after start", lambda: client(box, {"hpcs_action": "DISCOVER"}).get("hpcs_response") == "PASS")
    assert haproxy_master(box) == master

    # Upgrade with apt under systemd: deb-systemd-invoke restarts the worker on the new code, HAProxy serves.
    before = unit_pid(box)
    load = under_load(box, 80, 15, lambda: box.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                                                     f"/debs/second/{second.name}"]))
    print(f"apt install of {next_version} under load: {load}")
    assert load["failed"] == [], load
    wait_for(f"release {next_version}",
             lambda: client(box, {"hpcs_action": "DISCOVER"}).get("release") == next_version)
    assert unit_pid(box) not in (0, before)
    assert haproxy_master(box) == master

    # DELETE last of the actions (under the filter), then remove and purge.
    reply = client(box, {"hpcs_action": "DELETE"})
    assert reply["hpcs_response"] == "PASS", reply
    wait_for("HAProxy gone after DELETE", lambda: http_get(box, 80) != "200")

    box.run(["apt-get", "remove", "-y", "-q", "libra-worker"])
    assert box.run(["systemctl", "is-active", "libra-worker"], check=False).stdout.strip() in ("inactive", "unknown")
    assert not box.run(["pgrep", "-f", "/usr/bin/libra_worker"], check=False).stdout.split()
    box.run(["apt-get", "purge", "-y", "-q", "libra-worker"])
    state = box.run(["dpkg-query", "-W", "-f=${Status}", "libra-worker"], check=False).stdout
    assert "installed" not in state or "not-installed" in state, state
    for path in ("/etc/libra", "/var/lib/libra", "/var/log/libra", "/run/libra", "/etc/sudoers.d/libra-worker",
                 "/etc/systemd/system/multi-user.target.wants/libra-worker.service"):
        assert box.run(["test", "-e", path], check=False).returncode != 0, f"{path} survives the purge"
    assert box.run(["systemctl", "is-enabled", "libra-worker"], check=False).stdout.strip() not in ("enabled",)
