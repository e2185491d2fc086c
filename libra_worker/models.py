"""Typed request objects, validated at the edge.

`parse_update()` turns the JSON of an UPDATE into frozen dataclasses (and
named tuples for nodes) or raises `BadRequest` with one line that names the
offending field.  Every
string kept here has been checked against a narrow alphabet, and every
number is a Python int within its bounds, so the renderer can write them
into the HAProxy configuration as they are: nothing a job says can add a
line, a directive or a comment.

Decisions on how lenient to be with values (field *names* are
case-sensitive; unknown keys are ignored):

* Numbers may be JSON integers or numeric strings.  A numeric string is
  1-10 ASCII digits, optionally surrounded by whitespace, which is
  stripped (" 80" is 80).  Signs, underscores, exponents, non-ASCII digits
  and decimal points are refused ("80.0" as a string is refused).
* A JSON number written with a fraction is accepted only when it is a
  whole number (80.0 is 80): JSON has one number type and some
  serializers write every number as a float.  80.5, NaN and Infinity are
  refused.  Booleans, null, lists and objects are never numbers.
* Values that name something (protocol, algorithm, monitor type) are
  case-insensitive and stored upper-case; surrounding whitespace is
  stripped.
* `monitor: null` means "no monitor" and `options: null` means "default
  options".  Everywhere else null is refused like any other wrong type.
* A CONNECT monitor ignores `path` (it is not checked and not kept).
"""
import ipaddress
import math
import re
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

from libra_worker.errors import BadRequest

PROTOCOLS = ("HTTP", "TCP", "GALERA")
CONDITIONS = ("ENABLED", "DISABLED")
ALGORITHMS = ("ROUND_ROBIN", "LEAST_CONNECTIONS")
MONITOR_TYPES = ("CONNECT", "HTTP")
DEFAULT_HTTP_PORT = 80

MAX_LOAD_BALANCERS = 2
MAX_NODES = 10_000

PORT_RANGE = (1, 65535)
WEIGHT_RANGE = (1, 256)
MONITOR_SECONDS_RANGE = (1, 3600)      # delay and timeout
MONITOR_ATTEMPTS_RANGE = (1, 10)
# What Libra's API accepts (its callers win over any tighter rule): 0 ms is
# HAProxy's "no timeout".
TIMEOUT_MS_RANGE = (0, 1_000_000)      # client/server/connect timeouts
RETRIES_RANGE = (0, 256)

MAX_ECHO = 40            # characters of a bad value quoted back in an error
MAX_NUMBER_TEXT = 64     # longer numeric strings are refused before parsing
MAX_PATH = 2000          # Libra's API limit for a monitor path
MAX_HOSTNAME = 253

_DIGITS = re.compile(r"[0-9]{1,10}")
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# One HAProxy configuration word: printable ASCII without space, '#', quotes,
# backslash and braces (the renderer and the settings check their words with it).
CONFIG_WORD = re.compile(r"[!$%&()*+,\-./0-9:;<=>?@A-Z\[\]^_`a-z|~]+")
# Any printable ASCII but space: the template quotes it for HAProxy, so
# '#', '$', quotes and backslashes reach the back-end as they are.
MONITOR_PATH = re.compile(r"/[\x21-\x7e]*")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_IPV4_CHARS = re.compile(r"[0-9.]+")
# A dotted quad already in canonical form (no leading zeros) is its own normal form.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_CANONICAL = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")
_IPV6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")
# Many node ids or dotted quads, one per line: the usual nodes are checked in one
# regex call per field instead of one per node (a job can hold 10,000 of them).
_NODE_ID_LINES = re.compile(r"[A-Za-z0-9._-]{1,64}(?:\n[A-Za-z0-9._-]{1,64})*")
_IPV4_CANONICAL_LINES = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}(?:\n(?:{_OCTET}\.){{3}}{_OCTET})*")


# --------------------------------------------------------------------------
# The typed request
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Monitor:
    """A health check: CONNECT (TCP connect) or HTTP (GET path)."""
    type: str
    delay: int        # seconds between checks
    timeout: int      # seconds; never more than delay
    attempts: int     # consecutive results that flip a node UP or DOWN
    path: str = "/"   # HTTP only


@dataclass(frozen=True)
class Options:
    """Per load balancer timeouts (milliseconds) and connection retries."""
    client_timeout: int = 30000
    server_timeout: int = 30000
    connect_timeout: int = 30000
    connect_retries: int = 3


class Node(NamedTuple):
    """A back-end server; `id` is also its HAProxy server name.

    A NamedTuple, not a dataclass like the others: a job can hold 10,000 of
    them, and a tuple is built twice as fast and takes a third of the memory.
    """
    id: str
    address: str      # normalized IPv4/IPv6 address, or an RFC 1123 host name
    port: int
    weight: int = 1
    backup: bool = False
    enabled: bool = True  # `condition`: a DISABLED node is configured but takes no traffic

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.address


@dataclass(frozen=True)
class LoadBalancer:
    protocol: str
    port: int
    algorithm: str
    nodes: Tuple[Node, ...]
    monitor: Optional[Monitor] = None
    options: Options = Options()


# --------------------------------------------------------------------------
# Error text
# --------------------------------------------------------------------------

def describe(value):
    """A short, single-line description of a JSON value for an error."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str):
        if len(value) > MAX_ECHO:
            return repr(value[:MAX_ECHO]) + "..."
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 128:          # str() of a huge int is slow
            return "a number too large to show"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a " + type(value).__name__


def _invalid(path, why, value):
    return BadRequest(f"{path}: {why} (got {describe(value)})")


# --------------------------------------------------------------------------
# Field checkers: each returns the typed value or raises BadRequest
# --------------------------------------------------------------------------

def _integer(value, path, bounds):
    low, high = bounds
    number = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and low <= value <= high:
            number = int(value)
    elif isinstance(value, str) and len(value) <= MAX_NUMBER_TEXT:
        text = value.strip()
        if _DIGITS.fullmatch(text):
            number = int(text)
    if number is None or not low <= number <= high:
        raise _invalid(path, f"must be an integer between {low} and {high}", value)
    return number


def _keyword(value, path, choices):
    if isinstance(value, str) and len(value) <= 32:
        word = value.strip().upper()
        if word in choices:
            return word
    raise _invalid(path, "must be one of " + ", ".join(choices), value)


def _boolean(value, path):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value) <= 8:
        word = value.strip().lower()
        if word in ("true", "false"):
            return word == "true"
    raise _invalid(path, "must be true or false", value)


def _node_id(value, path):
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() <= 256:          # a longer number cannot fit 64 chars
            value = str(value)
    if isinstance(value, str) and len(value) <= 64 and _NODE_ID.fullmatch(value):
        return value
    raise _invalid(path, "must be 1-64 letters, digits, '-', '_' or '.'", value)


def _address(value, path):
    """An IPv4 or IPv6 address (normalized) or an RFC 1123 host name."""
    if isinstance(value, str) and 0 < len(value) <= MAX_HOSTNAME:
        if ":" in value:
            if _IPV6_CHARS.fullmatch(value):           # no '%scope', no spaces
                try:
                    return str(ipaddress.IPv6Address(value))
                except ValueError:
                    pass
        elif _IPV4_CANONICAL.fullmatch(value):      # the usual case: no parsing needed
            return value
        elif _IPV4_CHARS.fullmatch(value):
            try:
                return str(ipaddress.IPv4Address(value))
            except ValueError:
                pass
        else:
            labels = value.split(".")
            # An all-numeric last label would let the resolver read "10.1"
            # as an IPv4 address; RFC 3696 rules such names out.
            if (all(_HOST_LABEL.fullmatch(label) for label in labels)
                    and not labels[-1].isdigit()):
                return value
    raise _invalid(path, "must be an IPv4 address, an IPv6 address or a host name", value)


def _http_path(value, path):
    """A health-check path HAProxy can send as it is: '/' then printable ASCII, no space."""
    if isinstance(value, str) and len(value) <= MAX_PATH and MONITOR_PATH.fullmatch(value):
        return value
    raise _invalid(path, f"must start with '/' and be at most {MAX_PATH} printable ASCII "
                         "characters without spaces (an HTTP request line cannot carry others)",
                   value)


def _object(value, path):
    if not isinstance(value, dict):
        raise _invalid(path, "must be an object", value)
    return value


def _list(value, path):
    if not isinstance(value, list):
        raise _invalid(path, "must be a list", value)
    return value


def _require(data, key, missing_text, where):
    """data[key], or BadRequest(missing_text [in where])."""
    if key not in data:
        raise BadRequest(missing_text + (f" in {where}" if where else ""))
    return data[key]


# --------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------

def _parse_monitor(raw, path, where):
    raw = _object(raw, path)
    kind = _keyword(_require(raw, "type", "Missing monitor 'type'", where),
                    f"{path}.type", MONITOR_TYPES)
    numbers = {}
    for key, bounds in (("delay", MONITOR_SECONDS_RANGE),
                        ("timeout", MONITOR_SECONDS_RANGE),
                        ("attempts", MONITOR_ATTEMPTS_RANGE)):
        value = _require(raw, key, f"Missing monitor '{key}'", where)
        numbers[key] = _integer(value, f"{path}.{key}", bounds)
    if numbers["timeout"] > numbers["delay"]:
        raise BadRequest(f"{path}.timeout: must not be more than delay "
                         f"(got timeout {numbers['timeout']}, delay {numbers['delay']})")
    check_path = "/"
    if kind == "HTTP" and "path" in raw:
        check_path = _http_path(raw["path"], f"{path}.path")
    return Monitor(type=kind, path=check_path, **numbers)


def _parse_options(raw, path):
    raw = _object(raw, path)
    values = {}
    for key, bounds in (("client_timeout", TIMEOUT_MS_RANGE),
                        ("server_timeout", TIMEOUT_MS_RANGE),
                        ("connect_timeout", TIMEOUT_MS_RANGE),
                        ("connect_retries", RETRIES_RANGE)):
        if key in raw:
            values[key] = _integer(raw[key], f"{path}.{key}", bounds)
    return Options(**values)


def _parse_node(raw, path, where):
    raw = _object(raw, path)
    node_id = _node_id(_require(raw, "id", "Missing node 'id'", where), f"{path}.id")
    address = _address(_require(raw, "address", "Missing node 'address'", where),
                       f"{path}.address")
    port = _integer(_require(raw, "port", "Missing node 'port'", where),
                    f"{path}.port", PORT_RANGE)
    weight = _integer(raw["weight"], f"{path}.weight", WEIGHT_RANGE) if "weight" in raw else 1
    backup = _boolean(raw["backup"], f"{path}.backup") if "backup" in raw else False
    condition = (_keyword(raw["condition"], f"{path}.condition", CONDITIONS)
                 if raw.get("condition") is not None else "ENABLED")
    return Node(id=node_id, address=address, port=port, weight=weight, backup=backup,
                enabled=condition == "ENABLED")


def _lines_match(pattern, values):
    """Every value a str matching `pattern`'s line form (values joined by newlines)."""
    text = "\n".join(values)  # all str: the caller checked their types
    return pattern.fullmatch(text) is not None and text.count("\n") == len(values) - 1


def _usual_nodes(raw_nodes):
    """The nodes, when every one has the usual shape; else None (then _parse_node names the fault).

    Usual: an object whose id is a string, address a dotted quad as it is
    normally written, port and weight (if any) JSON integers in range, backup
    (if any) true or false, condition absent, null, "ENABLED" or "DISABLED",
    and no id twice.  What it returns is exactly what _parse_node would, but
    without the per-field error paths a 10,000-node UPDATE would otherwise
    spend most of its validation time formatting.
    """
    low_port, high_port = PORT_RANGE
    low_weight, high_weight = WEIGHT_RANGE
    nodes, ids, addresses = [], [], []
    for raw in raw_nodes:
        if type(raw) is not dict:
            return None
        node_id, address, port = raw.get("id"), raw.get("address"), raw.get("port")
        weight, backup, condition = raw.get("weight", 1), raw.get("backup", False), raw.get("condition")
        if (type(node_id) is not str or type(address) is not str or type(port) is not int
                or type(weight) is not int or type(backup) is not bool
                or not low_port <= port <= high_port or not low_weight <= weight <= high_weight):
            return None
        if condition is None or condition == "ENABLED":
            enabled = True
        elif condition == "DISABLED":
            enabled = False
        else:
            return None
        ids.append(node_id)
        addresses.append(address)
        nodes.append(Node(node_id, address, port, weight, backup, enabled))
    if (not _lines_match(_NODE_ID_LINES, ids) or not _lines_match(_IPV4_CANONICAL_LINES, addresses)
            or len(set(ids)) != len(ids)):
        return None
    return nodes


def _parse_nodes(raw_nodes, path, where):
    """Every node checked field by field; BadRequest names the first fault."""
    several = where or len(raw_nodes) > 1
    nodes = []
    seen = {}
    for index, raw_node in enumerate(raw_nodes):
        node_path = f"{path}.nodes[{index}]"
        node = _parse_node(raw_node, node_path, node_path if several else "")
        if node.id in seen:
            raise BadRequest(f"{node_path}.id: duplicate node id {node.id!r} "
                             f"(also {path}.nodes[{seen[node.id]}])")
        seen[node.id] = index
        nodes.append(node)
    return nodes


def _parse_load_balancer(raw, path, where):
    """One load balancer; `where` is its path when the message has several."""
    raw = _object(raw, path)
    protocol = _keyword(_require(raw, "protocol", "Missing 'protocol' element", where),
                        f"{path}.protocol", PROTOCOLS)
    if "port" in raw:
        port = _integer(raw["port"], f"{path}.port", PORT_RANGE)
    elif protocol == "HTTP":
        port = DEFAULT_HTTP_PORT
    else:
        raise BadRequest(f"Missing 'port' element (required for {protocol})"
                         + (f" in {where}" if where else ""))
    algorithm = (_keyword(raw["algorithm"], f"{path}.algorithm", ALGORITHMS)
                 if "algorithm" in raw else "ROUND_ROBIN")

    raw_nodes = _list(_require(raw, "nodes", "Missing 'nodes' element", where),
                      f"{path}.nodes")
    if not raw_nodes:
        raise BadRequest(f"{path}.nodes: at least one node is needed (got an empty list)")
    if len(raw_nodes) > MAX_NODES:
        raise BadRequest(f"{path}.nodes: at most {MAX_NODES} nodes are allowed "
                         f"(got {len(raw_nodes)})")
    nodes = _usual_nodes(raw_nodes)
    if nodes is None:
        nodes = _parse_nodes(raw_nodes, path, where)

    if protocol == "GALERA":
        active = sum(1 for node in nodes if not node.backup)
        if active != 1:
            raise BadRequest(f"{path}.nodes: a GALERA load balancer needs exactly one node "
                             f"that is not backup (got {active})")

    monitor = raw.get("monitor")
    if monitor is not None:
        monitor = _parse_monitor(monitor, f"{path}.monitor", where)
    options = raw.get("options")
    options = Options() if options is None else _parse_options(options, f"{path}.options")
    return LoadBalancer(protocol=protocol, port=port, algorithm=algorithm,
                        nodes=tuple(nodes), monitor=monitor, options=options)


def parse_update(message) -> Tuple[LoadBalancer, ...]:
    """The `loadBalancers` of an UPDATE message → typed load balancers."""
    if not isinstance(message, dict):
        raise BadRequest(f"The request must be a JSON object (got {describe(message)})")
    raw_lbs = _list(_require(message, "loadBalancers", "Missing 'loadBalancers' element", ""),
                    "loadBalancers")
    if not 1 <= len(raw_lbs) <= MAX_LOAD_BALANCERS:
        raise BadRequest(f"loadBalancers: must hold 1 or {MAX_LOAD_BALANCERS} load balancers "
                         f"(got {len(raw_lbs)})")
    several = len(raw_lbs) > 1
    lbs = tuple(_parse_load_balancer(raw, f"loadBalancers[{index}]",
                                     f"loadBalancers[{index}]" if several else "")
                for index, raw in enumerate(raw_lbs))
    if several:
        first, second = lbs
        kinds = sorted((first.protocol, second.protocol), key=lambda p: p != "HTTP")
        if kinds[0] != "HTTP" or kinds[1] == "HTTP":
            raise BadRequest("loadBalancers: two load balancers must be one HTTP and one "
                             f"TCP or GALERA (got {first.protocol} and {second.protocol})")
        if first.port == second.port:
            raise BadRequest(f"loadBalancers[0] ({first.protocol}) and loadBalancers[1] "
                             f"({second.protocol}) both use port {first.port}")
    return lbs
