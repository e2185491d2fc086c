"""Validated load balancers → HAProxy configuration text.

All HAProxy syntax lives in templates/ (base.j2: global and defaults;
haproxy.cfg.j2: the proxies; macros.j2: one macro per section).  This
module only maps the models onto the template context: protocol and
algorithm keywords become HAProxy words, a monitor becomes check settings.

Every string that reaches the template is checked once more to be a single
configuration word (no whitespace, '#', quotes, backslash or braces), so a
model built by hand, or an odd operator setting, cannot add a line either.
"""
import os
import re

import jinja2

from libra_worker.drivers.haproxy import server_state
from libra_worker.errors import ConfigError
from libra_worker.models import CONFIG_WORD, MONITOR_PATH

# Many configuration words, one per line (checked_nodes).
CONFIG_WORD_LINES = re.compile(rf"(?:{CONFIG_WORD.pattern})(?:\n(?:{CONFIG_WORD.pattern}))*")

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
TEMPLATE = "haproxy.cfg.j2"

_FRONTEND_NAMES = {"HTTP": "http", "TCP": "tcp", "GALERA": "galera"}
_MODES = {"HTTP": "http", "TCP": "tcp", "GALERA": "tcp"}
_BALANCE = {"ROUND_ROBIN": "roundrobin", "LEAST_CONNECTIONS": "leastconn"}

# Health check used when a load balancer has no monitor: a plain TCP
# connect, so that STATS still reports real health.
DEFAULT_CHECK = {"inter": 5, "rise": 2, "fall": 3, "timeout": None, "http_path": None}

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
    if not isinstance(value, str) or not CONFIG_WORD.fullmatch(value):
        raise ValueError(f"{what}: not a single configuration word: {value!r:.60}")
    return value


def _check_path(value):
    if not isinstance(value, str) or not MONITOR_PATH.fullmatch(value):
        raise ValueError(f"monitor path: not '/' and printable ASCII: {value!r:.60}")
    return value


def _number(value, what):
    if type(value) is not int:
        raise ValueError(f"{what}: not an integer: {value!r:.60}")
    return value


def _setting(settings, option):
    value = getattr(settings, option)
    if not isinstance(value, str) or not CONFIG_WORD.fullmatch(value):
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


def checked(node):
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


def checked_nodes(nodes):
    """The nodes themselves, once every value of every one is known to be a word or number.

    In bulk: one regex call over all ids and one over all addresses (a job
    can hold 10,000 nodes); a fault is then named by checked().
    """
    if nodes:
        ids, addresses, ports, weights, backups, enabled = zip(*nodes)
        if (not _words(ids) or not _words(addresses) or set(map(type, ports + weights)) != {int}
                or not set(map(type, backups + enabled)) <= {bool}):
            for node in nodes:
                checked(node)
            raise ValueError("a node value is not a single configuration word")
    return nodes


def _words(values):
    """Every value a str and one configuration word (in one regex call)."""
    if set(map(type, values)) != {str}:
        return False
    text = "\n".join(values)
    return CONFIG_WORD_LINES.fullmatch(text) is not None and text.count("\n") == len(values) - 1


def proxy_settings(lb):
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


def _proxy(lb, ids):
    return {**proxy_settings(lb), "servers": checked_nodes(lb.nodes), "ids": ids}


def _server_ids(lb, server_ids):
    """{node id: server id} of `lb`: from plan.server_ids' mapping, else 1, 2, 3, ..."""
    if server_ids is None:
        return {node.id: index for index, node in enumerate(lb.nodes, 1)}
    ids = server_ids[lb.protocol]
    for node in lb.nodes:
        if type(ids[node.id]) is not int or not 0 < ids[node.id] < 2 ** 31:
            raise ValueError(f"node {node.id}: server id {ids[node.id]!r} is not a positive int")
    return ids


def render_config(load_balancers, settings, *, user=None, group=None, server_ids=None) -> str:
    """The whole HAProxy configuration for `load_balancers` (models.LoadBalancer).

    `settings` is a HaproxySettings; `user`/`group`, when given, make HAProxy
    drop privileges after binding.  With `service = system` HAProxy starts
    as root, so it always drops to [worker:haproxy] user/group in its chroot,
    as Debian's own haproxy.cfg does.  `server_ids` is plan.server_ids'
    mapping: each server line names its id (HAProxy's `id`), kept across
    UPDATEs; None numbers each backend's servers from 1.
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
        "load_balancers": [_proxy(lb, _server_ids(lb, server_ids)) for lb in load_balancers],
    }
    return environment().get_template(TEMPLATE).render(context)
