"""Daemon mode: every reason not to start is printed before detaching.

python-daemon does the PEP 3143 work (detach, umask, cwd, privileges,
closing descriptors); the pid file is a lockfile TimeoutPIDLockFile.
"""
import errno
import grp
import os
import pwd
import signal
import stat
import sys

import daemon
import daemon.pidfile

from libra_worker import logs


class StartupError(Exception):
    """One line for stderr naming the path or option that stops the start."""


def _resolve_ids(settings):
    try:
        user = pwd.getpwnam(settings.user) if settings.user else pwd.getpwuid(os.getuid())
    except KeyError:
        raise StartupError(f"--user: unknown user {settings.user!r}") from None
    try:
        group = grp.getgrnam(settings.group) if settings.group else grp.getgrgid(user.pw_gid)
    except KeyError:
        raise StartupError(f"--group: unknown group {settings.group!r}") from None
    return user, group


def _may(path, uid, gids, bits):
    """Would uid (with groups gids) get `bits` (an R/W/X triple) on path?"""
    info = os.stat(path)
    if uid == 0:
        return True
    user_bit, group_bit, other_bit = bits
    if info.st_uid == uid:
        return bool(info.st_mode & user_bit)
    if info.st_gid in gids:
        return bool(info.st_mode & group_bit)
    return bool(info.st_mode & other_bit)


WRITE = (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH)
READ = (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
SEARCH = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)


def _check_dir_writable(option, path, uid, gids):
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise StartupError(f"{option}: directory {directory} does not exist")
    if not (_may(directory, uid, gids, WRITE) and _may(directory, uid, gids, SEARCH)):
        raise StartupError(f"{option}: directory {directory} is not writable by uid {uid}")
    if os.path.exists(path) and not _may(path, uid, gids, WRITE):
        raise StartupError(f"{option}: {path} is not writable by uid {uid}")


def _live_pid(pidfile):
    """The pid in a pid file if that process is alive, else None (and the file is stale)."""
    pid = pidfile.read_pid()
    if pid is None:
        return None
    try:
        os.kill(pid, 0)
    except OSError as error:
        return pid if error.errno == errno.EPERM else None
    return pid


def prepare(settings, driver_preflight):
    """All start-up checks; returns (DaemonContext, user) or raises StartupError."""
    user, group = _resolve_ids(settings)
    uid, gid = user.pw_uid, group.gr_gid
    gids = {gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}
    _check_dir_writable("--pid", settings.pid, uid, gids)
    if settings.logfile:
        _check_dir_writable("--logfile", settings.logfile, uid, gids)
    if settings.config_path and not _may(settings.config_path, uid, gids, READ):
        raise StartupError(f"--config: {settings.config_path} is not readable by {user.pw_name}")
    for problem in driver_preflight(user.pw_name):
        raise StartupError(problem)

    pidfile = daemon.pidfile.TimeoutPIDLockFile(settings.pid, acquire_timeout=0)
    live = _live_pid(pidfile)
    if live is not None:
        raise StartupError(f"--pid: {settings.pid} is held by running process {live}")
    if pidfile.is_locked() or os.path.exists(settings.pid):
        pidfile.break_lock()
        if os.path.exists(settings.pid):
            os.unlink(settings.pid)
    if settings.logfile and not os.path.exists(settings.logfile):
        # Created now, owned by the run user, so the daemon can keep writing it.
        with open(settings.logfile, "a"):
            pass
        if os.getuid() == 0:
            os.chown(settings.logfile, uid, gid)

    context = daemon.DaemonContext(
        pidfile=pidfile, umask=0o022, working_directory="/",
        uid=uid if os.getuid() == 0 else None,
        gid=gid if os.getuid() == 0 else None,
        initgroups=os.getuid() == 0,
        signal_map={signal.SIGTTIN: None, signal.SIGTTOU: None, signal.SIGTSTP: None})
    return context, user


def run(settings, serve):
    """Check, detach, run `serve(settings, file_handler)`; returns the exit status."""
    from libra_worker.drivers import load_driver
    try:
        context, user = prepare(settings, load_driver(settings).preflight)
    except StartupError as error:
        print(f"libra_worker: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"libra_worker: {error.filename or ''}: {error.strerror}", file=sys.stderr)
        return 1
    with context:
        file_handler = logs.setup(settings)
        try:
            return serve(settings, file_handler)
        except Exception:
            import logging
            logging.getLogger(__name__).exception("the worker stopped on an error")
            return 1
