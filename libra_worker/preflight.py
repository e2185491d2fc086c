"""`libra_worker --check`: everything a device needs, one line per check.

Each check returns (ok, what it found, how to fix it).  Nothing is started
and nothing is changed.
"""
import json
import os
import socket
import subprocess
from dataclasses import dataclass

from libra_worker import diagnostics
from libra_worker.drivers.haproxy import counters
from libra_worker.drivers.haproxy.commands import SUDO
from libra_worker.drivers.haproxy.commands import SERVICE
from libra_worker.drivers.haproxy.driver import privileged_commands


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self):
        text = f"{'PASS' if self.ok else 'FAIL'}  {self.name}: {self.detail}"
        return text if self.ok or not self.fix else f"{text} -- fix: {self.fix}"


def _version(argv):
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, str(error)
    first = (result.stdout or result.stderr).strip().splitlines()
    return (first[0] if first else "?"), None


def _program(name, path, version_flag):
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return Check(name, False, f"{path} not found or not executable",
                     f"install it (apt-get install {name}) or set [worker:haproxy] {name}")
    version, error = _version([path, version_flag])
    return Check(name, version is not None, version or error, f"{path} {version_flag} must run")


def _writable_dir(name, path, option):
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return Check(name, False, f"directory {directory} does not exist", f"mkdir -p {directory} ({option})")
    if not os.access(directory, os.W_OK | os.X_OK):
        return Check(name, False, f"directory {directory} is not writable by uid {os.getuid()}",
                     f"chown the directory to the worker's user ({option})")
    return Check(name, True, f"{directory} writable")


def sudo_checks(settings):
    """The argv lists `sudo -n` must allow.  A sudoers rule for `service`
    names its arguments, so that one is checked with them."""
    checks = []
    for command in privileged_commands(settings):
        if command == SERVICE:
            checks.extend([SERVICE, "haproxy", action] for action in ("start", "stop", "reload"))
        else:
            checks.append([command])
    return checks


def _sudo(command, user):
    argv = [SUDO, "-n", "-l"] + (["-U", user] if user and os.getuid() == 0 else []) + command
    try:
        allowed = subprocess.run(argv, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        allowed = False
    who = user or "this user"
    text = " ".join(command)
    return Check(f"sudo {text}", allowed, f"allowed for {who}" if allowed else f"not allowed for {who} without a password",
                 f"grant it in /etc/sudoers.d/libra-worker (NOPASSWD: {text})")


def start_problems(settings, user):
    """What must stop a daemon from starting (programs, sudo rights), one line each."""
    haproxy = settings.haproxy
    checks = [_program("haproxy", haproxy.haproxy, "-v"), _program("socat", haproxy.socat, "-V")]
    if haproxy.sudo:
        checks.extend(_sudo(argv, user) for argv in sudo_checks(haproxy))
    return [f"[worker:haproxy] {check.name}: {check.detail}" for check in checks if not check.ok]


def _bind_address(address):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError as error:
        return Check("bind_address", False, f"{address}: {error.strerror}",
                     "set [worker:haproxy] bind_address to an address of this machine")
    return Check("bind_address", True, f"{address} is local")


def _statsfile(path):
    if not os.path.exists(path):
        return Check("statsfile", True, f"{path} will be created")
    if not os.access(path, os.R_OK | os.W_OK):
        return Check("statsfile", False, f"{path} is not readable and writable",
                     "chown it to the worker's user, mode 0600")
    try:
        with open(path, encoding="utf-8") as stream:
            ledger_ok = counters.valid_state(json.load(stream))
    except (OSError, ValueError):
        ledger_ok = False
    return Check("statsfile", ledger_ok, f"{path} {'readable' if ledger_ok else 'is corrupt'}",
                 "it will be moved aside and counting starts afresh")


def _tls_material(settings):
    """The TLS files as the daemon's run user reads them (the settings loaded as this uid)."""
    from libra_worker import daemon
    from libra_worker.wire import tls
    if settings.nodaemon:
        problem = tls.problem(settings.gearman)   # settings.load() already read them as this user
    else:
        try:
            run_as = daemon.resolve_run_as(settings)
        except daemon.StartupError as error:
            return Check("TLS material", False, str(error), "fix --user/--group")
        problem = daemon.first_problem_as(run_as, [lambda: tls.problem(settings.gearman)])
    if problem:
        return Check("TLS material", False, problem,
                     "make ssl_key, ssl_cert and ssl_ca readable by the worker's user, the key matching the certificate")
    return Check("TLS material", True, f"{settings.gearman.ssl_cert} with its key, verified against "
                 f"{settings.gearman.ssl_ca}")


def run_checks(settings, user=None):
    haproxy = settings.haproxy
    checks = [Check("function name", True, repr(settings.name))]
    statuses = diagnostics.tcp_checks(list(settings.gearman.servers))
    for (host, port), status in zip(settings.gearman.servers, statuses):
        checks.append(Check(f"job server {host}:{port}", status == "PASS",
                            "reachable" if status == "PASS" else "cannot connect",
                            "start gearmand there or fix [gearman] servers"))
    if settings.gearman.ssl_key:
        checks.append(_tls_material(settings))
    checks.append(_program("haproxy", haproxy.haproxy, "-v"))
    checks.append(_program("socat", haproxy.socat, "-V"))
    if haproxy.sudo:
        checks.extend(_sudo(argv, user) for argv in sudo_checks(haproxy))
    if not settings.nodaemon:
        checks.append(_writable_dir("pid file", settings.pid, "--pid"))
    if settings.logfile:
        checks.append(_writable_dir("log file", settings.logfile, "--logfile"))
    checks.append(_writable_dir("statsfile directory", haproxy.statsfile, "[worker:haproxy] statsfile"))
    checks.append(_statsfile(haproxy.statsfile))
    config_dir = os.path.dirname(haproxy.config)
    checks.append(Check("config directory", os.path.isdir(config_dir),
                        config_dir if os.path.isdir(config_dir) else f"{config_dir} does not exist",
                        f"mkdir -p {config_dir}"))
    checks.append(_bind_address(haproxy.bind_address))
    return checks


def main(settings):
    """Print every check; exit status 0 only when all pass."""
    # With --nodaemon the worker runs as whoever started it.
    checks = run_checks(settings, user=None if settings.nodaemon else settings.user)
    for check in checks:
        print(check.line())
    failed = sum(not check.ok for check in checks)
    print(f"all {len(checks)} checks passed" if not failed else f"{failed} of {len(checks)} checks failed")
    return 0 if failed == 0 else 1
