"""Hostile input, property-based: whatever a job contains, it gets a reply and changes nothing it should not.

Two layers, both seeded (`derandomize=True`: a failure reproduces on every run):

* in-process, fast (most of the examples): payloads go through the real
  `Controller` with a real `HAProxyDriver` (paths in a temp dir); an UPDATE
  that validates is rendered and checked line by line against what the
  template may write, instead of being applied to the device;
* through gearmand to a real `libra_worker` running HAProxy (fewer
  examples): every job gets a well-formed reply within its time-out, the
  worker stays up and logs exactly one line for it; after a FAIL the config
  file is byte-identical and traffic still flows; after a PASS the live
  config passes `haproxy -c` and holds only template lines.

`LIBRA_FUZZ_EXAMPLES` (default 3000) is the total number of examples,
split 35 % / 55 % in-process (arbitrary / mutated) and 7 % / 3 % through
the worker (mutated / arbitrary).  A long run:

    LIBRA_FUZZ_EXAMPLES=100000 .venv/bin/pytest -p no:cacheprovider tests/test_fuzz.py

Also here: a 10 MB payload, and many clients on two job servers at once.
"""
import copy
import json
import os
import threading
import time
import uuid

import gear
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import event as _event
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

from libra_worker import controller as controller_module
from libra_worker import models, settings as settings_module
from libra_worker.controller import MAX_PAYLOAD_BYTES, Controller
from libra_worker.drivers.haproxy import render
from libra_worker.drivers.haproxy.driver import HAProxyDriver
from libra_worker.errors import BadRequest
from support.backends import HttpBackend, TcpEchoBackend
from support.client import GearClient
from support.faults import (SlowHaproxy, TemplateOracle, WorkerLog, cpu_seconds, haproxy_check,
                            job_intervals, rss_kib, strict_json)
from support.gearmand import Gearmand
from support.ports import LOOPBACK, free_port
from support.traffic import http_get, stop_haproxy, tcp_exchange
from support.worker import WorkerProcess, write_config

TOTAL_EXAMPLES = int(os.environ.get("LIBRA_FUZZ_EXAMPLES", "3000"))
IN_PROCESS_ARBITRARY = max(20, TOTAL_EXAMPLES * 35 // 100)
IN_PROCESS_MUTATED = max(20, TOTAL_EXAMPLES * 55 // 100)
WORKER_MUTATED = max(10, TOTAL_EXAMPLES * 7 // 100)
WORKER_ARBITRARY = max(5, TOTAL_EXAMPLES * 3 // 100)

JOB_TIMEOUT = 60.0  # seconds for one job through the worker; 10,000 nodes included

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=list(HealthCheck))

ACTIONS = ("UPDATE", "SUSPEND", "ENABLE", "DELETE", "STATS", "METRICS", "ARCHIVE",
           "DISCOVER", "DIAGNOSTICS")
# Fields the worker writes into a reply; every other field of the request comes back untouched.
WORKER_FIELDS = {"hpcs_response", "hpcs_error", "badRequest", "status", "nodes", "loadBalancers",
                 "utc_start", "utc_end", "version", "release", "gearman", "network"}
TOKEN_FIELD = "hpcs_object_store_token"
HTTP_NAMES = ("fuzz-web-a", "fuzz-web-b")
TCP_NAME = "fuzz-tcp"


# ==========================================================================
# JSON with what the json module will not write: repeated keys, raw literals
# ==========================================================================

class Raw:
    """JSON text sent exactly as written (1e400, NaN, 5000-digit numbers, deep nesting)."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


class Pairs:
    """A JSON object as (key, value) pairs, so that a key can appear twice."""

    def __init__(self, pairs):
        self.pairs = list(pairs)

    def __repr__(self):
        return f"Pairs({self.pairs!r:.200})"


def dumps(value, ensure_ascii=False):
    """JSON text of `value`; Raw and Pairs go in through placeholders (json.dumps is fast)."""
    specials = {}

    def special(item):
        if isinstance(item, Raw):
            text = item.text
        elif isinstance(item, Pairs):
            text = "{" + ", ".join(f"{json.dumps(key, ensure_ascii=ensure_ascii)}: "
                                   f"{dumps(child, ensure_ascii)}" for key, child in item.pairs) + "}"
        else:
            raise TypeError(f"not JSON: {type(item).__name__}")
        marker = f"@@special-{len(specials)}@@"
        specials[json.dumps(marker)] = text
        return marker

    text = json.dumps(value, ensure_ascii=ensure_ascii, default=special)
    for marker, replacement in specials.items():
        text = text.replace(marker, replacement, 1)
    return text


def encode(value):
    try:
        return dumps(value).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only a \\u escape carries it
        return dumps(value, ensure_ascii=True).encode("utf-8")


def event(text):
    """hypothesis.event() that is quiet outside a hypothesis test (the fixed-case tests)."""
    if currently_in_test_context():
        _event(text)


def _reject(name):
    raise ValueError(name)


class Undecidable(Exception):
    """The test's own decoding ran out of stack: expectations about the request are skipped."""


def _finite(literal):
    value = float(literal)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{literal} does not fit a double")
    return value


def lenient_decode(payload):
    """What a JSON library would make of the payload: a value, or None when it is not
    JSON (or holds a number no double can carry: 1e400 would come back as Infinity)."""
    try:
        return json.loads(bytes(payload).decode("utf-8"), parse_constant=_reject, parse_float=_finite)
    except RecursionError:
        raise Undecidable() from None
    except (UnicodeDecodeError, ValueError):
        return None


def depth(value):
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, level + 1) for child in item)
    return deepest


# ==========================================================================
# Strategies
# ==========================================================================

HOSTILE_CHARS = ["\x00", "\u202e", "\u200f", "\u2028", "\r", "\n", "\r\n", "#", "}", "{", '"', "'",
                 "\\", " ", "\t", "\ufeff", "\ud800", "\U0001f600", "\u0301", "%", "$", ";", ":",
                 "/", ".", "-", "_", "a", "Z", "1", "0", "\u0661", "\uff11", "\x7f", "\x1b[2J"]

INJECTIONS = ["\n    server evil 127.0.0.1:1", "\r\nbackend evil", "#", " backup", "}", '"',
              "\n    bind 127.0.0.1:1", "\x00", "\u202e", " weight 256", "\n"]

BIG = 100_000

FIXED_HOSTILE = [
    None, True, False, 0, -1, 1, -80, 65535, 65536, 2 ** 31, 2 ** 63, -(2 ** 63), 2 ** 64 + 1,
    10 ** 100, 10 ** 4000, -(10 ** 4000), 0.0, -0.0, 80.0, 80.5, 1e308, -1e308, 5e-324, 1e-300,
    Raw("1e400"), Raw("-1e400"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1" + "0" * 5000),
    Raw("80E0"), Raw("8.0e1"), Raw("-0"),
    "", " ", "  80  ", "80 ", "0x50", "+80", "-80", "80.0", "1e2", "8_0", "\u0668\u0660",
    "\uff18\uff10", "\u00a080", "80\x00", "true", "True", "TRUE", "yes", "1", "null",
    "a" * BIG, "\u202e" * (BIG // 3), "#" * BIG, "}" * BIG, "\x00" * 1000, "\r\n" * 1000,
    "127.0.0.1", "::1", "localhost", "127.0.0.256", "127.1", "0127.0.0.1", "::ffff:127.0.0.1",
    "fe80::1%eth0", "[::1]", "127.0.0.1:80", "127.0.0.1 ", "LOCALHOST", "local host",
    "/", "/health check", "/#", "/\u00e9", "/?a=b&c", "//", "http://x/",
    "HTTP", "http", " tcp ", "GALERA", "UDP", "ROUND_ROBIN", "round_robin", "LEAST_CONNECTIONS",
    "CONNECT", "connect",
    [], {}, [None], [80], {"port": 80}, [[[]]], {"": ""},
]


def _hostile_text():
    return st.lists(st.sampled_from(HOSTILE_CHARS), max_size=16).map("".join)


def json_leaves():
    return st.one_of(st.none(), st.booleans(), st.integers(),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
                     _hostile_text())


def json_values(max_leaves=20):
    return st.recursive(json_leaves(),
                        lambda children: st.one_of(st.lists(children, max_size=5),
                                                   st.dictionaries(st.text(max_size=12), children,
                                                                   max_size=5)),
                        max_leaves=max_leaves)


def hostile_values():
    return st.one_of(
        st.sampled_from(FIXED_HOSTILE),
        _hostile_text(),
        st.text(max_size=40),
        st.integers(),
        st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.builds(lambda n, kind: Raw(("[" * n + "]" * n) if kind else ('{"a":' * n + "1" + "}" * n)),
                  st.integers(1, 3000), st.booleans()),
        json_values(8),
    )


def action_values():
    return st.one_of(
        st.sampled_from(ACTIONS),
        st.sampled_from([action.lower() for action in ACTIONS] + [action.title() for action in ACTIONS]),
        st.sampled_from(["", " UPDATE", "UPDATE ", "UPDATE\n", "UPDATE\x00", "\uff35PDATE", "ſtats",
                         "dıscover", "UPDATE" * 2000, "DISCOVER\n2099-01-01 00:00:00,000 INFO forged: x",
                         "\u202eETADPU", "STATS\r", "%s%s%n"]),
        hostile_values(),
    )


def arbitrary_payloads():
    """Bytes that may or may not be JSON, objects that may or may not be messages."""
    messages = st.builds(
        lambda action, extra, token: {"hpcs_action": action, **extra, **token},
        action_values(),
        st.dictionaries(st.text(max_size=16), json_values(10), max_size=6),
        st.one_of(st.just({}), st.builds(lambda value: {TOKEN_FIELD: value}, hostile_values())))
    return st.one_of(
        st.binary(max_size=200),
        st.sampled_from([b"", b" ", b"{", b"}", b"null", b"[]", b"{}", b'"x"', b"\xef\xbb\xbf{}",
                         b'{"hpcs_action": "DISCOVER"} trailing', b'{"hpcs_action": "DISCOVER"}\x00',
                         b'{"hpcs_action": NaN}', b'{"hpcs_action": "DISCOVER", "x": Infinity}',
                         b'{"hpcs_action": "DISCOVER", "x": 1e400}',
                         b'{"hpcs_action": "DISCOVER", "x": "\xff\xfe"}',
                         b'{"hpcs_action": "DISCOVER", "x": "\\ud800"}',
                         b'{"hpcs_action": "DISCOVER", "x": ' + b"9" * 5000 + b"}",
                         b'{"hpcs_action": "DISCOVER", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"]),
        json_values(30).map(encode),
        messages.map(encode),
        messages.map(encode),
        messages.map(encode),
    )


# -- valid messages and their mutations ------------------------------------

KEY_VARIANTS = [str.upper, str.lower, str.title, lambda k: k + " ", lambda k: " " + k,
                lambda k: k + "\x00", lambda k: k.replace("_", "-"), lambda k: "\u202e" + k,
                lambda k: k[:-1], lambda k: k + "s"]


def _locations(value):
    """[(container, key)] of every dict entry and list item, depth first; of a long
    list (grown nodes), only its first items and its last."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key in list(item):
                found.append((item, key))
                stack.append(item[key])
        elif isinstance(item, list):
            indexes = range(len(item)) if len(item) <= 20 else [0, 1, 2, len(item) - 1]
            for index in indexes:
                found.append((item, index))
                stack.append(item[index])
    return found


def _dicts(value):
    return [value] + [container[key] for container, key in _locations(value)
                      if isinstance(container[key], dict)]


_PATH_CHARS = "!\"#$%&'()*+,-./0123456789:;<=>?@ABCXYZ[\\]^_`abcxyz{|}~"

# Values a field may validly take, at the edges: mutations that keep a message valid.
EDGE_VALUES = {
    "id": st.one_of(st.text(alphabet="AZaz09._-", min_size=1, max_size=64),
                    st.integers(0, 10 ** 30), st.integers(-(10 ** 6), -1),
                    st.sampled_from(["-", ".", "..", "_", "a" * 64, "0", "-0"])),
    "address": st.sampled_from(["127.0.0.1", "127.0.0.2", "127.255.255.254", "::1",
                                "0:0:0:0:0:0:0:1", "::0001", "localhost"]),
    "port": st.one_of(st.integers(1, 65535), st.integers(1, 65535).map(lambda p: f" {p}\t"),
                      st.integers(1, 65535).map(float), st.sampled_from([1, 65535, "1", "65535"])),
    "weight": st.one_of(st.integers(1, 256), st.sampled_from(["1", " 256 ", 256.0])),
    "backup": st.sampled_from([True, False, "true", "FALSE", " True ", "false"]),
    "protocol": st.sampled_from(["HTTP", "http", " Tcp ", "tcp", "GALERA", "galera"]),
    "algorithm": st.sampled_from(["ROUND_ROBIN", "round_robin", " LEAST_CONNECTIONS ",
                                  "least_connections"]),
    "type": st.sampled_from(["HTTP", "http", "CONNECT", " connect "]),
    "delay": st.integers(1, 3600), "timeout": st.integers(1, 3600), "attempts": st.integers(1, 10),
    "path": st.text(alphabet=_PATH_CHARS, max_size=40).map(lambda tail: "/" + tail),
    "client_timeout": st.integers(0, 1_000_000), "server_timeout": st.integers(0, 1_000_000),
    "connect_timeout": st.integers(0, 1_000_000), "connect_retries": st.integers(0, 256),
    "name": st.one_of(_hostile_text(), st.text(max_size=40)),
    "request_note": st.one_of(_hostile_text(), json_values(8)),
    "monitor": st.none(), "options": st.none(),
}


def _retyped(value):
    if isinstance(value, bool):
        return st.sampled_from([str(value).lower(), int(value), [value], None, str(value).upper()])
    if isinstance(value, int):
        return st.sampled_from([str(value), float(value), [value], {"value": value}, True, None,
                                f" {value} ", f"{value}.0", Raw(f"{value}e0"), -value, value * 10 ** 6])
    if isinstance(value, str):
        return st.sampled_from([len(value), [value], {"value": value}, None, True, value.encode().hex(),
                                value * 2, value.upper(), value + "\n", ""])
    return st.sampled_from([None, "", 0, [value], {"value": value}])


@st.composite
def mutated(draw, bases, closed_port):
    """A valid message from `bases`, changed by 1-3 mutations; returns the message tree."""
    message = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 3))):
        operation = draw(st.sampled_from(["edge", "edge", "edge", "drop", "set", "set", "retype",
                                          "rename", "duplicate", "extra", "inject", "grow_nodes",
                                          "grow_lbs", "action"]))
        spots = _locations(message)
        if operation == "edge":
            fields = [(c, k) for c, k in spots if isinstance(k, str) and k in EDGE_VALUES]
            if fields:
                container, key = draw(st.sampled_from(fields))
                container[key] = draw(EDGE_VALUES[key])
        elif operation == "drop" and spots:
            container, key = draw(st.sampled_from(spots))
            del container[key]
        elif operation == "set" and spots:
            container, key = draw(st.sampled_from(spots))
            container[key] = draw(hostile_values())
        elif operation == "retype" and spots:
            container, key = draw(st.sampled_from(spots))
            container[key] = draw(_retyped(container[key]))
        elif operation == "inject":
            strings = [(c, k) for c, k in spots if isinstance(c[k], str)]
            if strings:
                container, key = draw(st.sampled_from(strings))
                text = draw(st.sampled_from(INJECTIONS))
                container[key] = (text + container[key]) if draw(st.booleans()) else (container[key] + text)
        elif operation in ("rename", "duplicate", "extra"):
            target = draw(st.sampled_from(_dicts(message)))
            if operation == "extra" or not target:
                target[draw(st.text(max_size=16))] = draw(json_values(8))
                continue
            key = draw(st.sampled_from(sorted(target)))
            if operation == "rename":
                target[draw(st.sampled_from(KEY_VARIANTS))(key)] = target.pop(key)
            else:
                # The same key twice in one object: JSON decoders keep the last one.
                pairs = Pairs(target.items())
                second = draw(st.one_of(st.just(copy.deepcopy(target[key])), hostile_values()))
                if draw(st.booleans()):
                    pairs.pairs.append((key, second))          # the duplicate wins
                else:
                    pairs.pairs.insert(0, (key, second))       # the original wins
                _replace(message, target, pairs)
        elif operation == "grow_nodes":
            lbs = [lb for lb in _lbs(message) if isinstance(lb.get("nodes"), list)]
            if lbs:
                lb = draw(st.sampled_from(lbs))
                count = draw(st.sampled_from([50, 1000, 3000, 10_001]))
                lb["nodes"] = lb["nodes"][:1] + [
                    {"id": f"g{index}", "address": LOOPBACK, "port": closed_port, "backup": True}
                    for index in range(count - 1)]
        elif operation == "grow_lbs":
            if isinstance(message.get("loadBalancers"), list) and message["loadBalancers"]:
                first = message["loadBalancers"][0]
                big = isinstance(first, dict) and isinstance(first.get("nodes"), list) \
                    and len(first["nodes"]) > 20
                count = draw(st.sampled_from([3] if big else [3, 5, 50]))
                # The same object `count` times: encoded, they are `count` load balancers.
                message["loadBalancers"] = [first] * count
        elif operation == "action":
            message["hpcs_action"] = draw(action_values())
    return message


def _lbs(message):
    lbs = message.get("loadBalancers") if isinstance(message, dict) else None
    return [lb for lb in lbs if isinstance(lb, dict)] if isinstance(lbs, list) else []


def _replace(root, target, replacement):
    """Put `replacement` where `target` (a dict inside root, or root itself) is."""
    if root is target:
        root.clear()
        root["__pairs__"] = replacement  # unwrapped by _finish()
        return
    for container, key in _locations(root):
        if container[key] is target:
            container[key] = replacement
            return


def _finish(message):
    if isinstance(message, dict) and set(message) == {"__pairs__"}:
        return message["__pairs__"]
    return message


# -- keeping the worker's side effects on loopback and our own ports --------

def _as_port(value):
    """The port a value would validate as, or None."""
    if isinstance(value, Raw):
        try:
            value = json.loads(value.text)
        except (ValueError, RecursionError):
            return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value == value and value not in (float("inf"), float("-inf")) \
            and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() \
            and len(value.strip()) <= 10:
        number = int(value.strip())
    else:
        return None
    return number if 1 <= number <= 65535 else None


def _resolvable(address):
    """True for a string HAProxy would resolve in DNS or connect to off loopback."""
    import ipaddress
    if not isinstance(address, str):
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address.lower() != "localhost" and all(
            part and all(ch.isascii() and (ch.isalnum() or ch == "-") for ch in part)
            for part in address.split("."))
    return not ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None)


def confine(value, ports, context="message"):
    """Make a message safe to apply for real: a load balancer listens only on one of
    our ports, nodes are loopback addresses (never a name to resolve) on the ports
    of our back-ends, no ARCHIVE (it would talk to an object store).  Everything
    else is left as generated."""
    if isinstance(value, Pairs):
        value.pairs = [(key, _confined_entry(key, item, ports, context)) for key, item in value.pairs]
    elif isinstance(value, dict):
        for key in list(value):
            value[key] = _confined_entry(key, value[key], ports, context)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            value[index] = confine(item, ports, context)
    return value


def _confined_entry(key, item, ports, context):
    if key == "address" and _resolvable(item):
        return LOOPBACK
    if key == "port" and _as_port(item) is not None:
        allowed, fallback = ((ports["nodes"], ports["closed"]) if context == "nodes"
                             else (ports["all"], ports["listen"]))
        if _as_port(item) not in allowed:
            return fallback
    if key == "hpcs_action" and isinstance(item, str) and item.upper() == "ARCHIVE":
        return "DISCOVER"
    return confine(item, ports, "nodes" if key == "nodes" else context)


# ==========================================================================
# Checking a reply
# ==========================================================================

def check_reply(payload, reply_bytes):
    """Everything the contract says about any reply; returns (request or None, reply)."""
    try:
        reply = strict_json(reply_bytes)
    except (UnicodeDecodeError, ValueError) as error:
        raise AssertionError(f"the reply is not RFC 8259 JSON ({error}): {reply_bytes[:300]!r}") from None
    assert isinstance(reply, dict), f"the reply is not an object: {reply_bytes[:200]!r}"
    status = reply.get("hpcs_response")
    assert status in ("PASS", "FAIL"), f"hpcs_response is {status!r}"
    if status == "FAIL":
        error = reply.get("hpcs_error")
        assert isinstance(error, str) and error.strip(), f"a FAIL without hpcs_error: {reply_bytes[:300]!r}"
        assert "\n" not in error and "\r" not in error, f"hpcs_error is not one line: {error[:200]!r}"
        assert len(error) <= 2000, f"hpcs_error of {len(error)} characters"
        assert not error.startswith("internal error"), f"the worker crashed on this input: {error}"
    else:
        assert "hpcs_error" not in reply or not reply["hpcs_error"], reply.get("hpcs_error")
    if "badRequest" in reply:
        bad = reply["badRequest"]
        assert status == "FAIL" and isinstance(bad, dict) and bad.get("code") == "400", bad
        assert bad.get("validationErrors", {}).get("message") == reply["hpcs_error"], bad

    if len(payload) > MAX_PAYLOAD_BYTES:   # not read: the contract's "at worst" reply, no echo
        assert status == "FAIL" and reply["hpcs_error"].startswith("payload too large"), reply
        return None, reply
    try:
        request = lenient_decode(payload)
    except Undecidable:
        return None, reply
    if not isinstance(request, dict):
        assert status == "FAIL" and "badRequest" in reply, \
            f"a payload that is not a JSON object got {reply_bytes[:200]!r}"
        return None, reply
    if reply.get("hpcs_error", "").startswith("payload is not valid JSON: nested too deeply"):
        assert depth(request) > 500, f"refused as too deep at depth {depth(request)}"
        return None, reply
    for key, value in request.items():
        if key in WORKER_FIELDS:
            continue
        assert key in reply, f"request field {key[:40]!r} not echoed"
        if key == TOKEN_FIELD:
            assert reply[key] == "*****", f"the token came back as {reply[key]!r:.60}"
        else:
            assert reply[key] == value, f"request field {key[:40]!r} changed in the reply"
    action = request.get("hpcs_action")
    if not (isinstance(action, str) and action.upper() in ACTIONS):
        assert status == "FAIL" and "badRequest" in reply, f"action {action!r:.60} got {status}"
    return request, reply


def expected_node_ids(request):
    return [str(node["id"]) for lb in request["loadBalancers"] for node in lb["nodes"]]


# ==========================================================================
# In-process: the real Controller and driver, no device changes
# ==========================================================================

@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """(controller, settings, oracle) over a real HAProxyDriver whose files are in a temp dir."""
    tmp = tmp_path_factory.mktemp("fuzz-local")
    ini = tmp / "worker.ini"
    write_config(ini, tmp, [f"{LOOPBACK}:{free_port()}"], name="fuzz-local")
    loaded = settings_module.load(["--config", str(ini), "--nodaemon"])
    driver = HAProxyDriver(loaded.haproxy)
    try:
        yield Controller(loaded, driver), loaded, TemplateOracle(loaded.haproxy)
    finally:
        driver.close()
        stop_haproxy(loaded.haproxy.config)


def run_in_process(local, payload):
    """One payload through the in-process controller; UPDATEs that validate are rendered, not applied."""
    controller, loaded, oracle = local
    try:
        request = lenient_decode(payload)
    except Undecidable:
        request = None
    action = request.get("hpcs_action") if isinstance(request, dict) else None
    if isinstance(action, str) and action.upper() == "UPDATE":
        try:
            load_balancers = models.parse_update(request)
        except BadRequest:
            pass
        else:
            text = render.render_config(load_balancers, loaded.haproxy)
            oracle.check(text, expected_node_ids(request))
            event("UPDATE validated: rendered and checked line by line")
            return "rendered"
    if isinstance(action, str) and action.upper() == "ARCHIVE":
        return "skipped"  # would reach for an object store; covered by test_privilege on loopback
    result = controller.handle(bytes(payload))
    assert isinstance(result, controller_module.JobResult)
    check_reply(payload, result.reply_bytes)
    event(f"{result.action if result.action in ACTIONS else '?'} {result.status}")
    return result.status


@settings(FUZZ, max_examples=IN_PROCESS_ARBITRARY)
@given(payload=arbitrary_payloads())
@example(payload=b'{"hpcs_action": "DISCOVER", "x": 1e400}')
@example(payload=b'{"hpcs_action": "DISCOVER", "x": -1e400}')
# Found by this test: a PASS echoed the request's own status fields.
@example(payload=b'{"hpcs_action": "DELETE", "hpcs_error": true}')
@example(payload=b'{"hpcs_action": "DISCOVER", "badRequest": {"code": "400"}, "hpcs_response": "FAIL"}')
@pytest.mark.no_haproxy
def test_in_process_arbitrary_payloads_get_a_well_formed_reply(local, payload):
    run_in_process(local, payload)


def _in_process_bases():
    web = {"id": "a", "address": "127.0.0.1", "port": 8080, "weight": 1}
    return _bases(80, 81, [web, {"id": 102, "address": "::1", "port": "8081", "backup": "false"}],
                  [{"id": "t", "address": "localhost", "port": 9000}])


@settings(FUZZ, max_examples=IN_PROCESS_MUTATED)
@given(data=st.data())
@pytest.mark.no_haproxy
def test_in_process_mutated_updates_fail_cleanly_or_render_only_template_lines(local, data):
    message = _finish(data.draw(mutated(_in_process_bases(), closed_port=1)))
    run_in_process(local, encode(message))


# ==========================================================================
# Through gearmand to the real worker and HAProxy
# ==========================================================================

def _bases(http_port, tcp_port, http_nodes, tcp_nodes):
    """The valid messages mutations start from (HTTP, HTTP+TCP, GALERA, TCP)."""
    monitor = {"type": "HTTP", "delay": 5, "timeout": 2, "attempts": 2, "path": "/"}
    options = {"client_timeout": 30000, "server_timeout": 30000, "connect_timeout": 5000,
               "connect_retries": 3}
    http = {"name": "web", "id": "lb-1", "protocol": "HTTP", "port": http_port,
            "algorithm": "ROUND_ROBIN", "nodes": http_nodes, "monitor": monitor, "options": options}
    tcp = {"protocol": "TCP", "port": str(tcp_port), "algorithm": "LEAST_CONNECTIONS",
           "nodes": tcp_nodes, "monitor": {"type": "CONNECT", "delay": 3, "timeout": 1, "attempts": 1}}
    galera = {"protocol": "GALERA", "port": tcp_port,
              "nodes": [dict(tcp_nodes[0], id="g1"), dict(tcp_nodes[0], id="g2", backup=True)]}
    common = {"hpcs_action": "UPDATE", "request_note": "fuzz \u202e\u00e9", TOKEN_FIELD: "tok-fuzz"}
    return [
        {**common, "loadBalancers": [http]},
        {**common, "loadBalancers": [http, tcp]},
        {**common, "loadBalancers": [galera]},
        {"hpcs_action": "update", "loadBalancers": [tcp]},
    ]


class FuzzDevice:
    """gearmand + libra_worker (service = process, sudo = false) + back-ends + a client."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.web, self.tcp, self.gearmand, self.worker, self.client = [], None, None, None, None
        self.config = None

    def start(self):
        self.web = [HttpBackend(name).start() for name in HTTP_NAMES]
        self.tcp = TcpEchoBackend(TCP_NAME).start()
        self.gearmand = Gearmand(self.tmp / "gearmand").start()
        self.worker = WorkerProcess(self.tmp / "worker", [self.gearmand],
                                    name=f"fuzz-{uuid.uuid4().hex[:8]}")
        loaded = settings_module.load(["--config", str(self.worker.config_path), "--nodaemon"])
        self.settings = loaded.haproxy
        self.config = self.settings.config
        self.oracle = TemplateOracle(self.settings)
        self.worker.start()
        self.worker.wait_registered()
        self.client = GearClient([self.gearmand])
        self.log = WorkerLog(self.worker.logfile)
        http_port, tcp_port, spare = free_port(), free_port(), free_port()
        self.closed_port = free_port()
        self.ports = {"all": {http_port, tcp_port, spare}, "listen": spare,
                      "http": http_port, "tcp": tcp_port, "closed": self.closed_port,
                      "nodes": {self.closed_port, self.tcp.port, *(b.port for b in self.web)}}
        http_nodes = [{"id": "a", "address": LOOPBACK, "port": self.web[0].port, "weight": "2"},
                      {"id": 102, "address": LOOPBACK, "port": str(self.web[1].port), "backup": False}]
        tcp_nodes = [{"id": "t", "address": LOOPBACK, "port": self.tcp.port}]
        self.bases = _bases(http_port, tcp_port, http_nodes, tcp_nodes)
        self.serving = self.bases[1]  # HTTP + TCP: the state every example starts from
        self.log.skip_to_end()
        self.apply_serving()
        self.serving_config = self.config_bytes()
        return self

    def submit(self, payload, unique=None):
        job = gear.Job(self.worker.name.encode(), payload, unique=unique)
        job.disconnected = False
        # GearClient.send() takes no unique id; the underlying gear client does.
        self.client._client.submitJob(job, timeout=JOB_TIMEOUT)
        return self.client.wait(job, JOB_TIMEOUT, alive=self.worker.alive)

    def apply_serving(self):
        began = time.monotonic()
        reply = json.loads(self.submit(encode(self.serving)))
        self.last_apply_seconds = time.monotonic() - began
        assert reply["hpcs_response"] == "PASS", f"the serving config did not apply: {reply}"
        self.log.wait_job_lines(1)
        self.assert_traffic()

    def config_bytes(self):
        with open(self.config, "rb") as stream:
            return stream.read()

    def assert_traffic(self):
        response = http_get(self.ports["http"])
        assert response.status == 200 and response.backend in HTTP_NAMES, response
        banner, echoed = tcp_exchange(self.ports["tcp"], b"ping")
        assert banner == TCP_NAME and echoed == b"ping", (banner, echoed)

    def stop(self):
        steps = [self.client and self.client.close, self.worker and self.worker.stop,
                 self.config and (lambda: stop_haproxy(self.config)), self.gearmand and self.gearmand.stop,
                 self.tcp and self.tcp.stop, *(backend.stop for backend in self.web)]
        for step in steps:
            try:
                if step:
                    step()
            except Exception as error:  # keep stopping the rest
                print(f"teardown: {error!r}")


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    dev = FuzzDevice(tmp_path_factory.mktemp("fuzz-worker"))
    try:
        yield dev.start()
    finally:
        dev.stop()


def through_worker(device, payload, unique=None):
    """Send one payload and check every promise about what it leaves behind."""
    before = device.config_bytes()
    raw = device.submit(payload, unique)
    request, reply = check_reply(payload, raw)
    assert device.worker.alive(), f"the worker died: {device.worker.diagnosis()}"
    device.log.wait_job_lines(1)
    action = None
    if isinstance(request, dict) and isinstance(request.get("hpcs_action"), str):
        action = request["hpcs_action"].upper()
    event(f"{action if action in ACTIONS else '?'} {reply['hpcs_response']}")
    if reply["hpcs_response"] == "FAIL":
        assert device.config_bytes() == before, "a FAIL changed the config file"
        device.assert_traffic()
        return reply
    if action == "UPDATE":
        for lb in reply["loadBalancers"]:
            assert all(node.get("condition") == "ENABLED" for node in lb["nodes"]), "a node not ENABLED"
        check = haproxy_check(device.config)
        assert check.returncode == 0, f"the live config fails haproxy -c: {check.stderr[-500:]}"
        device.oracle.check(device.config_bytes().decode("utf-8"), expected_node_ids(request))
        # and HAProxy runs what the file says
        stats = strict_json(device.submit(b'{"hpcs_action": "STATS"}'))
        device.log.wait_job_lines(1)
        assert stats["hpcs_response"] == "PASS", stats
        assert sorted(entry["id"] for entry in stats["nodes"]) == sorted(expected_node_ids(request))
    if action in ("UPDATE", "SUSPEND", "DELETE", "ENABLE"):
        device.apply_serving()
        assert device.config_bytes() == device.serving_config, "the same UPDATE rendered differently"
    else:
        assert device.config_bytes() == before, f"{action} changed the config file"
        device.assert_traffic()
    return reply


@settings(FUZZ, max_examples=WORKER_MUTATED)
@given(data=st.data())
def test_worker_mutated_updates(device, data):
    message = _finish(data.draw(mutated(device.bases, device.closed_port)))
    confine(message, device.ports)
    through_worker(device, encode(message))


@settings(FUZZ, max_examples=WORKER_ARBITRARY)
@given(payload=arbitrary_payloads(),
       unique=st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_characters="\x00",
                                                                  blacklist_categories=("Cs",)),
                                           min_size=1, max_size=15).map(str.encode)))
@example(payload=b'{"hpcs_action": "DISCOVER"}', unique=b"u\n2099-01-01 00:00:00,000 INFO forged: line")
@example(payload=b'{"hpcs_action": "DISCOVER\\nforged"}', unique=None)
def test_worker_arbitrary_payloads(device, payload, unique):
    message = lenient_or_none(payload)
    if isinstance(message, dict):
        payload = encode(confine(message, device.ports))
    through_worker(device, payload, unique)


def lenient_or_none(payload):
    try:
        return lenient_decode(payload)
    except Undecidable:
        return None


def test_thousands_of_nodes_and_many_load_balancers(device):
    """The big cases on their own, so they run whatever the example count."""
    if device.config_bytes() != device.serving_config:
        device.apply_serving()
    message = copy.deepcopy(device.serving)
    message["loadBalancers"][0]["nodes"] = message["loadBalancers"][0]["nodes"] + [
        {"id": f"n{index}", "address": LOOPBACK, "port": device.closed_port, "backup": True}
        for index in range(2998)]
    began = time.monotonic()
    raw = device.submit(encode(message))
    grow = time.monotonic() - began
    device.log.wait_job_lines(1)
    assert strict_json(raw)["hpcs_response"] == "PASS", raw[:300]
    device.apply_serving()  # back to 3 nodes
    assert device.last_apply_seconds < 10 * grow + 2.0, (
        f"going from 3,000 nodes back to 3 took {device.last_apply_seconds:.1f}s; "
        f"the 3,000-node UPDATE took {grow:.1f}s")
    reply = through_worker(device, encode(message))
    assert reply["hpcs_response"] == "PASS", reply.get("hpcs_error")

    message["loadBalancers"][0]["nodes"].extend(
        {"id": f"m{index}", "address": LOOPBACK, "port": device.closed_port}
        for index in range(models.MAX_NODES))
    reply = through_worker(device, encode(message))
    assert reply["hpcs_response"] == "FAIL" and "nodes" in reply["hpcs_error"]

    many = dict(device.serving, loadBalancers=[copy.deepcopy(device.serving["loadBalancers"][0])
                                               for _ in range(100)])
    reply = through_worker(device, encode(many))
    assert reply["hpcs_response"] == "FAIL" and "loadBalancers" in reply["hpcs_error"]


# ==========================================================================
# A 10 MB payload
# ==========================================================================

def test_ten_megabyte_payloads_fail_cheaply_without_growing_the_worker(device):
    """FAIL 'too large', in bounded memory and in a fraction of a second of the worker's CPU
    (reading a 10 MB packet 4 KiB at a time into a growing bytes buffer costs seconds)."""
    if device.config_bytes() != device.serving_config:
        device.apply_serving()
    baseline = rss_kib(device.worker.pid)
    samples = []
    payload = b'{"hpcs_action": "UPDATE", "padding": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    for round_number in range(8):
        cpu_before = cpu_seconds(device.worker.pid)
        raw = device.submit(payload)
        cpu = cpu_seconds(device.worker.pid) - cpu_before
        reply = strict_json(raw)
        assert reply["hpcs_response"] == "FAIL", reply
        assert "too large" in reply["hpcs_error"], reply["hpcs_error"]
        assert len(raw) < 4096, "the reply must not carry the payload back"
        device.log.wait_job_lines(1)
        samples.append(rss_kib(device.worker.pid))
        assert cpu < 2.0, f"the worker spent {cpu:.2f}s of CPU on 10 MB payload #{round_number + 1}"
        assert device.config_bytes() == device.serving_config
    device.assert_traffic()
    reply = json.loads(device.submit(b'{"hpcs_action": "DISCOVER"}'))
    assert reply["hpcs_response"] == "PASS"
    device.log.wait_job_lines(1)
    # Bounded: no job keeps its 10 MB (8 payloads would add 80 MB).
    assert max(samples) < baseline + 64 * 1024, f"RSS {samples} KiB from {baseline} KiB"


# ==========================================================================
# Many clients, two job servers, one device
# ==========================================================================

def test_many_clients_on_two_job_servers_are_served_one_at_a_time(tmp_path, gearmand, worker):
    web = [HttpBackend(name).start() for name in HTTP_NAMES]
    second = Gearmand(tmp_path / "gearmand-2").start()
    slow = SlowHaproxy(tmp_path / "slow", delay=0.1)
    port = free_port()
    process = None
    try:
        process = worker(servers=[gearmand, second],
                         extra_ini={"worker:haproxy": {"haproxy": str(slow.path)}})
        log = WorkerLog(process.logfile)
        log.skip_to_end()
        threads_per_server, jobs_per_thread = 3, 6
        results, errors = [], []

        def client_thread(server, thread_index):
            try:
                with GearClient([server]) as client:
                    for job_index in range(jobs_per_thread):
                        request_id = f"{thread_index}-{job_index}-{uuid.uuid4().hex[:6]}"
                        if job_index % 2 == 0:
                            # A client timeout of its own: every UPDATE reloads, with a haproxy -c
                            # (on HAProxy 3.0 new HTTP nodes alone would be added at run time).
                            message = {"hpcs_action": "UPDATE", "request_id": request_id,
                                       "loadBalancers": [{"protocol": "HTTP", "port": port, "nodes": [
                                           {"id": f"r{request_id}-{index}", "address": LOOPBACK, "port": b.port}
                                           for index, b in enumerate(web)],
                                           "options": {"client_timeout": 30000 + 100 * thread_index
                                                       + job_index}}]}
                        else:
                            message = {"hpcs_action": ("DISCOVER", "METRICS")[job_index % 4 // 2],
                                       "request_id": request_id}
                        reply = client.submit(process.name, message, timeout=JOB_TIMEOUT,
                                              alive=process.alive)
                        results.append((message, reply))
            except Exception as error:  # reported by the main thread
                errors.append(f"client {thread_index} on {server.address}: {error!r}")

        threads = [threading.Thread(target=client_thread, args=(server, index))
                   for index, server in enumerate([gearmand, second] * threads_per_server)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOB_TIMEOUT * 2)
        assert not errors, errors
        total = len(threads) * jobs_per_thread
        assert len(results) == total

        updates = 0
        for message, reply in results:
            assert reply["hpcs_response"] == "PASS", reply
            assert reply["request_id"] == message["request_id"], "a reply went to the wrong request"
            assert reply["hpcs_action"] == message["hpcs_action"]
            if message["hpcs_action"] == "UPDATE":
                updates += 1
                assert [node["id"] for node in reply["loadBalancers"][0]["nodes"]] == \
                    [node["id"] for node in message["loadBalancers"][0]["nodes"]]

        assert slow.overlaps == 0, f"{slow.overlaps} haproxy -c checks ran while another one did"
        assert slow.checks == updates
        _, job_lines = log.wait_job_lines(total)
        intervals = job_intervals(job_lines)
        for (start, end), (next_start, next_end) in zip(intervals, intervals[1:]):
            assert next_start >= end - 0.005, \
                f"two jobs overlapped: {start:.3f}-{end:.3f} and {next_start:.3f}-{next_end:.3f}"

        # The device runs the config of the last UPDATE applied, and STATS agrees with the file.
        stats = GearClient([gearmand])
        try:
            reply = stats.submit(process.name, {"hpcs_action": "STATS"}, timeout=JOB_TIMEOUT)
        finally:
            stats.close()
        assert reply["hpcs_response"] == "PASS", reply
        with open(process.sections["worker:haproxy"]["config"]) as stream:
            text = stream.read()
        in_file = sorted(server_id for server_id, _ in TemplateOracle(
            settings_module.load(["--config", str(process.config_path), "--nodaemon"]).haproxy).servers(text))
        assert sorted(node["id"] for node in reply["nodes"]) == in_file
        assert http_get(port).backend in HTTP_NAMES
    finally:
        if process is not None:
            process.stop()
            stop_haproxy(process.sections["worker:haproxy"]["config"])
        second.stop()
        for backend in web:
            backend.stop()
