"""Validated load balancers → HAProxy configuration text.

All HAProxy syntax lives in templates/ (base.j2: global and defaults;
haproxy.cfg.j2: the proxies; macros.j2: one macro per section).  This
module only maps the models onto the template context: protocol and
algorithm keywords become HAProxy words, a monitor becomes check settings.

Every string that reaches the template is checked once more to be a single
configuration word (no whitespace, '#', quotes, backslash or braces), so a
model built by hand, or an odd operator setting, cannot add a line either.
"""
import ipaddress
import os
import re
from dataclasses import dataclass

import jinja2

from libra_worker.drivers.haproxy import server_state
from libra_worker.errors import ConfigError

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
TEMPLATE = "haproxy.cfg.j2"

_FRONTEND_NAMES = {"HTTP": "http", "TCP": "tcp", "GALERA": "galera"}
_MODES = {"HTTP": "http", "TCP": "tcp", "GALERA": "tcp"}
_BALANCE = {"ROUND_ROBIN": "roundrobin", "LEAST_CONNECTIONS": "leastconn"}

# Health check used when a load balancer has no monitor: a plain TCP
# connect, so that STATS still reports real health.
DEFAULT_CHECK = {"inter": 5, "rise": 2, "fall": 3, "timeout": None, "http_path": None}

# One configuration word: printable ASCII except space, '#', quotes, '\', '{', '}'.
_WORD = re.compile(r"[!$%&()*+,\-./0-9:;<=>?@A-Z\[\]^_`a-z|~]+")
# A health-check path: any printable ASCII but space; the template single-quotes it.
_CHECK_PATH = re.compile(r"/[\x21-\x7e]*")

_environment = None


def environment():
    """The module's Jinja2 environment, built once."""
    global _environment
    if _environment is None:
        _environment = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            undefined=jinja2.StrictUndefined,
            autoescape=False)
    return _environment


def frontend_name(protocol: str) -> str:
    """'HTTP' → 'http': the frontend (and METRICS row) of a load balancer."""
    try:
        return _FRONTEND_NAMES[protocol.upper()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown protocol {protocol!r}") from None


def backend_name(protocol: str) -> str:
    """'HTTP' → 'http_servers': the backend holding a load balancer's nodes."""
    return frontend_name(protocol) + "_servers"


def _word(value, what):
    if not isinstance(value, str) or not _WORD.fullmatch(value):
        raise ValueError(f"{what}: not a single configuration word: {value!r:.60}")
    return value


def _check_path(value):
    if not isinstance(value, str) or not _CHECK_PATH.fullmatch(value):
        raise ValueError(f"monitor path: not '/' and printable ASCII: {value!r:.60}")
    return value


def _number(value, what):
    if type(value) is not int:
        raise ValueError(f"{what}: not an integer: {value!r:.60}")
    return value


def _setting(settings, option):
    value = getattr(settings, option)
    if not isinstance(value, str) or not _WORD.fullmatch(value):
        raise ConfigError(f"[worker:haproxy] {option}", value,
                          "must be one word without spaces, '#', quotes, '\\' or braces")
    return value


def _check(lb):
    monitor = lb.monitor
    if monitor is None:
        return DEFAULT_CHECK
    return {
        "inter": _number(monitor.delay, "monitor delay"),
        "rise": _number(monitor.attempts, "monitor attempts"),
        "fall": monitor.attempts,
        "timeout": _number(monitor.timeout, "monitor timeout"),
        "http_path": (_check_path(monitor.path)
                      if monitor.type == "HTTP" else None),
    }


def _checked(node):
    """The node itself, once each of its values is known to be one word or number.

    The templates read the Node tuples as they are: a dict per server would
    be 10,000 more objects per 10,000-node UPDATE, and the memory they
    scatter is not handed back.
    """
    _word(node.id, "node id")
    _word(node.address, "node address")
    _number(node.port, "node port")
    _number(node.weight, "node weight")
    if type(node.backup) is not bool or type(node.enabled) is not bool:
        raise ValueError(f"node {node.id}: backup and enabled must be true or false")
    return node


def _proxy_settings(lb):
    """Everything the templates say about a load balancer but its servers."""
    options = lb.options
    return {
        "protocol": lb.protocol,
        "frontend": frontend_name(lb.protocol),
        "backend": backend_name(lb.protocol),
        "mode": _MODES[lb.protocol],
        "port": _number(lb.port, "port"),
        "balance": _BALANCE[lb.algorithm],
        "client_timeout": _number(options.client_timeout, "client_timeout"),
        "server_timeout": _number(options.server_timeout, "server_timeout"),
        "connect_timeout": _number(options.connect_timeout, "connect_timeout"),
        "connect_retries": _number(options.connect_retries, "connect_retries"),
        "check": _check(lb),
    }


def _proxy(lb):
    return {**_proxy_settings(lb), "servers": [_checked(node) for node in lb.nodes]}


def render_config(load_balancers, settings, *, user=None, group=None) -> str:
    """The whole HAProxy configuration for `load_balancers` (models.LoadBalancer).

    `settings` is a HaproxySettings; `user`/`group`, when given, make HAProxy
    drop privileges after binding.  With `service = system` HAProxy starts
    as root, so it always drops to [worker:haproxy] user/group in its chroot,
    as Debian's own haproxy.cfg does.
    """
    chroot = None
    if getattr(settings, "service", "process") == "system":
        user = settings.user if user is None else user
        group = settings.group if group is None else group
        chroot = _setting(settings, "chroot")
    context = {
        "chroot": chroot,
        "log_target": _setting(settings, "log_target"),
        "pidfile": _setting(settings, "pidfile"),
        "stats_socket": _setting(settings, "stats_socket"),
        "bind_address": _setting(settings, "bind_address"),
        "bind_ipv6": ":" in settings.bind_address,
        "server_state_file": _word(server_state.path_for(settings.statsfile), "server-state file"),
        "user": None if user is None else _word(user, "user"),
        "group": None if group is None else _word(group, "group"),
        "load_balancers": [_proxy(lb) for lb in load_balancers],
    }
    return environment().get_template(TEMPLATE).render(context)


# -- runtime API: changes applied without a reload ------------------------------

@dataclass(frozen=True)
class RuntimeCommand:
    line: str            # one stats-socket command, from templates/runtime.j2
    expect: re.Pattern   # what HAProxy answers when it worked


_SILENT = re.compile(r"\A\s*\Z")
_RUNTIME_OK = {
    "set_weight": _SILENT,
    "set_addr": re.compile(r"\A\s*(IP changed|port changed|no need to change)"),
    "add_server": re.compile(r"\A\s*New server registered\."),
    "enable_health": _SILENT,
    "set_state": _SILENT,
    "del_server": re.compile(r"\A\s*Server deleted\."),
}


def _frame(lb):
    """Everything of a load balancer but its nodes: a change here needs a reload."""
    return (lb.protocol, lb.port, lb.algorithm, lb.monitor, lb.options)


def _is_ip(address):
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


class _TooMany(Exception):
    pass


def runtime_commands(old_lbs, new_lbs, limit=None):
    """[RuntimeCommand] turning running `old_lbs` into `new_lbs`, or None when only a reload can.

    Node weights, conditions and IP addresses change in place; nodes of TCP and GALERA
    load balancers are added and removed as dynamic servers.  HTTP nodes
    carry a persistence cookie, which HAProxy 2.6 refuses on dynamic
    servers, and a node's backup flag cannot change at run time.
    """
    if old_lbs is None or len(old_lbs) != len(new_lbs):
        return None
    try:
        return _runtime_commands(old_lbs, new_lbs, limit)
    except _TooMany:  # more than the caller would send: it reloads anyway
        return None


def _runtime_commands(old_lbs, new_lbs, limit):
    macros = environment().get_template("runtime.j2").module
    commands = []

    def add(kind, *args):
        if limit is not None and len(commands) >= limit:
            raise _TooMany()
        commands.append(RuntimeCommand(str(getattr(macros, kind)(*args)).strip(), _RUNTIME_OK[kind]))

    by_protocol = {lb.protocol: lb for lb in old_lbs}
    for new in new_lbs:
        old = by_protocol.get(new.protocol)
        if old is None or _frame(old) != _frame(new):
            return None
        proxy = _proxy_settings(new)
        before = {node.id: node for node in old.nodes}
        for node in new.nodes:
            was = before.pop(node.id, None)
            if was == node:  # the usual case, a tuple comparison
                continue
            _checked(node)
            if was is None:
                if new.protocol == "HTTP":
                    return None
                add("add_server", proxy, node)  # dynamic servers start in maintenance
                add("enable_health", proxy, node)
                if node.enabled:
                    add("set_state", proxy, node, "ready")
                continue
            if was.backup != node.backup:
                return None
            if was.enabled != node.enabled:
                add("set_state", proxy, node, "ready" if node.enabled else "maint")
            if (was.address, was.port) != (node.address, node.port):
                if not _is_ip(node.address):
                    return None
                add("set_addr", proxy, node)
            if was.weight != node.weight:
                add("set_weight", proxy, node)
        for gone in before.values():  # in the running config, not in the new one
            add("set_state", proxy, gone, "maint")
            add("del_server", proxy, gone)
    return commands
