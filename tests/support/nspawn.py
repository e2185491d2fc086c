"""A Debian 12 container booted by systemd-nspawn: a real systemd as PID 1.

The tree is made once by debootstrap (Debian's packages only) and cached in
TREE; every boot runs on a tmpfs overlay of it (--volatile=overlay), so a run
starts from the same clean tree and leaves nothing behind.  The container has
its own network namespace (loopback only): its gearmand on 127.0.0.1:4730 and
its HAProxy on port 80 touch nothing on the host.

This machine's PID 1 is not systemd and there is no system bus, so nspawn runs
with --register=no --keep-unit (no machined, no scope to allocate).
"""
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

TREE = Path(os.environ.get("LIBRA_SYSTEMD_TREE", "/var/cache/libra-systemd/bookworm"))
# What the worker's package depends on, and what the tests use inside.
PACKAGES = ["systemd", "systemd-sysv", "dbus", "haproxy", "gearman-job-server", "python3", "python3-daemon",
            "python3-jinja2", "python3-lockfile", "python3-swiftclient", "socat", "sudo", "ucf", "logrotate",
            "curl", "procps", "libcap2-bin", "iproute2"]


class CannotBoot(Exception):
    """Why no systemd container can be booted here (the test skips LOUDLY with it)."""


# Debian's own services of the packages above that the tests replace: its
# root HAProxy is not the worker's, and its gearmand unit waits for a pid file
# gearmand never writes, holding the boot for DefaultTimeoutStartSec (90 s).
MASKED = ["haproxy.service", "gearman-job-server.service"]


_ONE_LINE_DEB = re.compile(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)")


def archive_uri():
    """The machine's own Debian archive (its apt sources' first non-security URI): debootstrap's mirror."""
    uris = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        uris += [word for line in path.read_text().splitlines() if line.startswith("URIs:")
                 for word in line.split()[1:]]
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if path.exists():
            uris += [match.group(1) for match in map(_ONE_LINE_DEB.match, path.read_text().splitlines())
                     if match]
    for uri in uris:
        if "-security" not in uri:
            return uri
    raise CannotBoot("no Debian archive URI in the machine's apt sources: debootstrap has no mirror")


def ensure_tree():
    """The cached tree, made by debootstrap on first use."""
    if (TREE / "lib/systemd/systemd").exists():
        if not all((TREE / "etc/systemd/system" / unit).is_symlink() for unit in MASKED):
            subprocess.run(["systemctl", f"--root={TREE}", "mask", *MASKED], check=True, capture_output=True)
        return TREE
    for tool in ("debootstrap", "systemd-nspawn"):
        if shutil.which(tool) is None:
            raise CannotBoot(f"{tool} is not installed (scripts/bootstrap installs debootstrap and systemd-container)")
    partial = TREE.with_name(TREE.name + ".new")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), "bookworm",
                             str(partial), archive_uri()], capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise CannotBoot(f"debootstrap failed ({result.returncode}): {result.stderr[-2000:]}")
    partial.rename(TREE)
    return ensure_tree()


class Container:
    """`with Container(name, binds) as c:` boots; c.run(argv) runs inside; exit powers off."""

    def __init__(self, name, binds=()):
        self.name = name
        self.binds = binds        # (host path, container path), read-only
        self.process = None
        self.leader = None

    def __enter__(self):
        tree = ensure_tree()
        argv = ["systemd-nspawn", "--quiet", "--directory", str(tree), "--volatile=overlay", "--register=no",
                "--keep-unit", "--private-network", "--machine", self.name, "--boot"]
        for host, inside in self.binds:
            argv.append(f"--bind-ro={host}:{inside}")
        self.log = open(f"/tmp/nspawn-{self.name}.log", "wb")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        try:
            self._wait_booted()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _children(self, pid):
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
        return found

    def _wait_booted(self, timeout=180):
        deadline = time.monotonic() + timeout
        state = "no PID 1 yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CannotBoot(f"systemd-nspawn exited {self.process.returncode}: "
                                 f"{Path(self.log.name).read_text(errors='replace')[-2000:]}")
            if self.leader is None:
                for child in self._children(self.process.pid):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        self.leader = child
            if self.leader is not None:
                state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip() or state
                if state in ("running", "degraded"):
                    return
            time.sleep(0.5)
        if self.leader is None:
            raise CannotBoot(f"no systemd came up as the container's PID 1 in {timeout}s: "
                             f"{Path(self.log.name).read_text(errors='replace')[-2000:]}")
        # systemd runs but the boot never settles: a failure to look into, not a reason to skip.
        jobs = self.run(["systemctl", "list-jobs", "--no-pager"], check=False).stdout
        raise AssertionError(f"the container's systemd is still {state!r} after {timeout}s; jobs:\n{jobs}")

    def nsenter(self, *namespaces):
        """The nsenter argv that enters the container (all its namespaces unless named)."""
        flags = [f"--{ns}" for ns in namespaces] or ["--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup"]
        return ["nsenter", "--target", str(self.leader), *flags]

    def run(self, argv, check=True, timeout=300, input=None):
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
        result = subprocess.run(self.nsenter() + ["--wd=/", *argv], capture_output=True, text=True,
                                timeout=timeout, env=env, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"in the container, {argv} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def __exit__(self, *exc):
        if self.process is None:
            return
        if self.process.poll() is None and self.leader is not None:
            try:
                os.kill(self.leader, signal.SIGRTMIN + 4)     # systemd: poweroff
            except ProcessLookupError:
                pass
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.log.close()
