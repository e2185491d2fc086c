"""The UPDATE decision, in one place: what runs + what is asked → a Plan.

    plan_update(requested, config, applied, accepts) → Plan

* START      HAProxy does not run: install the config and start it.
* UNCHANGED  HAProxy runs exactly what this worker applied, the request is
             the same and the live file already holds its config.
* RUNTIME    only nodes change, in ways the running HAProxy takes through
             its runtime API (`commands`, in order): weights, conditions,
             IP addresses, added and removed nodes.
* RELOAD     anything else (`reason` says why): a load balancer's own
             settings, a backup flag, a host name, an HTTP node added to an
             HAProxy that refuses `cookie` on dynamic servers, runtime
             commands that would take longer than a reload (Costs: measured
             per HAProxy series), or a running state the worker does not
             know for sure.

Pure: plain values in, a Plan out, no I/O.  apply.py carries a Plan out.
"""
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, NamedTuple, Optional, Tuple

from libra_worker.drivers.haproxy import render

START, UNCHANGED, RUNTIME, RELOAD = "start", "unchanged", "runtime", "reload"

@dataclass(frozen=True)
class Costs:
    """What changing one HAProxy series costs, in microseconds.

    Measured with bench/run on 2 CPUs: the commands from the rows' "HAProxy
    alone" (the planner's commands over a bare socket), plus what the worker
    adds to a runtime change (its stats session, the config written); the
    reload from the reload floor (`haproxy -c` + reload, the same
    transition).  The per-node work both paths share (the request parsed,
    the config rendered) is left out.  A RUNTIME plan is made only when its
    estimate is below the reload's.
    """
    command: Mapping = field(hash=False)  # per runtime command, by runtime.j2 macro, small backend
    lookup: float          # per server in the backend, per command naming a server (2.6 walks a list)
    add_walk: float        # per server in the backend, per `add server` (3.0 walks it for a duplicate name)
    session: float         # per runtime change: the stats session, the config staged, synced, renamed
    reload: float          # haproxy -c and a reload, whatever the size
    reload_server: float   # per server of the new configuration (parsed twice: -c and the new process)
    retire_server: float   # per server of the configuration that runs now (the old process's)


# HAProxy 2.6: `set server` finds its server by walking the backend's list,
# so a command costs more the bigger the backend (lookup × servers: ~66 µs
# at 10,000 measured); `add server` does not look for duplicates that way.
COSTS_2_6 = Costs(command=MappingProxyType({"add_server": 8, "enable_health": 3, "set_state": 10,
                                            "set_addr": 10, "set_weight": 6, "del_server": 8}),
                  lookup=0.006, add_walk=0.0, session=4_000,
                  reload=80_000, reload_server=26, retire_server=2)
# HAProxy 3.0: servers are found in a tree; `add server` walks the backend for
# a duplicate name (9,999 adds to one backend: ~0.8 s); a state change is
# logged by HAProxy twice (syslog to the worker's sink, and its output): 15-28
# µs alone, more in the worker while its log sink takes the lines.  10,000
# condition changes measured 1.2-1.6x the reload floor at run time and
# 1.2-1.8x by a reload: a tie, which the runtime path takes (no new process).
COSTS_3_0 = Costs(command=MappingProxyType({"add_server": 16, "enable_health": 4, "set_state": 24,
                                            "set_addr": 12, "set_weight": 9, "del_server": 10}),
                  lookup=0.0, add_walk=0.01, session=4_000,
                  reload=58_000, reload_server=18, retire_server=3)

# The first HAProxy series checked to accept `cookie` in `add server` (2.6 answers
# "'cookie' option is not accepted for dynamic server"; 2.7-2.9 are not checked,
# so they are treated as 2.6: an HTTP node added there reloads, and 2.6's costs apply).
DYNAMIC_COOKIE_SINCE = (3, 0)
_VERSION = re.compile(r"^Version:\s*(\d+)\.(\d+)", re.M)


@dataclass(frozen=True)
class Accepts:
    """What the running HAProxy takes at run time, beyond what every supported version does."""
    dynamic_cookie: bool = False  # `add server ... cookie <value>` (HTTP nodes)
    costs: Costs = COSTS_2_6      # what its runtime commands and a reload cost

    @classmethod
    def from_info(cls, info_text):
        """From the running process's `show info` (its `Version:` line); unknown → the least."""
        match = _VERSION.search(info_text or "")
        if match is None:
            return cls()
        newer = (int(match.group(1)), int(match.group(2))) >= DYNAMIC_COOKIE_SINCE
        return cls(dynamic_cookie=newer, costs=COSTS_3_0 if newer else COSTS_2_6)


@dataclass(frozen=True)
class Applied:
    """What the device runs, as far as the worker knows it."""
    running: bool                           # an HAProxy answers
    load_balancers: Optional[tuple] = None  # what this worker applied to it, if it knows
    file_holds_config: bool = False         # the live file is exactly the requested config (read
                                            # only when the request is what runs: all that uses it)
    server_ids: Optional[dict] = None       # server_ids() of what runs, with load_balancers


def server_ids(requested, previous=None):
    """{protocol: {node id: HAProxy server id}} for `requested` (models.LoadBalancer tuple).

    A node keeps the id it had in `previous` (the same mapping, of what runs);
    a new node takes the smallest id no node of `previous` holds in its
    backend, so an `add server` made before the removals of the same plan
    never meets an id in use.  The config and `add server` both name the id:
    a reload after runtime changes changes nothing, and HAProxy, given an id,
    skips its search for a free one (O(servers in the backend) per add).
    `previous` None (a worker restart, which reloads anyway): 1, 2, 3, ...
    in the request's order.
    """
    mapping = {}
    for lb in requested:
        kept = (previous or {}).get(lb.protocol, {})
        used = set(kept.values())
        ids, candidate = {}, 1
        for node in lb.nodes:
            held = kept.get(node.id)
            if held is None:
                while candidate in used:
                    candidate += 1
                held = candidate
                used.add(held)
            ids[node.id] = held
        mapping[lb.protocol] = ids
    return mapping


class RuntimeCommand(NamedTuple):  # a tuple: a plan can hold 30,000 of them
    line: str            # one stats-socket command, from templates/runtime.j2
    expect: re.Pattern   # what HAProxy answers when it worked
    retry: Optional[re.Pattern] = None  # an answer that means "not yet": send it again shortly
    nudge: Tuple[str, ...] = ()         # lines sent just before each retry
    withdraws: bool = False  # takes a server out of service: sent once every other command is taken


@dataclass(frozen=True)
class Plan:
    kind: str                                  # START, UNCHANGED, RUNTIME or RELOAD
    config: str                                # the whole configuration text, for the live file
    commands: Tuple[RuntimeCommand, ...] = ()  # RUNTIME: sent in this order
    reason: str = ""                           # RELOAD: why the runtime API cannot do it


_SILENT = re.compile(r"\A\s*\Z")
_EXPECT = {
    "add_server": re.compile(r"\A\s*New server registered\."),
    "enable_health": _SILENT,
    "set_state": _SILENT,
    "set_addr": re.compile(r"\A\s*(IP changed|port changed|no need to change)"),
    "set_weight": _SILENT,
    "del_server": re.compile(r"\A\s*Server deleted\."),
}
# `del server` of a server (already in maintenance) that still has a connection: its
# last request is finishing, or it has idle connections.  HAProxy 2.6 keeps a
# connection that went idle after the server entered maintenance until the
# server moves: each retry moves it to another port first (it takes no traffic).
_STILL_CONNECTED = re.compile(r"still has connections", re.I)
_ANY = re.compile(r"")


def plan_update(requested, config, applied, accepts=Accepts(), ids=None):
    """The Plan that makes the device run `requested` (models.LoadBalancer tuple).

    `config` is render.render_config(requested, ..., server_ids=ids); `applied`
    an Applied; `accepts` what the running HAProxy takes at run time; `ids`
    server_ids(requested, applied.server_ids) (computed when None).
    """
    if ids is None:
        ids = server_ids(requested, applied.server_ids)
    if not applied.running:
        return Plan(START, config)
    if applied.load_balancers is None:
        # After a restart (or a worker killed between the swap and the reload) the
        # file can be ahead of HAProxy: only a reload makes it run what the file says.
        return Plan(RELOAD, config, reason="what HAProxy runs is not known to this worker")
    if tuple(applied.load_balancers) == tuple(requested):
        if applied.file_holds_config:
            return Plan(UNCHANGED, config)
        return Plan(RELOAD, config, reason="the live file is not what HAProxy runs")
    commands, reason = runtime_commands(applied.load_balancers, requested, accepts, ids)
    if commands is None:
        return Plan(RELOAD, config, reason=reason)
    return Plan(RUNTIME, config, tuple(commands))


def frame(lb):
    """Everything of a load balancer but its nodes: a change here needs a reload."""
    return (lb.protocol, lb.port, lb.algorithm, lb.monitor, lb.options)


_DOTTED_QUAD = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")


def _is_ip(address):
    """An address as models.py keeps it (normalized): IPv6 has ':', IPv4 is a dotted quad."""
    return ":" in address or _DOTTED_QUAD.fullmatch(address) is not None


class _Changes:
    """The nodes of one load balancer that change, by kind of runtime command."""

    def __init__(self):
        self.added, self.enabled, self.disabled = [], [], []
        self.moved, self.weighed, self.removed = [], [], []


def _diff(old, new, accepts):
    """_Changes turning `old` into `new` (same frame), or the reason only a reload can."""
    changes = _Changes()
    before = {node.id: node for node in old.nodes}
    changed = []
    for node in new.nodes:
        was = before.pop(node.id, None)
        if was == node:  # the usual case, a tuple comparison
            continue
        changed.append(node)
        if was is None:
            if new.protocol == "HTTP" and not accepts.dynamic_cookie:
                return None, "an HTTP node is added and this HAProxy refuses 'cookie' on `add server`"
            if not _is_ip(node.address):
                return None, f"node {node.id} is added with a host name"
            changes.added.append(node)
            continue
        if was.backup != node.backup:
            return None, f"node {node.id} changes its backup flag"
        if (was.address, was.port) != (node.address, node.port):
            if not _is_ip(node.address):
                return None, f"node {node.id} moves to a host name"
            changes.moved.append(node)
        if was.enabled != node.enabled:
            (changes.enabled if node.enabled else changes.disabled).append(node)
        if was.weight != node.weight:
            changes.weighed.append(node)
    changes.removed.extend(before.values())  # in the running config, not in the new one
    render.checked_nodes(changed)  # runtime.j2 writes their values as they are
    return changes, ""


def runtime_cost(costs, counts, before, added):
    """µs the runtime commands take: `counts` {runtime.j2 macro: commands} for one backend
    of `before` servers, to which `added` are added."""
    named = sum(counts.values()) - counts.get("add_server", 0)
    return (sum(costs.command[kind] * number for kind, number in counts.items())
            + named * costs.lookup * (before + added)
            + added * costs.add_walk * (before + added / 2))


def reload_cost(costs, old_lbs, new_lbs):
    """µs `haproxy -c` and a reload take, from what runs to what is asked."""
    return (costs.reload + costs.reload_server * sum(len(lb.nodes) for lb in new_lbs)
            + costs.retire_server * sum(len(lb.nodes) for lb in old_lbs))


# The answer to a nudge does not matter: the `del server` after it is what is checked.
NUDGE_EXPECT = _ANY


def runtime_commands(old_lbs, new_lbs, accepts=Accepts(), ids=None):
    """([RuntimeCommand], "") turning running `old_lbs` into `new_lbs`, or (None, reason).

    `ids` is server_ids() of `new_lbs`: an added node's `add server` names its id.
    """
    if ids is None:
        ids = server_ids(new_lbs)
    if len(old_lbs) != len(new_lbs):
        return None, "a load balancer is added or removed"
    by_protocol = {lb.protocol: lb for lb in old_lbs}
    diffs = []
    for new in new_lbs:
        old = by_protocol.get(new.protocol)
        if old is None or frame(old) != frame(new):
            return None, f"the {new.protocol} load balancer's own settings change"
        changes, reason = _diff(old, new, accepts)
        if changes is None:
            return None, reason
        diffs.append(({**render.proxy_settings(new), "ids": ids[new.protocol]}, changes, len(old.nodes)))
    macros = render.environment().get_template("runtime.j2").module
    commands, cost, counts = [], accepts.costs.session, {}  # counts: {macro: commands} of one backend

    def lines(kind, lb, nodes, *args):
        return [line for line in str(getattr(macros, kind)(lb, nodes, *args)).splitlines() if line]

    def add(kind, lb, nodes, *args, withdraws=False):
        if nodes:
            made = lines(kind, lb, nodes, *args)
            commands.extend(RuntimeCommand(line, _EXPECT[kind], withdraws=withdraws) for line in made)
            counts[kind] = counts.get(kind, 0) + len(made)

    for lb, changes, running in diffs:
        counts.clear()
        # A dynamic server starts in maintenance: checks on, then ready (unless DISABLED:
        # its line says `disabled`, as in the config).
        add("add_server", lb, changes.added)
        add("enable_health", lb, changes.added)
        add("set_state", lb, [node for node in changes.added if node.enabled], "ready")
        add("set_addr", lb, changes.moved)
        add("set_weight", lb, changes.weighed)
        add("set_state", lb, changes.enabled, "ready")
        # Last, and only once everything above was taken (apply.py): nothing leaves
        # service while a refused command may still turn the plan into a reload.
        add("set_state", lb, changes.disabled + changes.removed, "maint", withdraws=True)
        if changes.removed:
            moves = lines("move_aside", lb, changes.removed)
            commands.extend(RuntimeCommand(line, _EXPECT["del_server"], _STILL_CONNECTED,
                                           tuple(moves[2 * index:2 * index + 2]), withdraws=True)
                            for index, line in enumerate(lines("del_server", lb, changes.removed)))
            counts["del_server"] = len(changes.removed)
        cost += runtime_cost(accepts.costs, counts, running, len(changes.added))
    reload = reload_cost(accepts.costs, old_lbs, new_lbs)
    if cost > reload:
        return None, (f"{len(commands)} runtime commands (~{cost / 1000:.0f} ms) take longer "
                      f"than a reload (~{reload / 1000:.0f} ms) here")
    return commands, ""
