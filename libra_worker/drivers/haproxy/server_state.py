"""Node health carried across a reload: HAProxy's server-state file.

A new HAProxy process starts every server as untested: a serving node shows
"UP 1/2" until its first check, and a dead node takes traffic until its
checks fail again (with Libra's default monitor, up to a minute).  Just
before a reload the driver saves `show servers state` of the serving
process here; the new process reads it (`server-state-file` in the
global section, `load-server-state-from-file global` in defaults) and
starts each server in the state it had.

Only health is carried, and only health measured by the same probe: a
load balancer whose monitor changes type or path (or that was not
running) starts every server fresh.  HAProxy would also restore a saved
address, port, weight and maintenance state over the new configuration's,
so a server's line is kept only when those match the new configuration.  Once the reload is done the file is emptied (a
version line alone: HAProxy warns when the file is missing), so a later
start (ENABLE, a restart) never brings back old health.
"""
import logging
import operator
import os

from libra_worker import safe_files
from libra_worker.errors import ServiceError

LOG = logging.getLogger(__name__)

FILE_NAME = "haproxy.server-state"
STATE_VERSION = "1"
SHOW_COMMAND = "show servers state"
# srv_admin_state bits: FMAINT, IMAINT, CMAINT, RMAINT (maintenance); FDRAIN, IDRAIN.
_MAINT_BITS = 0x01 | 0x02 | 0x04 | 0x20
_DRAIN_BITS = 0x08 | 0x10
_NEEDED = ("be_name", "srv_name", "srv_addr", "srv_port", "srv_admin_state", "srv_iweight")


def path_for(statsfile):
    """The state file lives beside the statsfile: the worker's own directory in both service modes."""
    return os.path.join(os.path.dirname(os.path.abspath(statsfile)), FILE_NAME)


def probe(lb):
    """What a health check asks: the same answer means the same health."""
    monitor = lb.monitor
    if monitor is not None and monitor.type == "HTTP":
        return ("HTTP", monitor.path)
    return ("CONNECT",)


def _expected(old_lbs, new_lbs, backend_name):
    """{(backend, server): (address, port, weight, in maintenance)} whose saved health holds."""
    probes = {lb.protocol: probe(lb) for lb in old_lbs or ()}
    servers = {}
    for lb in new_lbs:
        if probes.get(lb.protocol) != probe(lb):
            continue
        backend = backend_name(lb.protocol)
        for node in lb.nodes:
            servers[(backend, node.id)] = (node.address, str(node.port), str(node.weight),
                                           not node.enabled)
    return servers


# What a server's saved line must still match: id, address, port, weight, enabled (a models.Node).
_HEALTH_KEY = operator.itemgetter(0, 1, 2, 3, 5)


def can_carry(old_lbs, new_lbs):
    """Can any server of `new_lbs` keep its health: a node that runs now as it will, probed alike?"""
    running = {lb.protocol: lb for lb in old_lbs or ()}
    for lb in new_lbs:
        old = running.get(lb.protocol)
        if old is not None and probe(old) == probe(lb) and \
                not set(map(_HEALTH_KEY, old.nodes)).isdisjoint(map(_HEALTH_KEY, lb.nodes)):
            return True
    return False


def carried(text, old_lbs, new_lbs, backend_name):
    """The answer to `show servers state` while `old_lbs` run → the state file for `new_lbs` (pure).

    Keeps the version line, the header and the lines of servers the new
    configuration has unchanged, probed the same way; None when the answer
    is not a state dump.  `old_lbs` None (not known what runs): nothing is kept.
    """
    lines = text.splitlines()
    if len(lines) < 2 or lines[0].strip() != STATE_VERSION or not lines[1].startswith("# "):
        return None
    header = lines[1][2:].split()
    if any(name not in header for name in _NEEDED):
        return None
    column = {name: header.index(name) for name in _NEEDED}
    expected = _expected(old_lbs, new_lbs, backend_name)
    kept = [lines[0], lines[1]]
    # The names come first: a line is split whole only for a server that may be kept.
    names = max(column["be_name"], column["srv_name"]) + 1
    for line in lines[2:]:
        fields = line.split(None, names)
        if len(fields) <= names:
            continue
        want = expected.get((fields[column["be_name"]], fields[column["srv_name"]]))
        if want is None:
            continue
        fields = line.split()
        if len(fields) < len(header):
            continue
        address, port, weight, maint = want
        try:
            admin = int(fields[column["srv_admin_state"]])
        except ValueError:
            continue
        # A host name's line holds the address it resolved to: it starts fresh.
        if (fields[column["srv_addr"]] == address and fields[column["srv_port"]] == port
                and fields[column["srv_iweight"]] == weight
                and bool(admin & _MAINT_BITS) == maint and not admin & _DRAIN_BITS):
            kept.append(line)
    return "\n".join(kept) + "\n"


def _write(path, text):
    """Atomic, symlink-safe write: HAProxy never reads half a file.

    Not synced to disk: the file is read by the reload that follows at once
    and emptied after it; a crash in between loses only health, which the
    checks measure again.
    """
    # 0644: HAProxy reads it (as root in system mode).
    safe_files.write_atomic(path, text.encode("ascii"), 0o644, make_dir=0o700, durable=False)


def clear(path):
    """An empty state: the next process starts every server fresh."""
    try:
        _write(path, STATE_VERSION + "\n")
    except OSError as error:
        LOG.warning("cannot empty the server-state file %s: %s", path, error.strerror)
        try:
            safe_files.unlink(path)
        except OSError:
            pass


def save(ask, path, old_lbs, new_lbs, backend_name):
    """Before a reload from `old_lbs` to `new_lbs`: server states → `path`, for the new process.

    `ask` sends one stats-socket command and returns the answer.  On any
    failure the file is removed (stale health is worse than none) and the
    reload goes on: the new process then checks every server afresh.  When
    no server of `new_lbs` can keep its health (every weight changes, say),
    HAProxy is not asked at all: its answer for 10,000 servers takes longer
    to read than the rest of the reload's own work.
    """
    if not can_carry(old_lbs, new_lbs):
        clear(path)
        return False
    try:
        text = carried(ask(SHOW_COMMAND), old_lbs, new_lbs, backend_name)
        if text is None:
            raise ServiceError("HAProxy's answer to 'show servers state' is not a state dump")
        _write(path, text)
    except (ServiceError, OSError, UnicodeError) as error:
        clear(path)
        LOG.warning("node health is not carried across this reload: %s", error)
        return False
    return True
