"""libra_worker.models: JSON of an UPDATE → typed load balancers or BadRequest."""
import copy
import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libra_worker import models
from libra_worker.errors import BadRequest
from libra_worker.models import (LoadBalancer, Monitor, Node, Options, MAX_NODES,
                                 parse_update)

# scripts/test runs these once, where HAProxy cannot run (scripts/without-haproxy).
pytestmark = pytest.mark.no_haproxy


def http_lb(**extra):
    lb = {"protocol": "HTTP", "port": 8080,
          "nodes": [{"id": "101", "address": "10.0.0.1", "port": 80}]}
    lb.update(extra)
    return lb


def tcp_lb(**extra):
    lb = {"protocol": "TCP", "port": 3000,
          "nodes": [{"id": "201", "address": "10.0.0.2", "port": 3000}]}
    lb.update(extra)
    return lb


def monitor(**extra):
    mon = {"type": "HTTP", "delay": 10, "timeout": 5, "attempts": 3, "path": "/health"}
    mon.update(extra)
    return mon


def update(*lbs):
    return {"hpcs_action": "UPDATE", "loadBalancers": list(lbs)}


def with_node(**fields):
    """A one-node HTTP message whose node has `fields` (None value → key removed)."""
    node = {"id": "101", "address": "10.0.0.1", "port": 80}
    for key, value in fields.items():
        if value is _DROP:
            node.pop(key)
        else:
            node[key] = value
    return update(http_lb(nodes=[node]))


_DROP = object()


def parse_error(message):
    with pytest.raises(BadRequest) as caught:
        parse_update(message)
    text = str(caught.value)
    assert "\n" not in text and "\r" not in text, text
    assert len(text) < 300, text
    return text


# --------------------------------------------------------------------------
# Invalid messages: (message, text the error must contain)
# --------------------------------------------------------------------------

HUGE = 10 ** 400
LONG = "9" * 100_000

BAD_INTEGERS = [0, -1, 65536, "70000", "", " ", "80.5", 80.5, "80.0", True, False, None,
                [], {}, [80], "-1", "+80", "8 0", "0x50", "1e3", "1_000", "\uff18\uff10",
                "٨٠", float("nan"), float("inf"), 1e300, HUGE, LONG]

INVALID = []


def case(name, message, expected):
    INVALID.append(pytest.param(message, expected, id=name))


# the message and its list of load balancers
case("not-an-object", [], "The request must be a JSON object")
case("no-loadBalancers", {"hpcs_action": "UPDATE"}, "Missing 'loadBalancers' element")
case("loadBalancers-wrong-case", {"LoadBalancers": [http_lb()]},
     "Missing 'loadBalancers' element")
case("loadBalancers-object", {"loadBalancers": http_lb()}, "loadBalancers: must be a list")
case("loadBalancers-string", {"loadBalancers": "HTTP"}, "loadBalancers: must be a list")
case("loadBalancers-null", {"loadBalancers": None}, "loadBalancers: must be a list (got null)")
case("loadBalancers-empty", update(), "loadBalancers: must hold 1 or 2 load balancers (got 0)")
case("three-lbs", update(http_lb(), tcp_lb(), tcp_lb(port=3001)),
     "loadBalancers: must hold 1 or 2 load balancers (got 3)")
case("lb-not-object", update("HTTP"), "loadBalancers[0]: must be an object (got 'HTTP')")
case("lb-list", update([http_lb()]), "loadBalancers[0]: must be an object (got a list)")
case("two-http", update(http_lb(), http_lb(port=8081)),
     "two load balancers must be one HTTP and one TCP or GALERA (got HTTP and HTTP)")
case("two-tcp", update(tcp_lb(), tcp_lb(port=3001)), "(got TCP and TCP)")
case("tcp-and-galera", update(tcp_lb(), tcp_lb(protocol="GALERA", port=3306)),
     "(got TCP and GALERA)")
case("same-port", update(http_lb(port="3000"), tcp_lb()),
     "loadBalancers[0] (HTTP) and loadBalancers[1] (TCP) both use port 3000")
case("same-port-default-80", update({k: v for k, v in http_lb().items() if k != "port"},
                                    tcp_lb(port=80)),
     "both use port 80")

# load balancer fields
case("no-protocol", update({"port": 80, "nodes": []}), "Missing 'protocol' element")
case("no-protocol-second", update(http_lb(), {"port": 3000, "nodes": []}),
     "Missing 'protocol' element in loadBalancers[1]")
case("Protocol-wrong-case-name", update({"Protocol": "HTTP", "nodes": []}),
     "Missing 'protocol' element")
for bad in ["FTP", "", "HTTPS", 5, None, ["HTTP"], "HTTP\n"[:-1] + "\nX", "x" * 1000]:
    case(f"protocol={bad!r:.20}", update(http_lb(protocol=bad)),
         "loadBalancers[0].protocol: must be one of HTTP, TCP, GALERA")
case("tcp-no-port", update({"protocol": "TCP", "nodes": []}),
     "Missing 'port' element (required for TCP)")
case("galera-no-port", update(http_lb(), {"protocol": "galera", "nodes": []}),
     "Missing 'port' element (required for GALERA) in loadBalancers[1]")
for bad in BAD_INTEGERS:
    case(f"lb-port={bad!r:.20}", update(http_lb(port=bad)),
         "loadBalancers[0].port: must be an integer between 1 and 65535")
for bad in ["RANDOM", "", 1, None, "ROUND ROBIN"]:
    case(f"algorithm={bad!r:.20}", update(http_lb(algorithm=bad)),
         "loadBalancers[0].algorithm: must be one of ROUND_ROBIN, LEAST_CONNECTIONS")

# nodes list
case("no-nodes", update({"protocol": "HTTP"}), "Missing 'nodes' element")
case("no-nodes-second", update(http_lb(), {"protocol": "TCP", "port": 3000}),
     "Missing 'nodes' element in loadBalancers[1]")
case("Nodes-wrong-case", update({"protocol": "HTTP", "Nodes": []}), "Missing 'nodes' element")
case("nodes-object", update(http_lb(nodes={"id": "1"})), "loadBalancers[0].nodes: must be a list")
case("nodes-null", update(http_lb(nodes=None)), "loadBalancers[0].nodes: must be a list (got null)")
case("nodes-empty", update(http_lb(nodes=[])), "loadBalancers[0].nodes: at least one node")
case("too-many-nodes", update(http_lb(nodes=[{}] * (MAX_NODES + 1))),
     f"loadBalancers[0].nodes: at most {MAX_NODES} nodes are allowed (got {MAX_NODES + 1})")
case("node-string", update(http_lb(nodes=["10.0.0.1:80"])),
     "loadBalancers[0].nodes[0]: must be an object (got '10.0.0.1:80')")
case("node-null", update(http_lb(nodes=[None])), "loadBalancers[0].nodes[0]: must be an object")

# node fields
case("node-no-id", with_node(id=_DROP), "Missing node 'id'")
case("node-no-address", with_node(address=_DROP), "Missing node 'address'")
case("node-no-port", with_node(port=_DROP), "Missing node 'port'")
case("node-no-port-located", update(http_lb(nodes=[
    {"id": "1", "address": "10.0.0.1", "port": 80},
    {"id": "2", "address": "10.0.0.2"}])),
    "Missing node 'port' in loadBalancers[0].nodes[1]")
case("node-Port-wrong-case", with_node(port=_DROP, Port=80), "Missing node 'port'")
for bad in ["", "a b", "a\nb", "a\rb", "a#b", "a}b", "a{b", "a;b", "a/b", "a:b", '"a"', "a'b",
            "x" * 65, "é", "a\tb", "\x00", True, 1.0, None, [], {}, LONG, HUGE]:
    case(f"node-id={bad!r:.20}", with_node(id=bad),
         "loadBalancers[0].nodes[0].id: must be 1-64 letters, digits, '-', '_' or '.'")
for bad in ["", " 10.0.0.1", "10.0.0.1 ", "10.0.0.256", "1.2.3", "010.0.0.1", "1.2.3.4.5",
            "10.0.0.1\n", "10.0.0.1#x", "10.0.0.1}", "10.0.0.1:80", "::1%eth0", "fe80::1%a b",
            "[::1]", "::g", ":::1", "a..b", ".a", "a.", "-a.com", "a-.com", "host_name",
            "a b", "a\nserver x 1.2.3.4:80", "x" * 64 + ".com", "a." * 127 + "com",
            "example.123", "10.1", "é.com", 5, None, [], {}, LONG]:
    case(f"node-address={bad!r:.20}", with_node(address=bad),
         "loadBalancers[0].nodes[0].address: must be an IPv4 address, an IPv6 address or a "
         "host name")
for bad in BAD_INTEGERS:
    case(f"node-port={bad!r:.20}", with_node(port=bad),
         "loadBalancers[0].nodes[0].port: must be an integer between 1 and 65535")
for bad in [0, 257, "abc", -1, 1.5, None, True]:
    case(f"node-weight={bad!r:.20}", with_node(weight=bad),
         "loadBalancers[0].nodes[0].weight: must be an integer between 1 and 256")
for bad in ["yes", "1", 1, 0, None, "", [], "truex"]:
    case(f"node-backup={bad!r:.20}", with_node(backup=bad),
         "loadBalancers[0].nodes[0].backup: must be true or false")
case("duplicate-id", update(http_lb(nodes=[
    {"id": "7", "address": "10.0.0.1", "port": 80},
    {"id": 7, "address": "10.0.0.2", "port": 80}])),
    "loadBalancers[0].nodes[1].id: duplicate node id '7' (also loadBalancers[0].nodes[0])")
case("galera-two-active", update(tcp_lb(protocol="GALERA", nodes=[
    {"id": "1", "address": "10.0.0.1", "port": 3306},
    {"id": "2", "address": "10.0.0.2", "port": 3306}])),
    "loadBalancers[0].nodes: a GALERA load balancer needs exactly one node that is not "
    "backup (got 2)")
case("galera-all-backup", update(tcp_lb(protocol="GALERA", nodes=[
    {"id": "1", "address": "10.0.0.1", "port": 3306, "backup": "true"}])),
    "exactly one node that is not backup (got 0)")

# monitor
for bad in ["HTTP", [], 5, True]:
    case(f"monitor={bad!r:.20}", update(http_lb(monitor=bad)),
         "loadBalancers[0].monitor: must be an object")
for key in ("type", "delay", "timeout", "attempts"):
    mon = monitor()
    del mon[key]
    case(f"monitor-no-{key}", update(http_lb(monitor=mon)), f"Missing monitor '{key}'")
mon = monitor()
del mon["delay"]
case("monitor-no-delay-second", update(http_lb(), tcp_lb(monitor=mon)),
     "Missing monitor 'delay' in loadBalancers[1]")
for bad in ["PING", "", None, 1, "HTTPS"]:
    case(f"monitor-type={bad!r:.20}", update(http_lb(monitor=monitor(type=bad))),
         "loadBalancers[0].monitor.type: must be one of CONNECT, HTTP")
for key, bounds in (("delay", "1 and 3600"), ("timeout", "1 and 3600"), ("attempts", "1 and 10")):
    for bad in [0, -1, 3601 if key != "attempts" else 11, "x", 2.5, None, False, HUGE, LONG]:
        case(f"monitor-{key}={bad!r:.20}", update(http_lb(monitor=monitor(**{key: bad}))),
             f"loadBalancers[0].monitor.{key}: must be an integer between {bounds}")
case("monitor-timeout-over-delay", update(http_lb(monitor=monitor(delay="5", timeout=6))),
     "loadBalancers[0].monitor.timeout: must not be more than delay (got timeout 6, delay 5)")
# '#', quotes, '\\', braces and '$' are paths Libra's API lets through: accepted (see
# test_monitor_path_characters_are_accepted); what no request line can carry is refused.
for bad in ["health", "", "/a b", "/a\nb", "/\noption httpchk GET /x", "/a\rb",
            "/é", "/a\tb", "/a\x00b", "/a\x7fb", "/" + "a" * 2000, 5, None, [], LONG]:
    case(f"monitor-path={bad!r:.20}", update(http_lb(monitor=monitor(path=bad))),
         "loadBalancers[0].monitor.path: must start with '/' and be at most 2000 printable "
         "ASCII characters without spaces")

# options
for bad in [[], "fast", 1]:
    case(f"options={bad!r:.20}", update(http_lb(options=bad)),
         "loadBalancers[0].options: must be an object")
for key in ("client_timeout", "server_timeout", "connect_timeout"):
    for bad in [-1, 1_000_001, "abc", None, 1.5, HUGE]:
        case(f"options-{key}={bad!r:.20}", update(http_lb(options={key: bad})),
             f"loadBalancers[0].options.{key}: must be an integer between 0 and 1000000")
for bad in [-1, 257, "three", None, True]:
    case(f"options-connect_retries={bad!r:.20}",
         update(http_lb(options={"connect_retries": bad})),
         "loadBalancers[0].options.connect_retries: must be an integer between 0 and 256")


@pytest.mark.parametrize("message, expected", INVALID)
def test_invalid_message_names_the_field(message, expected):
    text = parse_error(message)
    assert expected in text


def test_missing_nodes_text_matches_the_protocol_example():
    message = {"hpcs_action": "UPDATE", "loadBalancers": [{"protocol": "HTTP"}]}
    assert parse_error(message) == "Missing 'nodes' element"


def test_missing_node_port_text_matches_the_protocol_example():
    assert parse_error(with_node(port=_DROP)) == "Missing node 'port'"


def test_error_quotes_the_bad_value():
    text = parse_error(with_node(port="70000"))
    assert text == ("loadBalancers[0].nodes[0].port: must be an integer between 1 and 65535 "
                    "(got '70000')")


def test_error_echo_is_capped_and_escaped():
    text = parse_error(with_node(id="a\nb" + "c" * 1000))
    assert text.endswith("(got 'a\\nb" + "c" * 37 + "'...)")
    huge = parse_error(with_node(port=HUGE))
    assert huge.endswith("(got a number too large to show)")


def test_message_is_not_modified():
    message = update(http_lb(port="8080", monitor=monitor()), tcp_lb())
    before = copy.deepcopy(message)
    parse_update(message)
    assert message == before


# --------------------------------------------------------------------------
# Valid messages
# --------------------------------------------------------------------------

def test_minimal_http_gets_defaults():
    lbs = parse_update(update({"protocol": "HTTP",
                               "nodes": [{"id": "1", "address": "10.0.0.1", "port": "80"}]}))
    assert lbs == (LoadBalancer(protocol="HTTP", port=80, algorithm="ROUND_ROBIN",
                                nodes=(Node(id="1", address="10.0.0.1", port=80),),
                                monitor=None, options=Options()),)
    assert lbs[0].nodes[0].weight == 1 and lbs[0].nodes[0].backup is False
    assert Options() == Options(30000, 30000, 30000, 3)


def test_protocol_example_message():
    message = {"hpcs_action": "UPDATE",
               "loadBalancers": [{"name": "lb-1", "protocol": "HTTP", "port": "8080",
                                  "nodes": [{"id": "101", "address": "10.0.0.1", "port": "80",
                                             "weight": "1"}]}]}
    (lb,) = parse_update(message)
    assert (lb.protocol, lb.port) == ("HTTP", 8080)
    assert lb.nodes == (Node(id="101", address="10.0.0.1", port=80, weight=1),)
    assert not hasattr(lb, "name") and not hasattr(lb, "id")


def test_full_message_with_lenient_values():
    message = update(
        {"protocol": " http", "port": " 8080 ", "algorithm": "Least_Connections",
         "id": 42, "name": "ignored name with spaces\n", "unknown": {"x": 1},
         "monitor": {"type": "http", "delay": "10", "timeout": 5.0, "attempts": 3,
                     "path": "/health?check=1&x=%20;y"},
         "options": {"client_timeout": "1000", "server_timeout": 2000, "connect_timeout": 3000.0,
                     "connect_retries": "0", "other": "ignored"},
         "nodes": [{"id": 101, "address": "10.0.0.1", "port": 80, "condition": "ENABLED"},
                   {"id": "web-2_b.x", "address": "2001:DB8::0001", "port": "81", "weight": "256",
                    "backup": "TRUE"},
                   {"id": "3", "address": "Backend-3.example.com", "port": 65535.0,
                    "weight": 5, "backup": False}]},
        {"protocol": "tcp", "port": 3000,
         "monitor": {"type": "CONNECT", "delay": 3600, "timeout": 3600, "attempts": 10,
                     "path": "not checked for CONNECT"},
         "nodes": [{"id": "0", "address": "::ffff:10.0.0.9", "port": 1, "backup": "false"}]})
    http, tcp = parse_update(message)
    assert http == LoadBalancer(
        protocol="HTTP", port=8080, algorithm="LEAST_CONNECTIONS",
        nodes=(Node("101", "10.0.0.1", 80, 1, False),
               Node("web-2_b.x", "2001:db8::1", 81, 256, True),
               Node("3", "Backend-3.example.com", 65535, 5, False)),
        monitor=Monitor("HTTP", 10, 5, 3, "/health?check=1&x=%20;y"),
        options=Options(1000, 2000, 3000, 0))
    assert tcp.protocol == "TCP" and tcp.algorithm == "ROUND_ROBIN"
    assert tcp.monitor == Monitor("CONNECT", 3600, 3600, 10, "/")
    assert tcp.nodes[0].address in ("::ffff:a00:9", "::ffff:10.0.0.9")
    assert tcp.nodes[0].backup is False
    assert tcp.nodes[0].is_ipv6 and not http.nodes[2].is_ipv6


@pytest.mark.parametrize("text, number", [
    ("80", 80), (" 80", 80), ("80 ", 80), ("\t80\n", 80), ("080", 80), (80.0, 80),
    (1, 1), (65535, 65535), ("65535", 65535)])
def test_accepted_number_forms(text, number):
    (lb,) = parse_update(with_node(port=text))
    assert lb.nodes[0].port == number
    assert type(lb.nodes[0].port) is int


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), ("true", True), ("FALSE", False), ("True", True),
    (" false ", False)])
def test_backup_forms(value, expected):
    (lb,) = parse_update(with_node(backup=value))
    assert lb.nodes[0].backup is expected


@pytest.mark.parametrize("value, expected", [
    (101, "101"), (0, "0"), ("a" * 64, "a" * 64), ("A.b-C_9", "A.b-C_9"),
    (10 ** 63, "1" + "0" * 63)])
def test_node_id_forms(value, expected):
    (lb,) = parse_update(with_node(id=value))
    assert lb.nodes[0].id == expected


@pytest.mark.parametrize("address, expected", [
    ("192.168.1.10", "192.168.1.10"), ("::1", "::1"), ("2001:0db8:0000::0001", "2001:db8::1"),
    ("localhost", "localhost"), ("db-1.internal", "db-1.internal"),
    ("a" * 63 + ".example.com", "a" * 63 + ".example.com"), ("1a.example.c0m", "1a.example.c0m")])
def test_address_forms(address, expected):
    (lb,) = parse_update(with_node(address=address))
    assert lb.nodes[0].address == expected


@given(st.integers(0, 2 ** 32 - 1), st.booleans())
def test_ipv4_addresses_come_out_as_ipaddress_writes_them(number, zero_padded):
    """The canonical dotted quad is taken as it is; any other spelling is ipaddress's call."""
    canonical = str(ipaddress.IPv4Address(number))
    text = ".".join(f"{int(octet):03d}" for octet in canonical.split(".")) if zero_padded else canonical
    try:
        expected = str(ipaddress.IPv4Address(text))
    except ValueError:
        expected = None
    try:
        (lb,) = parse_update(with_node(address=text))
    except BadRequest:
        assert expected is None, text
    else:
        assert lb.nodes[0].address == expected == canonical, text


def test_null_monitor_and_options_mean_none_and_defaults():
    (lb,) = parse_update(update(http_lb(monitor=None, options=None)))
    assert lb.monitor is None and lb.options == Options()


def test_http_monitor_path_defaults_to_root():
    mon = monitor()
    del mon["path"]
    (lb,) = parse_update(update(http_lb(monitor=mon)))
    assert lb.monitor == Monitor("HTTP", 10, 5, 3, "/")


def test_http_and_galera_on_one_device():
    galera = {"protocol": "GALERA", "port": "3306", "nodes": [
        {"id": "db1", "address": "10.0.0.1", "port": 3306},
        {"id": "db2", "address": "10.0.0.2", "port": 3306, "backup": True},
        {"id": "db3", "address": "10.0.0.3", "port": 3306, "backup": "true"}]}
    lbs = parse_update(update(galera, http_lb()))
    assert [lb.protocol for lb in lbs] == ["GALERA", "HTTP"]
    assert [node.backup for node in lbs[0].nodes] == [False, True, True]


def test_same_node_id_in_two_load_balancers_is_allowed():
    lbs = parse_update(update(http_lb(), tcp_lb(nodes=[
        {"id": "101", "address": "10.0.0.1", "port": 3000}])))
    assert lbs[0].nodes[0].id == lbs[1].nodes[0].id == "101"


def test_max_nodes_accepted():
    nodes = [{"id": i, "address": f"10.{i // 256 % 256}.{i % 256}.1", "port": 80}
             for i in range(MAX_NODES)]
    (lb,) = parse_update(update(http_lb(nodes=nodes)))
    assert len(lb.nodes) == MAX_NODES
    assert lb.nodes[-1] == Node(str(MAX_NODES - 1), "10.39.15.1", 80)


def test_models_are_frozen():
    (lb,) = parse_update(update(http_lb()))
    with pytest.raises(AttributeError):
        lb.port = 1
    with pytest.raises(AttributeError):
        lb.nodes[0].address = "10.0.0.9"


# --------------------------------------------------------------------------
# Fuzzing: any JSON in any field → typed objects or BadRequest, nothing else
# --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                       children, max_size=3),
    max_leaves=8)

FIELDS = [("lb", "protocol"), ("lb", "port"), ("lb", "algorithm"), ("lb", "nodes"),
          ("lb", "monitor"), ("lb", "options"), ("node", "id"), ("node", "address"),
          ("node", "port"), ("node", "weight"), ("node", "backup"), ("monitor", "type"),
          ("monitor", "delay"), ("monitor", "timeout"), ("monitor", "attempts"),
          ("monitor", "path"), ("options", "client_timeout"), ("options", "connect_retries")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_any_json_value_gives_models_or_bad_request(field, value):
    lb = http_lb(monitor=monitor(), options={})
    target = {"lb": lb, "node": lb["nodes"][0], "monitor": lb["monitor"],
              "options": lb["options"]}[field[0]]
    target[field[1]] = value
    try:
        lbs = parse_update(update(lb))
    except BadRequest as error:
        text = str(error)
        assert text and "\n" not in text and "\r" not in text and len(text) < 300
    else:
        assert isinstance(lbs[0], LoadBalancer)
        assert all(isinstance(node.port, int) for node in lbs[0].nodes)


# -- the usual nodes' fast path (models._usual_nodes) ------------------------
# Its answer must be exactly the field-by-field path's: a Node list equal to
# _parse_nodes', or None (and then _parse_nodes decides, error text included).
_USUAL_NODE_VALUES = {
    "id": st.text(alphabet="AZaz09._-", min_size=1, max_size=64),
    "address": st.sampled_from(["127.0.0.1", "10.0.0.255", "255.255.255.255", "0.0.0.0"]),
    "port": st.integers(1, 65535), "weight": st.integers(1, 256), "backup": st.booleans(),
    "condition": st.sampled_from(["ENABLED", "DISABLED", None]),
}
_ODD_NODE_VALUES = {
    "id": st.one_of(st.integers(0, 99), st.text(alphabet="AZaz09._-", min_size=65, max_size=66),
                    st.sampled_from(["", " a", "a\nb", "a b", "é", "\n", "a\n"]), st.none(), st.booleans()),
    "address": st.sampled_from(["1.2.3.04", "256.1.1.1", "1.2.3", "1.2.3.4.5", "1.2.3.4\n5.6.7.8",
                                " 1.2.3.4", "::1", "localhost", "", "1.2.3.4 ", "１.2.3.4", 7, None]),
    "port": st.one_of(st.sampled_from([0, -1, 65536, "80", 80.0, True, None, [80]])),
    "weight": st.sampled_from([0, 257, -1, "2", 2.0, False, True, None]),
    "backup": st.sampled_from(["true", 0, 1, None]),
    "condition": st.sampled_from(["enabled", " DISABLED", "OFF", 1, True, ""]),
}


def _mostly(usual, odd, one_in=8):
    """`usual` but one time in `one_in`: one odd value among usual ones is then common."""
    return st.integers(1, one_in).flatmap(lambda pick: odd if pick == 1 else usual)


NODE_VALUES = {key: _mostly(_USUAL_NODE_VALUES[key], _ODD_NODE_VALUES[key]) for key in _USUAL_NODE_VALUES}
_raw_node = st.fixed_dictionaries(
    {key: NODE_VALUES[key] for key in ("id", "address", "port")},
    optional={key: NODE_VALUES[key] for key in ("weight", "backup", "condition")})
raw_nodes = st.lists(_mostly(_raw_node, st.sampled_from([None, [], "node", {"id": "a", "port": 80}])),
                     min_size=1, max_size=4)


def _field_by_field(nodes):
    try:
        return models._parse_nodes(nodes, "loadBalancers[0]", "")
    except BadRequest as error:
        return str(error)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_nodes)
def test_the_usual_nodes_fast_path_agrees_with_the_field_by_field_checks(nodes):
    fast = models._usual_nodes(nodes)
    if fast is not None:
        assert fast == _field_by_field(nodes)
        assert [type(value) for node in fast for value in node] == \
               [type(value) for node in _field_by_field(nodes) for value in node]


def test_the_fast_path_takes_the_usual_nodes_and_refuses_a_duplicate():
    usual = [{"id": f"n-{i}", "address": "10.0.0.1", "port": 80 + i, "condition": "DISABLED"}
             for i in range(3)]
    assert models._usual_nodes(usual) == [Node(f"n-{i}", "10.0.0.1", 80 + i, 1, False, False)
                                          for i in range(3)]
    assert models._usual_nodes(usual + [dict(usual[0])]) is None
    with pytest.raises(BadRequest, match=r"nodes\[3\]\.id: duplicate node id 'n-0'"):
        parse_update(update(http_lb(nodes=usual + [dict(usual[0])])))
