"""Keeping CAP_NET_BIND_SERVICE, and only it, across the daemon's drop from root.

What the systemd unit gets from `AmbientCapabilities=CAP_NET_BIND_SERVICE`,
`CapabilityBoundingSet=CAP_NET_BIND_SERVICE` and `NoNewPrivileges=yes`, the
daemon (started as root by the SysV init script, service = process) sets up
itself: the bounding set is cut to that one capability, the capabilities
are kept across setuid (PR_SET_KEEPCAPS), then permitted, effective and
inheritable become that one and it is raised ambient, so HAProxy, started
by the worker, binds ports below 1024 without being root; "no new
privileges" is set last.  Linux only (prctl, capset), through libc.
"""
import ctypes
import ctypes.util
import errno
import os

CAP_NET_BIND_SERVICE = 10
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _prctl(option, argument=0, third=0):
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(option, argument, third, 0, 0) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"prctl({option}): {os.strerror(number)}")


def _last_cap():
    try:
        with open("/proc/sys/kernel/cap_last_cap") as stream:
            return int(stream.read())
    except (OSError, ValueError):
        return 40


def before_setuid(keep=CAP_NET_BIND_SERVICE):
    """As root, before dropping to another uid: bound to `keep`, keep it across setuid."""
    for cap in range(_last_cap() + 1):
        if cap != keep:
            try:
                _prctl(_PR_CAPBSET_DROP, cap)
            except OSError as error:
                if error.errno != errno.EINVAL:  # a capability this kernel does not know
                    raise
    _prctl(_PR_SET_KEEPCAPS, 1)


def after_setuid(keep=CAP_NET_BIND_SERVICE):
    """After setuid: `keep` alone, permitted, effective, inheritable and ambient; no new privileges."""
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    word, bit = divmod(keep, 32)
    data[word].effective = data[word].permitted = data[word].inheritable = 1 << bit
    libc = _libc()
    if libc.capset(ctypes.byref(header), data) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"capset: {os.strerror(number)}")
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, keep)
    _prctl(_PR_SET_KEEPCAPS, 0)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
