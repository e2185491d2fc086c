"""Commands run in a private mount namespace with some paths bind-mounted over.

The sudo and system-mode tests must see exactly the repository's sudoers
rules and their own /etc/default/haproxy and /run/haproxy, without touching
the machine's (another test, or the installed package, owns those).  The
bind mounts exist only inside `unshare --mount`; every process started in
there (sudo, the init script, a root HAProxy it starts) sees them, nothing
outside does.  Files written through them land in the test's own copies.
"""
import shutil

import pytest

_SCRIPT = ('set -e; count=$1; shift; while [ "$count" -gt 0 ]; do '
           'mount --bind "$1" "$2"; shift 2; count=$((count - 1)); done; exec "$@"')


def wrap(binds, argv):
    """argv run as root in a new mount namespace where each (source, target) of `binds` is mounted."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare not found (util-linux): the namespace cannot be made")
    pairs = [str(part) for source, target in binds for part in (source, target)]
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", _SCRIPT,
            "bind-mounts", str(len(binds)), *pairs, *map(str, argv)]
