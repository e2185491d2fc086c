"""UPDATE on a real HAProxy (service = process): traffic through the load balancer.

One device (gearmand + worker + the HAProxy it runs) serves the whole
module: every UPDATE replaces the whole configuration, so each test brings
its own back-ends and load balancer ports.
"""
import collections
import re

from support.backends import HttpBackend, TcpEchoBackend
from support.ports import free_port
from support.traffic import (FAST_CONNECT_MONITOR, FAST_HTTP_MONITOR, RecordingHttpBackend,
                             SlowRequest, backend_counts, http_get, keepalive_counts, lb, node, refuses, serves,
                             tcp_banner, tcp_exchange, update, wait_until)


def _conditions(reply):
    return [n.get("condition") for one in reply["loadBalancers"] for n in one["nodes"]]


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

def test_round_robin_reaches_every_node_and_every_node_is_enabled(shared_device, backends):
    web = backends(HttpBackend, "rr-a", "rr-b", "rr-c")
    port = free_port()
    reply = shared_device.must_pass(update(lb("HTTP", port, [node(f"n{i}", b) for i, b in enumerate(web)])))

    assert _conditions(reply) == ["ENABLED"] * 3
    counts = backend_counts(port, 30)
    assert counts == {"rr-a": 10, "rr-b": 10, "rr-c": 10}, counts


def test_numbers_as_strings_and_integer_ids_are_accepted_and_echoed(shared_device, backends):
    (web,) = backends(HttpBackend, "str-a")
    port = free_port()
    message = update({"protocol": "http", "port": str(port), "algorithm": "round_robin",
                      "nodes": [{"id": 4242, "address": web.host, "port": str(web.port),
                                 "weight": "2", "backup": "false"}]})
    reply = shared_device.must_pass(message)

    echoed = reply["loadBalancers"][0]["nodes"][0]
    assert echoed["id"] == 4242 and echoed["port"] == str(web.port)
    assert echoed["condition"] == "ENABLED"
    assert http_get(port).backend == "str-a"
    assert re.search(r"^\s*server 4242 ", shared_device.config_bytes().decode(), re.M)


def test_weights_one_to_three_split_the_requests(shared_device, backends):
    light, heavy = backends(HttpBackend, "w-light", "w-heavy")
    port = free_port()
    shared_device.must_pass(update(lb("HTTP", port, [node("light", light, weight=1),
                                              node("heavy", heavy, weight=3)])))

    counts = backend_counts(port, 200)
    assert sum(counts.values()) == 200
    # 1:3 → 50 / 150; allow ±15.
    assert 35 <= counts["w-light"] <= 65, counts
    assert 135 <= counts["w-heavy"] <= 165, counts


def test_least_connections_avoids_the_busy_node(shared_device, backends):
    first, second = backends(HttpBackend, "lc-c", "lc-d")
    port = free_port()
    shared_device.must_pass(update(lb("HTTP", port, [node("c", first), node("d", second)],
                               algorithm="LEAST_CONNECTIONS")))

    held = SlowRequest(port, size=20, seconds=3)
    try:
        busy = held.backend
        assert busy in ("lc-c", "lc-d")
        idle = "lc-d" if busy == "lc-c" else "lc-c"
        counts = keepalive_counts(port, 10)
        # Round robin would have sent half of them to the busy node.
        assert counts == {idle: 10}, f"busy={busy}: {counts}"
    finally:
        body = held.finish()
    assert len(body) == 20


def test_backup_node_serves_only_while_the_primary_is_down(shared_device, backends):
    primary, spare = backends(HttpBackend, "bk-primary", "bk-spare")
    port = free_port()
    shared_device.must_pass(update(lb("HTTP", port, [node("primary", primary), node("spare", spare, backup=True)],
                               monitor=FAST_HTTP_MONITOR)))

    assert backend_counts(port, 10) == {"bk-primary": 10}

    primary.stop()
    wait_until(lambda: serves(port, {"bk-spare"}), timeout=8, what="the backup taking over")
    assert backend_counts(port, 10) == {"bk-spare": 10}

    primary.start()
    wait_until(lambda: serves(port, {"bk-primary"}), timeout=8, what="the primary coming back")
    assert backend_counts(port, 10) == {"bk-primary": 10}


def test_cookie_persistence_keeps_a_client_on_its_node(shared_device, backends):
    web = backends(HttpBackend, "ck-a", "ck-b")
    port = free_port()
    ids = {"ck-a": "node-a", "ck-b": "node-b"}
    shared_device.must_pass(update(lb("HTTP", port, [node(ids[b.name], b) for b in web])))

    first = http_get(port)
    cookie = first.headers.get("Set-Cookie", "")
    match = re.match(r"\s*SERVERID=([^;]+)", cookie)
    assert match, f"no SERVERID cookie in the first reply: {cookie!r}"
    assert match.group(1) == ids[first.backend]

    sticky = backend_counts(port, 10, headers={"Cookie": f"SERVERID={match.group(1)}"})
    assert sticky == {first.backend: 10}
    # Without the cookie the same requests are spread: the persistence is the cookie's doing.
    assert len(backend_counts(port, 4)) == 2


def test_x_forwarded_for_reaches_the_backend(shared_device, backends):
    (recorder,) = backends(RecordingHttpBackend, "xff")
    port = free_port()
    shared_device.must_pass(update(lb("HTTP", port, [node("xff", recorder)])))

    assert http_get(port, "/xff-probe").status == 404   # the back-end answered, with its own 404
    (headers,) = recorder.headers_for("/xff-probe")
    forwarded = [value for name, value in headers if name.lower() == "x-forwarded-for"]
    assert forwarded == ["127.0.0.1"], headers


def test_http_monitor_path_is_what_haproxy_checks(shared_device, backends):
    (recorder,) = backends(RecordingHttpBackend, "mon")
    port = free_port()
    monitor = dict(FAST_HTTP_MONITOR, path="/health-check")
    shared_device.must_pass(update(lb("HTTP", port, [node("mon", recorder)], monitor=monitor)))

    wait_until(lambda: recorder.headers_for("/health-check"), timeout=5,
               what="a GET /health-check from HAProxy's health check")
    # The back-end answers 404 on that path: the check fails and the node goes DOWN.
    wait_until(lambda: http_get(port).status == 503, timeout=6, what="the node marked DOWN")


# --------------------------------------------------------------------------
# TCP, HTTP + TCP, GALERA
# --------------------------------------------------------------------------

def test_tcp_load_balancer_carries_raw_bytes_and_sticks_on_source(shared_device, backends):
    echoes = backends(TcpEchoBackend, "tcp-a", "tcp-b")
    port = free_port()
    reply = shared_device.must_pass(update(lb("TCP", port, [node("ta", echoes[0]), node("tb", echoes[1])])))
    assert _conditions(reply) == ["ENABLED", "ENABLED"]

    payload = bytes(range(256)) * 64 + b"\r\n#}\n\x00end"
    banner, echoed = tcp_exchange(port, payload)
    assert banner in ("tcp-a", "tcp-b")
    assert echoed == payload
    # Source-IP stickiness: every connection from 127.0.0.1 lands on the same node.
    assert {tcp_banner(port) for _ in range(8)} == {banner}


def test_http_and_tcp_on_one_device(shared_device, backends):
    web = backends(HttpBackend, "both-web-a", "both-web-b")
    (echo,) = backends(TcpEchoBackend, "both-tcp")
    http_port, tcp_port = free_port(), free_port()
    reply = shared_device.must_pass(update(
        lb("HTTP", http_port, [node("web-a", web[0]), node("web-b", web[1])]),
        lb("TCP", tcp_port, [node("tcp-1", echo)])))

    assert _conditions(reply) == ["ENABLED"] * 3
    assert backend_counts(http_port, 6) == {"both-web-a": 3, "both-web-b": 3}
    assert tcp_exchange(tcp_port, b"hello\n") == ("both-tcp", b"hello\n")
    text = shared_device.config_bytes().decode()
    for section in ("frontend http", "frontend tcp", "backend http_servers", "backend tcp_servers"):
        assert re.search(rf"^{section}\s*$", text, re.M), section
    servers = [line.split() for line in text.splitlines() if line.split()[:1] == ["server"]]
    assert sorted(words[1] for words in servers) == ["tcp-1", "web-a", "web-b"]
    assert all("check" in words for words in servers), "every node gets a health check"


def test_update_replaces_the_whole_configuration(shared_device, backends):
    web = backends(HttpBackend, "repl-web")[0]
    echo = backends(TcpEchoBackend, "repl-tcp")[0]
    http_port, tcp_port = free_port(), free_port()
    shared_device.must_pass(update(lb("HTTP", http_port, [node("w", web)]), lb("TCP", tcp_port, [node("t", echo)])))
    assert tcp_banner(tcp_port) == "repl-tcp"

    shared_device.must_pass(update(lb("HTTP", http_port, [node("w", web)])))
    assert http_get(http_port).backend == "repl-web"
    wait_until(lambda: refuses(tcp_port), timeout=5, what="the TCP listener going away")
    assert "frontend tcp" not in shared_device.config_bytes().decode()


def test_galera_sends_everything_to_the_single_active_node(shared_device, backends):
    active, spare1, spare2 = backends(TcpEchoBackend, "gal-active", "gal-spare1", "gal-spare2")
    port = free_port()
    shared_device.must_pass(update(lb("GALERA", port, [node("g1", spare1, backup=True),
                                                node("g2", active),
                                                node("g3", spare2, backup=True)],
                               monitor=FAST_CONNECT_MONITOR)))

    assert collections.Counter(tcp_banner(port) for _ in range(10)) == {"gal-active": 10}
    banner, echoed = tcp_exchange(port, b"SELECT 1;\n")
    assert (banner, echoed) == ("gal-active", b"SELECT 1;\n")

    active.stop()
    wait_until(lambda: tcp_banner(port) in ("gal-spare1", "gal-spare2"), timeout=8,
               what="a backup taking over")
    seen = {tcp_banner(port) for _ in range(10)}
    assert len(seen) == 1 and seen <= {"gal-spare1", "gal-spare2"}, seen


def test_stats_lists_every_node_of_every_load_balancer(shared_device, backends):
    web = backends(HttpBackend, "st-web")[0]
    echo = backends(TcpEchoBackend, "st-tcp")[0]
    shared_device.must_pass(update(lb("HTTP", free_port(), [node("st-web", web)]),
                            lb("TCP", free_port(), [node("st-tcp", echo), node("st-gone", echo, port=1)],
                               monitor=FAST_CONNECT_MONITOR)))

    def statuses():
        reply = shared_device.must_pass({"hpcs_action": "STATS"})
        return {entry["id"]: entry["status"] for entry in reply["nodes"]}

    assert set(statuses()) == {"st-web", "st-tcp", "st-gone"}
    # Port 1 on loopback refuses: after its checks that node is DOWN, the others UP.
    final = wait_until(lambda: (lambda s: s if s.get("st-gone") == "DOWN" else None)(statuses()),
                       timeout=8, interval=0.25, what="STATS reporting st-gone DOWN")
    assert final == {"st-web": "UP", "st-tcp": "UP", "st-gone": "DOWN"}
