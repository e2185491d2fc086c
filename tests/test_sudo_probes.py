"""Every sudo rule the package can grant, tried against escalation probes (issue 15).

The rules come from debian/sudoers.d/libra-worker: as shipped (service =
process: nothing granted) and with its system-mode rule enabled.  Each set
is mounted alone over /etc/sudoers.d in a private mount namespace
(support.namespace), so the probes see exactly the repository's rules,
whatever the installed package says, and nothing outside sees them.

For the worker's user (haproxy) and for another member of its group, each
probe is run through `sudo -n`: write into /root, drop a file in
/etc/sudoers.d, run a command through socat, overwrite or remove a canary
file in /etc, plus every granted rule with other arguments, environment
variables or `-E`.  Each must be refused by sudo and leave no effect; a
probe that succeeds is undone at once, then reported.

The probes are first run against the rules this package shipped before
(cp, mv, rm and socat with any arguments): there they must succeed, which
proves they detect what they look for.
"""
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from libra_worker.drivers.haproxy.commands import SERVICE
from libra_worker.drivers.haproxy.driver import privileged_argvs
from libra_worker.settings import HaproxySettings
from support import namespace
from support.worker import PROJECT

SUDOERS = PROJECT / "debian" / "sudoers.d" / "libra-worker"
SUDO = "/usr/bin/sudo"
OLD_RULES = ("Cmnd_Alias LIBRA_WORKER_FILES = /bin/cp, /bin/mv, /bin/rm\n"
             "Cmnd_Alias LIBRA_WORKER_STATS = /usr/bin/socat\n"
             "%haproxy ALL = (root) NOPASSWD: LIBRA_WORKER_FILES, LIBRA_WORKER_STATS\n")
REFUSED = ("a password is required", "is not allowed", "not allowed to", "sorry")

# scripts/test runs these once, where HAProxy cannot run (scripts/without-haproxy).
pytestmark = [pytest.mark.no_haproxy,
              pytest.mark.skipif(os.geteuid() != 0, reason="SUDO PROBES SKIPPED: they need root "
                                "(a mount namespace, runuser, setpriv); run pytest as root (CI does)")]

# Who tries: the worker's user, and a member of its group that is not that user.
IDENTITIES = {
    "haproxy": ["runuser", "-u", "haproxy", "--"],
    "member of group haproxy": ["setpriv", "--reuid", "nobody", "--regid", "nogroup",
                                "--groups", "haproxy"],
}


def shipped_rules():
    return SUDOERS.read_text()


def system_mode_rules():
    text = SUDOERS.read_text()
    lines = [line[1:] if line.startswith("#haproxy ALL") else line for line in text.splitlines()]
    enabled = "\n".join(lines) + "\n"
    assert enabled != text, f"{SUDOERS} has no commented system-mode rule to enable"
    return enabled


def rules_dir(tmp_path, name, text):
    directory = tmp_path / f"sudoers-{name}"
    directory.mkdir(mode=0o755)
    path = directory / "libra-worker"
    path.write_text(text)
    path.chmod(0o440)
    check = subprocess.run(["visudo", "-cf", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    return directory


class Battery:
    """The probes, their effects, and undoing any that worked."""

    def __init__(self, tmp_path, rules):
        """`rules`: a directory mounted over /etc/sudoers.d, or None for the machine's own."""
        self.rules = rules
        tag = uuid.uuid4().hex[:8]
        self.source = tmp_path / "payload"
        self.source.write_text("haproxy ALL = (ALL) NOPASSWD: ALL\n")
        self.source.chmod(0o644)
        tmp_path.chmod(0o755)
        self.root_file = Path(f"/root/libra-probe-{tag}")
        # /etc/sudoers.d as sudo sees it (the mounted directory, inside the namespace)
        self.sudoers_drop = (rules or Path("/etc/sudoers.d")) / f"libra-probe-{tag}"
        self.canary = Path(f"/etc/libra-canary-{tag}")
        self.canary_text = f"canary {tag}\n"
        self.canary.write_text(self.canary_text)

    def close(self):
        for path in (self.root_file, self.sudoers_drop, self.canary):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def probes(self, granted):
        src, root, drop, canary = str(self.source), str(self.root_file), \
            f"/etc/sudoers.d/{self.sudoers_drop.name}", str(self.canary)
        probes = [
            ("write into /root: cp", ["/bin/cp", src, root]),
            ("write into /root: cp --", ["/bin/cp", "--", src, root]),
            ("write into /root: tee", ["/usr/bin/tee", root]),
            ("write into /root: install", ["/usr/bin/install", src, root]),
            ("write into /root: shell", ["/bin/sh", "-c", f"id > {root}"]),
            ("drop a file in /etc/sudoers.d: cp", ["/bin/cp", src, drop]),
            ("drop a file in /etc/sudoers.d: mv", ["/bin/mv", src, drop]),
            ("drop a file in /etc/sudoers.d: sudoedit", ["-e", drop]),
            ("run a command through socat", ["/usr/bin/socat", "-u", "EXEC:id", "STDOUT"]),
            ("run a shell through socat", ["/usr/bin/socat", "STDIO", "EXEC:/bin/sh -c id"]),
            ("overwrite the canary in /etc: cp", ["/bin/cp", src, canary]),
            ("overwrite the canary in /etc: cp -f --", ["/bin/cp", "-f", "--", src, canary]),
            ("remove the canary in /etc: rm", ["/bin/rm", "-f", "--", canary]),
            ("overwrite the canary in /etc: mv", ["/bin/mv", "-f", "--", src, canary]),
            ("a root shell", ["/bin/sh", "-c", "id"]),
            ("another service", [SERVICE, "ssh", "stop"]),
            ("service --status-all", [SERVICE, "--status-all"]),
        ]
        for argv in granted:
            words = " ".join(argv[1:])
            probes += [
                (f"{words} + an argument", [*argv, "--full-restart"]),
                (f"{words} + a path", [*argv, canary]),
                (f"{words} with another action", [*argv[:-1], "restart"]),
                (f"{words} with CONFIG=", [f"CONFIG={src}", *argv]),
                (f"{words} with -E", ["-E", *argv]),
                (f"{words} as another user", ["-u", "nobody", *argv]),
                (f"{words} with a shell", ["-s", *argv]),
            ]
        return probes

    def effects(self, output):
        """What a probe left behind (undone here at once)."""
        found = []
        if self.root_file.exists():
            self.root_file.unlink()
            found.append(f"{self.root_file} written")
        if self.sudoers_drop.exists():
            self.sudoers_drop.unlink()
            found.append(f"a file dropped in /etc/sudoers.d ({self.sudoers_drop.name})")
        if not self.canary.exists() or self.canary.read_text() != self.canary_text:
            self.canary.write_text(self.canary_text)
            found.append(f"canary {self.canary} changed")
        if not self.source.exists():
            self.source.write_text("haproxy ALL = (ALL) NOPASSWD: ALL\n")
        if "uid=0" in output:
            found.append("a command ran as root")
        return found

    def wrap(self, argv):
        return namespace.wrap([(self.rules, "/etc/sudoers.d")], argv) if self.rules else list(argv)

    def run(self, who, argv):
        command = self.wrap([*IDENTITIES[who], SUDO, "-n", *argv])
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL, cwd="/")
        output = result.stdout + result.stderr
        refused = result.returncode != 0 and any(word in output for word in REFUSED)
        return refused, self.effects(output), output.strip()[-200:]


def granted_to(battery, who):
    """The argv lists of privileged_argvs(system mode) that `who` may run, per `sudo -n -l`."""
    granted = []
    for argv in privileged_argvs(HaproxySettings(service="system")):
        command = battery.wrap([*IDENTITIES[who], SUDO, "-n", "-l", *argv])
        if subprocess.run(command, capture_output=True, timeout=60, cwd="/").returncode == 0:
            granted.append(argv)
    return granted


def run_battery(tmp_path, name, text):
    """{who: [(probe, refused, effects, output)]} and {who: granted argv}.

    `text`: the sudoers rules to mount alone over /etc/sudoers.d; None: the machine's own.
    """
    if shutil.which("visudo") is None or not os.path.exists(SUDO):
        pytest.fail("sudo is not installed (apt-get install sudo)")
    rules = rules_dir(tmp_path, name, text) if text is not None else None
    battery = Battery(tmp_path, rules)
    results, granted = {}, {}
    try:
        for who in IDENTITIES:
            granted[who] = granted_to(battery, who)
            results[who] = [(label, *battery.run(who, argv))
                            for label, argv in battery.probes(granted[who])]
    finally:
        battery.close()
    return results, granted


def _failures(results):
    return [f"{who}: {label}: {'ran' if not refused else 'refused'}; {effects}; {output!r}"
            for who, rows in results.items() for label, refused, effects, output in rows
            if not refused or effects]


def test_the_probes_catch_the_rules_shipped_before(tmp_path):
    results, _ = run_battery(tmp_path, "old", OLD_RULES)
    caught = {label for who, rows in results.items() for label, refused, effects, _ in rows
              if who == "haproxy" and effects}
    for probe in ("write into /root: cp", "drop a file in /etc/sudoers.d: cp",
                  "run a command through socat", "overwrite the canary in /etc: cp"):
        assert probe in caught, f"the probe {probe!r} did not detect the old rules' escalation"


def test_shipped_sudoers_grants_nothing_and_every_probe_fails(tmp_path):
    results, granted = run_battery(tmp_path, "shipped", shipped_rules())
    assert granted == {who: [] for who in IDENTITIES}, granted
    assert not _failures(results), "\n".join(_failures(results))


def test_system_mode_rules_are_exact_and_every_probe_fails(tmp_path):
    results, granted = run_battery(tmp_path, "system", system_mode_rules())
    # The worker's user gets exactly what system mode runs; its group, nothing.
    assert granted["haproxy"] == privileged_argvs(HaproxySettings(service="system")), granted
    assert granted["member of group haproxy"] == [], granted
    assert len(results["haproxy"]) > 20
    assert not _failures(results), "\n".join(_failures(results))
