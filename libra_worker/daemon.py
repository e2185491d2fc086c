"""Daemon mode: every reason not to start is printed before detaching.

python-daemon does the PEP 3143 work (detach, umask, working directory,
closing descriptors, dropping to uid/gid); the pid file is a lockfile
TimeoutPIDLockFile.  Around it:

1. the checks: the run user and group exist; the pid and log directories
   exist and the run user can write them; the run user can read the
   config file and the interpreter's libraries; the driver finds its
   programs and the sudo rights it needs; no live instance holds the pid
   file (a stale one is removed).  The file checks run in a child that has
   already dropped to the run user, so they see exactly what the daemon
   will see (ancestor directories, ACLs, read-only mounts included);
2. the log file is opened while still root and kept open across the
   detach (`files_preserve`), so even a failure while detaching is logged;
3. the command forks the daemon and waits on a pipe until the daemon has
   written its pid file, or has said why it could not: the command's exit
   status and stderr tell whether the worker is running.

python-daemon's `initgroups` only sets the supplementary groups (the
primary gid would stay root's), so the groups are set here and the
DaemonContext does setgid then setuid.
"""
import grp
import importlib.util
import logging
import os
import pwd
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Tuple

import daemon
import daemon.pidfile

from libra_worker import capabilities, logs, safe_files
from libra_worker.processes import pid_alive

LOG = logging.getLogger(__name__)

STARTUP_TIMEOUT = 30.0  # seconds the command waits for the daemon to report
READY = b"ready"


class StartupError(Exception):
    """One line for stderr naming the path or option that stops the start."""


@dataclass(frozen=True)
class RunAs:
    name: str
    uid: int
    gid: int
    group: str
    groups: Tuple[int, ...]   # supplementary groups, the primary one included

    @property
    def is_current(self):
        return self.uid == os.getuid() and self.gid == os.getgid()


def resolve_run_as(settings):
    """--user/--group → RunAs; StartupError when unknown or not reachable from this uid."""
    try:
        user = pwd.getpwnam(settings.user) if settings.user else pwd.getpwuid(os.getuid())
    except KeyError:
        raise StartupError(f"--user: unknown user {settings.user!r}") from None
    try:
        group = grp.getgrnam(settings.group) if settings.group else grp.getgrgid(user.pw_gid)
    except KeyError:
        raise StartupError(f"--group: unknown group {settings.group!r}") from None
    if os.getuid() == 0:
        groups = tuple(sorted(set(os.getgrouplist(user.pw_name, group.gr_gid))))
    else:
        if user.pw_uid != os.getuid():
            raise StartupError(f"--user: only root can start the worker as {user.pw_name} "
                               f"(this is uid {os.getuid()})")
        if group.gr_gid not in (os.getgid(), *os.getgroups()):
            raise StartupError(f"--group: only root can start the worker in group {group.gr_name}")
        groups = tuple(sorted(set(os.getgroups())))
    return RunAs(user.pw_name, user.pw_uid, group.gr_gid, group.gr_name, groups)


def drop_privileges(run_as):
    """Become run_as for good (groups first: setgroups needs root)."""
    if os.getuid() == 0:
        os.setgroups(list(run_as.groups))
        os.setgid(run_as.gid)
        os.setuid(run_as.uid)


# -- checks run as the run user ------------------------------------------------

def _writable(option, path, who, check_file=True):
    directory = os.path.dirname(path) or "."
    if not os.access(directory, os.X_OK):
        return f"{option}: directory {directory} cannot be entered by {who}"
    if not os.access(directory, os.W_OK):
        return f"{option}: directory {directory} is not writable by {who}"
    if check_file and os.path.lexists(path) and not os.access(path, os.W_OK):
        return f"{option}: {path} is not writable by {who}"
    return None


def _readable_config(path, who):
    try:
        with open(path, "rb"):
            return None
    except OSError as error:
        return f"--config: {path} is not readable by {who} ({error.strerror})"


# What the daemon still imports, or reads, after it has dropped privileges.
RUNTIME_MODULES = ("os", "encodings", "libra_worker", "daemon", "jinja2")


def _module_dirs():
    """Directories of RUNTIME_MODULES, found as root (nothing imported)."""
    dirs = []
    for name in RUNTIME_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin not in (None, "built-in", "frozen"):
            dirs.append(os.path.dirname(os.path.abspath(spec.origin)))
    return dirs


def _readable_python(directories, who):
    """The daemon imports after dropping privileges: its interpreter must be readable."""
    if not os.access(sys.executable, os.X_OK):
        return f"python: {sys.executable} cannot be run by {who}"
    for directory in directories:
        if not os.access(directory, os.R_OK | os.X_OK):
            return (f"python: {directory} is not readable by {who} (the interpreter and its "
                    f"libraries must be readable by the run user)")
    return None


def user_checks(settings, run_as):
    who = f"{run_as.name}:{run_as.group}"
    # A pid file left behind is replaced by root, so only its directory matters.
    checks = [lambda: _writable("--pid", settings.pid, who, check_file=False)]
    if settings.logfile:
        checks.append(lambda: _writable("--logfile", settings.logfile, who))
    if settings.config_path:
        checks.append(lambda: _readable_config(settings.config_path, who))
    directories = _module_dirs()
    checks.append(lambda: _readable_python(directories, who))
    if settings.gearman.ssl_key:  # TLS files, read by the user who will connect with them
        checks.append(lambda: _tls_problem(settings, who))
    return checks


def _tls_problem(settings, who):
    from libra_worker.wire import tls
    problem = tls.problem(settings.gearman)
    return f"{problem} (as {who})" if problem else None


def first_problem_as(run_as, checks):
    """Run checks (callables → problem or None) as run_as; the first problem, or None."""
    if run_as.is_current or os.getuid() != 0:
        return next((problem for problem in (check() for check in checks) if problem), None)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the probe: drop for good, check, report, vanish
        status = 0
        try:
            os.close(read_end)
            drop_privileges(run_as)
            problem = next((problem for problem in (check() for check in checks) if problem), "")
            os.write(write_end, problem.encode("utf-8", "replace")[:4000])
        except BaseException as error:  # noqa: B036 - nothing may escape a forked child
            try:
                os.write(write_end, f"cannot check as {run_as.name}: {error}".encode()[:4000])
            finally:
                status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        answer = stream.read().decode("utf-8", "replace")
    os.waitpid(pid, 0)
    return answer or None


# -- the pid file -------------------------------------------------------------

def _is_worker(pid):
    """Is the live process pid (as far as /proc tells) a libra_worker?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            cmdline = stream.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # alive, but /proc is not telling: assume the worst
    return b"libra_worker" in cmdline


def claim_pid_file(path):
    """The pid file if no live worker holds it; a stale one is removed (note returned)."""
    pidfile = daemon.pidfile.TimeoutPIDLockFile(path, acquire_timeout=0)
    try:
        if not safe_files.check(path):  # a FIFO there would block read_pid() for ever
            return pidfile, None
    except safe_files.OddFile as error:
        raise StartupError(f"--pid: {error}") from None
    pid = pidfile.read_pid()
    if pid is None:
        why = "no pid in it"
    elif not pid_alive(pid):
        why = f"process {pid} is gone"
    elif pid != os.getpid() and _is_worker(pid):
        raise StartupError(f"--pid: {path} is held by running process {pid}")
    else:
        why = f"process {pid} is not a libra_worker"
    os.unlink(path)
    return pidfile, f"removed the stale pid file {path} ({why})"


# -- start-up -------------------------------------------------------------------

def prepare(settings, driver_preflight):
    """All start-up checks; returns (run_as, pidfile, notes) or raises StartupError."""
    run_as = resolve_run_as(settings)
    for option, path in (("--pid", settings.pid), ("--logfile", settings.logfile)):
        if path and not os.path.isdir(os.path.dirname(path) or "."):
            raise StartupError(f"{option}: directory {os.path.dirname(path)} does not exist")
    problem = first_problem_as(run_as, user_checks(settings, run_as))
    if problem:
        raise StartupError(problem)
    for problem in driver_preflight(run_as.name):
        raise StartupError(problem)
    pidfile, note = claim_pid_file(settings.pid)
    if settings.logfile:
        # Created now (or checked) and owned by the run user, so the daemon keeps
        # writing it: opened symlink-safe, chowned on the descriptor, never by path.
        owner = (run_as.uid, run_as.gid) if os.getuid() == 0 else None
        try:
            os.close(safe_files.open_append(settings.logfile, logs.LOG_MODE, owner))
        except safe_files.OddFile as error:
            raise StartupError(f"--logfile: {error}") from None
    return run_as, pidfile, [note] if note else []


def _preserved_descriptors():
    """The streams and sockets of the logging handlers: they survive the detach."""
    kept = []
    for handler in logging.getLogger().handlers:
        for attribute in ("stream", "socket"):
            value = getattr(handler, attribute, None)
            try:
                fd = value.fileno() if value is not None else None
            except (OSError, ValueError, AttributeError):
                fd = None
            if fd is not None and fd > 2:
                kept.append(fd)
    return kept


def _driver_preflight(settings):
    """user → problem lines about programs and sudo rights (preflight's start checks)."""
    from libra_worker import preflight
    return lambda user: preflight.start_problems(settings, user)


def run(settings, serve):
    """Check, detach, run `serve(settings, file_handler)` in the daemon.

    Returns the exit status: in the command, 0 once the daemon runs (1 with a
    line on stderr when it cannot); in the daemon, serve's status.
    """
    try:
        run_as, pidfile, notes = prepare(settings, _driver_preflight(settings))
    except StartupError as error:
        return _fail(str(error))
    except OSError as error:
        return _fail(f"{error.filename or ''}: {error.strerror}")

    read_end, write_end = os.pipe()
    child = os.fork()
    if child:
        os.close(write_end)
        return _wait_for_daemon(child, read_end, settings)
    os.close(read_end)
    return _become_daemon(settings, serve, run_as, pidfile, notes, write_end)


def _fail(message):
    print(f"libra_worker: {message}", file=sys.stderr)
    return 1


def _wait_for_daemon(child, read_end, settings):
    """The command: wait until the daemon says it runs, or why it does not."""
    answer = b""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with os.fdopen(read_end, "rb", buffering=0) as stream:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stream], [], [], left)[0]:
                break
            chunk = stream.read(4096)
            if not chunk:
                break
            answer += chunk
    _reap(child, block=bool(answer) or time.monotonic() < deadline)
    where = f" (see {settings.logfile})" if settings.logfile else ""
    if answer == READY:
        return 0
    if answer:
        return _fail(answer.decode("utf-8", "replace"))
    if time.monotonic() >= deadline:
        return _fail(f"the daemon did not report within {STARTUP_TIMEOUT:g}s{where}")
    return _fail(f"the daemon stopped while starting{where}")


def _reap(child, block):
    """Collect the forked child (it exits as soon as python-daemon has forked the daemon)."""
    try:
        os.waitpid(child, 0 if block else os.WNOHANG)
    except ChildProcessError:
        pass


def _become_daemon(settings, serve, run_as, pidfile, notes, report_fd):
    """The forked child: log, detach, write the pid file, report, serve."""
    def report(data):
        nonlocal report_fd
        if report_fd is not None:
            try:
                os.write(report_fd, data)
            finally:
                os.close(report_fd)
                report_fd = None

    try:
        file_handler = logs.setup(settings)
        # service = process: keep CAP_NET_BIND_SERVICE alone, as the systemd unit does,
        # so that HAProxy binds ports below 1024 (system mode needs sudo: left as it was).
        keep_bind = (os.getuid() == 0 and run_as.uid != 0 and settings.haproxy.service == "process")
        if os.getuid() == 0:
            os.setgroups(list(run_as.groups))  # python-daemon then does setgid, setuid
        if keep_bind:
            capabilities.before_setuid()
        context = daemon.DaemonContext(
            pidfile=pidfile, umask=0o022, working_directory="/",
            uid=run_as.uid, gid=run_as.gid, detach_process=True,
            files_preserve=_preserved_descriptors() + [report_fd],
            signal_map={signal.SIGTERM: "terminate", signal.SIGHUP: None,
                        signal.SIGTTIN: None, signal.SIGTTOU: None, signal.SIGTSTP: None})
        context.open()
        if keep_bind:
            capabilities.after_setuid()
        # python-daemon closes 0-2, then opens /dev/null (which lands on the
        # freed fd, close-on-exec) and dup2()s it onto itself, a no-op that
        # keeps the flag: every program the worker ran would start without
        # stdin/stdout/stderr (HAProxy's master then puts a socket on fd 0 and
        # dies on its re-exec).  Make them plain inheritable descriptors.
        for fd in (0, 1, 2):
            os.set_inheritable(fd, True)
    except BaseException as error:  # noqa: B036 - the command is waiting for a reason
        message = _describe(error, settings)
        if logging.getLogger().handlers:
            LOG.error("could not start the daemon: %s", message)
            logging.shutdown()
        report(message.encode("utf-8", "replace"))
        os._exit(1)

    try:
        for note in notes:
            LOG.warning("%s", note)
        LOG.info("daemon running as %s:%s, pid %d in %s", run_as.name, run_as.group,
                 os.getpid(), settings.pid)
        report(READY)
        try:
            return serve(settings, file_handler)
        except Exception:
            LOG.exception("the worker stopped on an error")
            return 1
    finally:
        context.close()
        LOG.info("daemon stopped; pid file %s removed", settings.pid)


def _describe(error, settings):
    from lockfile import AlreadyLocked, LockFailed
    if isinstance(error, AlreadyLocked):
        return f"--pid: {settings.pid} was created by another instance while this one started"
    if isinstance(error, LockFailed):
        return f"--pid: cannot create {settings.pid}"
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}"
    return f"{type(error).__name__}: {error}".replace("\n", " ")
