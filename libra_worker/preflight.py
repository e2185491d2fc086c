"""`libra_worker --check`: everything a device needs, one line per check.

Each check returns (ok, what it found, how to fix it).  Nothing is started
and nothing is changed.
"""
import json
import os
import socket
import subprocess
from dataclasses import dataclass

from libra_worker import diagnostics, safe_files
from libra_worker.drivers.haproxy import statsfile
from libra_worker.drivers.haproxy.commands import SUDO
from libra_worker.drivers.haproxy.driver import privileged_argvs


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
    """The argv lists `sudo -n` must allow, with their exact arguments (the sudoers rules)."""
    return privileged_argvs(settings)


def worker_files(settings):
    """(option, path) of every file the worker writes or reads back: each must be a
    regular file or nothing (a link, FIFO, socket or directory there is refused)."""
    haproxy = settings.haproxy
    files = [("--logfile", settings.logfile)] if settings.logfile else []
    if not settings.nodaemon:
        files.append(("--pid", settings.pid))
    files += [("[worker:haproxy] config", haproxy.config),
              ("[worker:haproxy] config", f"{haproxy.config}.NEW"),
              ("[worker:haproxy] config", f"{haproxy.config}.BKUP"),
              ("[worker:haproxy] statsfile", haproxy.statsfile)]
    if haproxy.service == "process":
        files += [("[worker:haproxy] logfile", haproxy.logfile),
                  ("[worker:haproxy] pidfile", haproxy.pidfile),
                  ("[worker:haproxy] master_socket", f"{haproxy.master_socket}.log")]
    return files


def root_path_problems(settings):
    """system mode: HAProxy, as root, creates its pid file by path (following links):
    its directory must be one only root may write, or the worker's user could aim it."""
    haproxy = settings.haproxy
    if haproxy.service != "system":
        return []
    directory = os.path.dirname(haproxy.pidfile) or "/"
    try:
        info = os.stat(directory)
    except OSError as error:
        return [f"[worker:haproxy] pidfile: {directory}: {error.strerror}"]
    if info.st_uid != 0 or info.st_mode & 0o022:
        return [f"[worker:haproxy] pidfile: {haproxy.pidfile} is in {directory}, which others than root "
                f"may write: HAProxy creates it as root (use /run/haproxy.pid)"]
    return []


def file_problems(settings):
    """One line per worker path that holds something odd (lstat only: nothing opened, never waits)."""
    problems = []
    for option, path in worker_files(settings):
        try:
            safe_files.check(path)
        except safe_files.OddFile as error:
            problems.append(f"{option}: {error}")
        except OSError as error:
            problems.append(f"{option}: {path}: {error.strerror}")
    return problems


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
    return file_problems(settings) + root_path_problems(settings) + [
        f"[worker:haproxy] {check.name}: {check.detail}" for check in checks if not check.ok]


def _config_dir(directory):
    """The worker writes its config there itself (and makes it, when its parent is writable)."""
    if os.path.isdir(directory):
        ok = os.access(directory, os.W_OK | os.X_OK)
        return Check("config directory", ok, directory if ok else f"{directory} is not writable by "
                     f"uid {os.getuid()}", "chown it to the worker's user: the worker writes its own config")
    parent = os.path.dirname(directory)
    ok = os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)
    return Check("config directory", ok, f"{directory} will be created" if ok
                 else f"{directory} does not exist", f"mkdir -p {directory} and give it to the worker's user")


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
    try:
        present = safe_files.check(path)
    except safe_files.OddFile as error:
        return Check("statsfile", False, str(error), f"remove it: the worker writes {path} itself")
    if not present:
        return Check("statsfile", True, f"{path} will be created")
    if not os.access(path, os.R_OK | os.W_OK):
        return Check("statsfile", False, f"{path} is not readable and writable",
                     "chown it to the worker's user, mode 0600")
    try:
        ledger_ok = statsfile.valid_state(json.loads(safe_files.read_bytes(path) or b"null"))
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
    odd = [line for line in file_problems(settings) if not line.startswith("[worker:haproxy] statsfile")]
    checks.append(Check("worker files", not odd, " ; ".join(odd) or "no link, FIFO, socket or "
                        "directory at the worker's file paths", "remove what is there: the worker "
                        "creates its files itself"))
    checks.append(_config_dir(os.path.dirname(haproxy.config)))
    if haproxy.service == "system":
        root_only = root_path_problems(settings)
        checks.append(Check("HAProxy's pid file", not root_only, " ; ".join(root_only) or
                            f"{haproxy.pidfile}: a directory only root writes", "set [worker:haproxy] pidfile"))
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
