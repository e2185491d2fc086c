"""UPDATEs that must fail, and what a failure must leave behind.

One device and one valid HTTP load balancer serve the whole module.  Each
invalid message must FAIL with an `hpcs_error` that names the field and a
`badRequest`; afterwards the HAProxy config file is byte-identical and the
load balancer still serves.  Then a config that validates but that HAProxy
cannot run (a port already taken) must FAIL with HAProxy's own words and
leave the previous configuration serving.
"""
import copy
import re
import socket

import pytest

from support.backends import HttpBackend
from support.ports import LOOPBACK, free_port
from support.device import Device
from support.traffic import backend_counts, http_get, lb, update

BACKEND_NAMES = ("inv-a", "inv-b")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(device, lb_port, base message) with the base message applied and serving."""
    web = [HttpBackend(name).start() for name in BACKEND_NAMES]
    dev = Device(tmp_path_factory.mktemp("inv"))
    try:
        dev.start()
        port = free_port()
        base = update(lb("HTTP", port, [
            {"id": "a", "address": web[0].host, "port": web[0].port, "weight": 1},
            {"id": "b", "address": web[1].host, "port": web[1].port, "backup": False},
        ], algorithm="ROUND_ROBIN",
            monitor={"type": "HTTP", "delay": 5, "timeout": 2, "attempts": 2, "path": "/"},
            options={"client_timeout": 30000, "server_timeout": 30000,
                     "connect_timeout": 5000, "connect_retries": 3}))
        dev.must_pass(base)
        assert set(backend_counts(port, 4)) == set(BACKEND_NAMES)
        yield dev, port, base
    finally:
        dev.stop()
        for backend in web:
            backend.stop()


# --------------------------------------------------------------------------
# The table: (case id, mutation of the base message, regex the error must match)
# --------------------------------------------------------------------------

def _lb(message):
    return message["loadBalancers"][0]


def _node(message, index=0):
    return _lb(message)["nodes"][index]


def set_lb(key, value):
    return lambda m: _lb(m).__setitem__(key, value)


def drop_lb(key):
    return lambda m: _lb(m).pop(key)


def set_node(key, value, index=0):
    return lambda m: _node(m, index).__setitem__(key, value)


def drop_node(key, index=0):
    return lambda m: _node(m, index).pop(key)


def set_monitor(key, value):
    return lambda m: _lb(m)["monitor"].__setitem__(key, value)


def drop_monitor(key):
    return lambda m: _lb(m)["monitor"].pop(key)


def set_option(key, value):
    return lambda m: _lb(m)["options"].__setitem__(key, value)


def set_top(key, value):
    return lambda m: m.__setitem__(key, value)


def drop_top(key):
    return lambda m: m.pop(key)


def _second_lb(protocol, port_offset=1, **fields):
    def mutate(m):
        first = _lb(m)
        m["loadBalancers"].append(dict(copy.deepcopy(first), protocol=protocol,
                                       port=first["port"] + port_offset if port_offset else first["port"],
                                       **fields))
    return mutate


def _galera(actives):
    def mutate(m):
        one = _lb(m)
        one["protocol"] = "GALERA"
        for index, node in enumerate(one["nodes"]):
            node["backup"] = index >= actives
    return mutate


def _duplicate_ids(m):
    _node(m, 1)["id"] = _node(m, 0)["id"]


LB_PORT = r"\bport\b"
NODE_ID = r"\bid\b"
NODE_ADDRESS = r"\baddress\b"
NODE_PORT = r"node.*\bport\b|\bport\b.*node"
MONITOR_PATH = r"\bpath\b"

INJECTIONS = {
    "newline": "x\n    server evil 127.0.0.1:1",
    "hash": "x#comment",
    "space": "x y",
    "brace": "x}",
    "crlf": "x\r\nbackend evil",
}

CASES = [
    # the message and its load balancer list
    ("no-loadBalancers", drop_top("loadBalancers"), r"loadBalancers"),
    ("loadBalancers-object", set_top("loadBalancers", {"protocol": "HTTP"}), r"loadBalancers"),
    ("loadBalancers-string", set_top("loadBalancers", "HTTP"), r"loadBalancers"),
    ("loadBalancers-empty", set_top("loadBalancers", []), r"loadBalancers"),
    ("loadBalancers-three", lambda m: m["loadBalancers"].extend([copy.deepcopy(_lb(m))] * 2),
     r"loadBalancers"),
    ("lb-not-object", set_top("loadBalancers", ["HTTP"]), r"loadBalancers"),
    ("two-http", _second_lb("HTTP"), r"protocol|HTTP"),
    ("http-tcp-same-port", _second_lb("TCP", port_offset=0), LB_PORT),
    # protocol
    ("no-protocol", drop_lb("protocol"), r"protocol"),
    ("protocol-unknown", set_lb("protocol", "UDP"), r"protocol"),
    ("protocol-number", set_lb("protocol", 80), r"protocol"),
    ("protocol-null", set_lb("protocol", None), r"protocol"),
    ("tcp-without-port", lambda m: (drop_lb("port")(m), set_lb("protocol", "TCP")(m)), LB_PORT),
    # load balancer port
    ("port-zero", set_lb("port", 0), LB_PORT),
    ("port-too-big", set_lb("port", 65536), LB_PORT),
    ("port-negative", set_lb("port", -80), LB_PORT),
    ("port-text", set_lb("port", "eighty"), LB_PORT),
    ("port-fraction", set_lb("port", 80.5), LB_PORT),
    ("port-bool", set_lb("port", True), LB_PORT),
    ("port-list", set_lb("port", [80]), LB_PORT),
    ("port-injection", set_lb("port", "80\n    bind :1"), LB_PORT),
    # algorithm
    ("algorithm-unknown", set_lb("algorithm", "RANDOM"), r"algorithm"),
    ("algorithm-number", set_lb("algorithm", 1), r"algorithm"),
    ("algorithm-injection", set_lb("algorithm", "ROUND_ROBIN\nbalance source"), r"algorithm"),
    # nodes
    ("no-nodes", drop_lb("nodes"), r"nodes"),
    ("nodes-empty", set_lb("nodes", []), r"nodes"),
    ("nodes-object", set_lb("nodes", {"id": "a"}), r"nodes"),
    ("node-not-object", set_lb("nodes", ["10.0.0.1:80"]), r"nodes"),
    ("duplicate-node-ids", _duplicate_ids, NODE_ID),
    # node id
    ("no-node-id", drop_node("id"), NODE_ID),
    ("node-id-empty", set_node("id", ""), NODE_ID),
    ("node-id-null", set_node("id", None), NODE_ID),
    ("node-id-list", set_node("id", ["a"]), NODE_ID),
    ("node-id-too-long", set_node("id", "n" * 65), NODE_ID),
    *[(f"node-id-{kind}", set_node("id", text), NODE_ID) for kind, text in INJECTIONS.items()],
    # node address
    ("no-node-address", drop_node("address"), NODE_ADDRESS),
    ("node-address-empty", set_node("address", ""), NODE_ADDRESS),
    ("node-address-number", set_node("address", 2130706433), NODE_ADDRESS),
    ("node-address-bad-ip", set_node("address", "127.0.0.256"), NODE_ADDRESS),
    ("node-address-with-port", set_node("address", "127.0.0.1:80"), NODE_ADDRESS),
    *[(f"node-address-{kind}", set_node("address", "127.0.0.1" + text[1:]), NODE_ADDRESS)
      for kind, text in INJECTIONS.items()],
    # node port, weight, backup
    ("no-node-port", drop_node("port"), NODE_PORT),
    ("node-port-zero", set_node("port", 0), NODE_PORT),
    ("node-port-too-big", set_node("port", 70000), NODE_PORT),
    ("node-port-text", set_node("port", "8O"), NODE_PORT),
    ("node-port-null", set_node("port", None), NODE_PORT),
    ("node-port-injection", set_node("port", "80 backup"), NODE_PORT),
    ("weight-zero", set_node("weight", 0), r"weight"),
    ("weight-too-big", set_node("weight", 257), r"weight"),
    ("weight-text", set_node("weight", "heavy"), r"weight"),
    ("weight-injection", set_node("weight", "1 backup"), r"weight"),
    ("backup-maybe", set_node("backup", "maybe"), r"backup"),
    ("backup-number", set_node("backup", 2), r"backup"),
    # monitor
    ("monitor-string", set_lb("monitor", "HTTP"), r"monitor"),
    ("no-monitor-type", drop_monitor("type"), r"type"),
    ("monitor-type-unknown", set_monitor("type", "PING"), r"type"),
    ("no-monitor-delay", drop_monitor("delay"), r"delay"),
    ("monitor-delay-zero", set_monitor("delay", 0), r"delay"),
    ("monitor-delay-text", set_monitor("delay", "soon"), r"delay"),
    ("monitor-timeout-above-delay", set_monitor("timeout", 9), r"timeout"),
    ("monitor-timeout-zero", set_monitor("timeout", 0), r"timeout"),
    ("monitor-attempts-zero", set_monitor("attempts", 0), r"attempts"),
    ("monitor-attempts-bool", set_monitor("attempts", False), r"attempts"),
    ("monitor-path-relative", set_monitor("path", "health"), MONITOR_PATH),
    ("monitor-path-number", set_monitor("path", 7), MONITOR_PATH),
    # '#' and braces are path characters Libra's API lets through: quoted, not refused.
    *[(f"monitor-path-{kind}", set_monitor("path", "/" + text), MONITOR_PATH)
      for kind, text in INJECTIONS.items() if kind not in ("hash", "brace")],
    # options
    ("options-string", set_lb("options", "fast"), r"options"),
    ("client-timeout-above-api", set_option("client_timeout", 1_000_001), r"client_timeout"),
    ("server-timeout-text", set_option("server_timeout", "long"), r"server_timeout"),
    ("connect-timeout-negative", set_option("connect_timeout", -1), r"connect_timeout"),
    ("connect-retries-negative", set_option("connect_retries", -1), r"connect_retries"),
    ("connect-retries-injection", set_option("connect_retries", "3\n    retries 0"), r"connect_retries"),
    # GALERA: exactly one node that is not backup
    ("galera-two-active", _galera(actives=2), r"backup|GALERA"),
    ("galera-no-active", _galera(actives=0), r"backup|GALERA"),
]


def test_the_table_has_unique_case_ids():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("mutate,pattern", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_invalid_update_fails_and_changes_nothing(setup, mutate, pattern):
    device, port, base = setup
    message = copy.deepcopy(base)
    mutate(message)
    before = device.config_bytes()

    reply = device.submit(message)

    assert reply.get("hpcs_response") == "FAIL", reply
    error = reply.get("hpcs_error")
    assert isinstance(error, str) and error and "\n" not in error
    assert re.search(pattern, error, re.I), f"{error!r} does not name the field (/{pattern}/)"
    bad_request = reply.get("badRequest")
    assert isinstance(bad_request, dict), reply
    assert bad_request.get("code") == "400"
    assert bad_request.get("validationErrors", {}).get("message") == error
    assert device.config_bytes() == before
    assert http_get(port).backend in BACKEND_NAMES


def test_ids_and_names_of_a_load_balancer_never_reach_the_config(setup):
    """`id` and `name` are echoed back, never written into the config as given."""
    device, port, base = setup
    message = copy.deepcopy(base)
    hostile = "lb\n    bind 127.0.0.1:1\n# evil } {"
    _lb(message)["id"] = hostile
    _lb(message)["name"] = hostile

    reply = device.must_pass(message)

    assert _lb(reply)["id"] == hostile and _lb(reply)["name"] == hostile
    text = device.config_bytes().decode()
    assert "evil" not in text and "127.0.0.1:1\n" not in text
    assert http_get(port).backend in BACKEND_NAMES


def test_config_haproxy_refuses_restores_the_previous_one(setup, tmp_path):
    """A TCP LB on a port a plain socket holds validates but cannot bind: FAIL, old config serving."""
    device, port, base = setup
    device.must_pass(base)
    before = device.config_bytes()
    masters = device.masters()
    assert len(masters) == 1

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen(8)
        taken = squatter.getsockname()[1]
        message = copy.deepcopy(base)
        message["loadBalancers"].append(
            {"protocol": "TCP", "port": taken,
             "nodes": [{"id": "t", "address": LOOPBACK, "port": free_port()}]})

        reply = device.submit(message)

        assert reply.get("hpcs_response") == "FAIL", reply
        assert device.config_bytes() == before
        assert set(backend_counts(port, 4)) == set(BACKEND_NAMES)
        assert device.masters() == masters
        assert "badRequest" not in reply, "HAProxy's refusal is not a malformed request"
        # HAProxy 2.6 says: "... cannot bind socket (Address already in use) for [127.0.0.1:<port>]"
        error = reply.get("hpcs_error", "")
        assert re.search(r"bind|address already in use", error, re.I), error

    # Still in a state where a good UPDATE goes through.
    device.must_pass(base)
    assert http_get(port).backend in BACKEND_NAMES
    assert len(device.masters()) == 1, device.masters()
