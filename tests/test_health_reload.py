"""Node health across reloads, as Libra's admin API sees it through STATS.

Libra's ping scheduler marks a node ERROR (and alerts) on the first DOWN
it sees, and back ONLINE on the first UP.  So STATS must say UP for a
node HAProxy routes to ("UP 2/3" included), a reload must not show a
serving node DOWN, and a node that was down must stay down (no traffic)
in the new process until its own next check: the worker saves HAProxy's
server states before each reload (server-state file).

Run on each HAProxy series: LIBRA_TEST_HAPROXY=/opt/haproxy-other/sbin/haproxy.
"""
import csv
import time

import pytest

from support.backends import HttpBackend, TcpEchoBackend
from support.metrics_helpers import info
from support.ports import free_port
from support.recorder import RequestLineRecorder, check_line, raw_get
from support.traffic import http_get, lb, unix_command, update, wait_until

FAST = {"type": "HTTP", "delay": 1, "timeout": 1, "attempts": 2, "path": "/"}
# Libra's default monitor numbers (delay 30, timeout 30, attempts 2), as an HTTP check:
# after the reload the dead node's next check is up to 30 s away.
LIBRA_DEFAULT_HTTP = {"type": "HTTP", "delay": 30, "timeout": 30, "attempts": 2, "path": "/"}
LIBRA_DEFAULT_CONNECT = {"type": "CONNECT", "delay": 30, "timeout": 30, "attempts": 2}
FAST_CONNECT = {"type": "CONNECT", "delay": 1, "timeout": 1, "attempts": 2}
FLIP_WITHIN = 15.0
TRAFFIC_REQUESTS = 30
TRAFFIC_LINE = b"GET / HTTP/1.1"     # raw_get's request line; HAProxy's checks send HTTP/1.0


def haproxy_statuses(stats_socket):
    """{server: HAProxy's own status text} of the backends' servers, read from the stats socket."""
    text = unix_command(stats_socket, "show stat -1 4 -1")
    return {row["svname"]: row["status"] for row in csv.DictReader(text.lstrip("# ").splitlines())
            if row.get("svname") not in (None, "FRONTEND", "BACKEND")}


def libra_node(node_id, server, **fields):
    """A node as Libra's API server sends it (send_update)."""
    return {"id": node_id, "port": server.port, "address": server.host, "weight": 1,
            "condition": "ENABLED", "backup": "FALSE", **fields}


def libra_lb(protocol, port, nodes, monitor):
    return {"name": f"lb-{protocol.lower()}", "protocol": protocol, "algorithm": "ROUND_ROBIN",
            "port": port, "nodes": nodes, "monitor": monitor,
            "options": {"client_timeout": 30000, "server_timeout": 30000,
                        "connect_timeout": 30000, "connect_retries": 3}}


def libra_statuses(station):
    """STATS read the way ping_sched._update_nodes reads it: int(id) → status."""
    reply = station.must_pass({"hpcs_action": "STATS"})
    return {int(entry["id"]): entry["status"] for entry in reply["nodes"]}


def test_a_reload_keeps_serving_nodes_up_and_dead_nodes_down(station):
    station.start()
    live, spare = HttpBackend("live").start(), HttpBackend("spare").start()
    dead = RequestLineRecorder("dead").start()
    dead.healthy = False                        # answers 500: fails every check, takes no traffic
    echo = TcpEchoBackend("echo").start()
    try:
        http_port, tcp_port = free_port(), free_port()
        station.must_pass(update(
            libra_lb("HTTP", http_port, [libra_node(1, live), libra_node(2, dead)], FAST),
            libra_lb("TCP", tcp_port, [libra_node(3, echo)], FAST_CONNECT)))
        wait_until(lambda: libra_statuses(station) == {1: "UP", 2: "DOWN", 3: "UP"}, FLIP_WITHIN,
                   what="node 2 DOWN, nodes 1 and 3 UP before the reload")
        old_pid = station.serving_pid()

        # A monitor change needs a reload; node 4 is new, its address never seen before.
        station.must_pass(update(
            libra_lb("HTTP", http_port, [libra_node(1, live), libra_node(2, dead),
                                         libra_node(4, spare)], LIBRA_DEFAULT_HTTP),
            libra_lb("TCP", tcp_port, [libra_node(3, echo)], LIBRA_DEFAULT_CONNECT)))
        after = time.monotonic()
        assert station.serving_pid() != old_pid, "the UPDATE did not reload HAProxy"
        dead_traffic_before = dead.count(TRAFFIC_LINE)

        # At once: the serving nodes are UP, fully (no failed check pending), the dead one DOWN.
        statuses = libra_statuses(station)
        raw = haproxy_statuses(station.stats_socket)
        assert statuses[1] == "UP" and statuses[3] == "UP", (statuses, raw)
        assert statuses[2] == "DOWN", f"the dead node came back UP after the reload: {statuses} {raw}"
        assert raw["1"] == "UP" and raw["3"] == "UP", f"serving nodes lost their health: {raw}"
        assert raw["2"].startswith("DOWN"), raw

        # Real traffic while the dead node's next check is pending: none of it reaches node 2.
        backends = []
        for _ in range(TRAFFIC_REQUESTS):
            status, body = raw_get(http_port, "/")
            assert status == 200, (status, body)
            backends.append(body.decode())
        assert set(backends) <= {"live", "spare"} and "live" in backends, backends
        assert dead.count(TRAFFIC_LINE) == dead_traffic_before, "traffic reached the dead node"
        assert tcp_exchange_name(tcp_port) == "echo"
        elapsed = time.monotonic() - after
        assert libra_statuses(station)[2] == "DOWN"
        assert elapsed < LIBRA_DEFAULT_HTTP["delay"], f"the proof took {elapsed:.1f}s, past the next check"
    finally:
        for server in (live, spare, dead, echo):
            server.stop()


def tcp_exchange_name(port):
    from support.traffic import tcp_exchange
    banner, echoed = tcp_exchange(port, b"ping")
    assert echoed == b"ping"
    return banner


def test_a_node_whose_address_changes_in_a_reload_starts_fresh(station):
    """HAProxy's state file also holds addresses: the new configuration's must win."""
    station.start()
    live = HttpBackend("live").start()
    dead = RequestLineRecorder("dead").start()
    dead.healthy = False
    moved = HttpBackend("moved").start()
    try:
        port = free_port()
        station.must_pass(update(libra_lb("HTTP", port, [libra_node(1, live), libra_node(2, dead)], FAST)))
        wait_until(lambda: libra_statuses(station) == {1: "UP", 2: "DOWN"}, FLIP_WITHIN,
                   what="node 2 DOWN before the reload")
        old_pid = station.serving_pid()
        # Node 2 now points at a healthy back-end; the monitor change reloads.
        station.must_pass(update(libra_lb("HTTP", port, [libra_node(1, live), libra_node(2, moved)],
                                          LIBRA_DEFAULT_HTTP)))
        assert station.serving_pid() != old_pid
        wait_until(lambda: libra_statuses(station) == {1: "UP", 2: "UP"}, FLIP_WITHIN,
                   what="the moved node UP at its new address")
        seen = {http_get(port, "/").backend for _ in range(10)}
        assert seen == {"live", "moved"}, seen
        assert dead.count(TRAFFIC_LINE) == 0
    finally:
        for server in (live, dead, moved):
            server.stop()


def test_a_node_checked_another_way_after_a_reload_starts_fresh(station):
    """Health measured by one probe says nothing about another (a TCP node under an HTTP check)."""
    station.start()
    echo = TcpEchoBackend("echo").start()
    try:
        port = free_port()
        http_check = {"type": "HTTP", "delay": 1, "timeout": 1, "attempts": 1, "path": "/"}
        station.must_pass(update(libra_lb("TCP", port, [libra_node(1, echo)], http_check)))
        wait_until(lambda: libra_statuses(station) == {1: "DOWN"}, FLIP_WITHIN,
                   what="the echo node DOWN under an HTTP check")
        old_pid = station.serving_pid()
        station.must_pass(update(libra_lb("TCP", port, [libra_node(1, echo)], LIBRA_DEFAULT_CONNECT)))
        assert station.serving_pid() != old_pid
        assert libra_statuses(station) == {1: "UP"}, "the HTTP check's verdict was carried to CONNECT"
        assert tcp_exchange_name(port) == "echo"
    finally:
        echo.stop()


def test_a_node_with_failed_checks_that_haproxy_still_routes_to_is_up(station):
    station.start()
    sick = RequestLineRecorder("sick").start()
    steady = HttpBackend("steady").start()
    monitor = {"type": "HTTP", "delay": 2, "timeout": 1, "attempts": 3, "path": "/"}
    try:
        port = free_port()
        station.must_pass(update(libra_lb("HTTP", port, [libra_node(1, sick), libra_node(2, steady)],
                                          monitor)))
        wait_until(lambda: haproxy_statuses(station.stats_socket) == {"1": "UP", "2": "UP"}, FLIP_WITHIN,
                   what="both nodes fully UP")
        checks = sick.count(check_line("/"))
        sick.healthy = False
        wait_until(lambda: haproxy_statuses(station.stats_socket)["1"].startswith("UP "), FLIP_WITHIN,
                   interval=0.02, what="HAProxy showing node 1 'UP n/3' (a failed check)")
        assert libra_statuses(station)[1] == "UP", "a node HAProxy still routes to was reported DOWN"
        assert sick.count(check_line("/")) > checks
        wait_until(lambda: libra_statuses(station)[1] == "DOWN", FLIP_WITHIN,
                   what="node 1 DOWN after its third failed check")
        assert info(station.stats_socket)["Pid"]
    finally:
        sick.stop()
        steady.stop()


# --------------------------------------------------------------------------
# Which saved states a new configuration takes (pure)
# --------------------------------------------------------------------------

STATE_HEADER = ("# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
                "srv_iweight srv_time_since_last_change srv_check_status srv_check_result "
                "srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id "
                "srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr "
                "srv_agent_addr srv_agent_port")


def _state_line(name, address, port, admin=0, weight=1, op=0):
    return (f"3 http_servers 1 {name} {address} {op} {admin} {weight} {weight} 4 17 2 0 6 0 0 0 - "
            f"{port} - 0 0 - - 0")


def test_only_servers_the_new_configuration_keeps_unchanged_carry_their_state():
    from libra_worker.drivers.haproxy import render, server_state
    from libra_worker.models import parse_update
    lbs = parse_update(update(lb("HTTP", 80, [
        {"id": "same", "address": "10.0.0.1", "port": 80},
        {"id": "moved", "address": "10.0.0.2", "port": 81},
        {"id": "reweighted", "address": "10.0.0.3", "port": 80, "weight": 5},
        {"id": "enabled", "address": "10.0.0.4", "port": 80},
        {"id": "disabled", "address": "10.0.0.5", "port": 80, "condition": "DISABLED"},
        {"id": "named", "address": "db.example", "port": 80},
        {"id": "v6", "address": "2001:DB8::0001", "port": 80}])))
    saved = "\n".join(["1", STATE_HEADER,
                       _state_line("same", "10.0.0.1", 80),
                       _state_line("moved", "10.0.0.2", 80),
                       _state_line("reweighted", "10.0.0.3", 80, weight=1),
                       _state_line("enabled", "10.0.0.4", 80, admin=1),     # was set to maint
                       _state_line("disabled", "10.0.0.5", 80, admin=0),
                       _state_line("named", "192.0.2.7", 80),
                       _state_line("v6", "2001:db8::1", 80),
                       _state_line("gone", "10.0.0.9", 80),
                       "3 http_servers 9 short line"]) + "\n"
    kept = server_state.carried(saved, lbs, lbs, render.backend_name)
    lines = kept.splitlines()
    assert lines[:2] == ["1", STATE_HEADER]
    assert [line.split()[3] for line in lines[2:]] == ["same", "v6"], kept
    assert server_state.carried("Unknown command\n", lbs, lbs, render.backend_name) is None
    assert server_state.carried("1\n# be_id be_name\n", lbs, lbs, render.backend_name) is None
    # Health measured by another probe, or with nothing known to run, is not carried.
    probed = parse_update(update(lb("HTTP", 80, [{"id": "same", "address": "10.0.0.1", "port": 80}],
                                    monitor={"type": "HTTP", "delay": 5, "timeout": 5, "attempts": 2,
                                             "path": "/health"})))
    for old, new in ((lbs, probed), (probed, lbs), (None, lbs)):
        assert server_state.carried(saved, old, new, render.backend_name).splitlines()[2:] == []
    retimed = parse_update(update(lb("HTTP", 80, [{"id": "same", "address": "10.0.0.1", "port": 80}],
                                     monitor={"type": "HTTP", "delay": 30, "timeout": 30, "attempts": 3,
                                              "path": "/health"})))
    kept = server_state.carried(saved, probed, retimed, render.backend_name)
    assert [line.split()[3] for line in kept.splitlines()[2:]] == ["same"], kept


@pytest.mark.no_haproxy
def test_can_carry_says_whether_any_server_keeps_its_health_before_haproxy_is_asked():
    """No server that runs now as it will (id, address, port, weight, condition, probe): no dump."""
    from libra_worker.drivers.haproxy import server_state
    from libra_worker.models import parse_update

    def lbs(*nodes, monitor=None):
        return parse_update(update(lb("HTTP", 80, [dict(node) for node in nodes],
                                      **({"monitor": monitor} if monitor else {}))))
    a = {"id": "a", "address": "10.0.0.1", "port": 80, "weight": 1}
    b = {"id": "b", "address": "10.0.0.2", "port": 80, "weight": 1}
    now = lbs(a, b)
    assert server_state.can_carry(now, now)
    assert not server_state.can_carry(now, lbs(dict(a, weight=2), dict(b, weight=2)))
    assert server_state.can_carry(now, lbs(dict(a, weight=2), b))              # b keeps its health
    assert not server_state.can_carry(now, lbs(dict(a, port=81), dict(b, condition="DISABLED")))
    assert not server_state.can_carry(now, lbs(dict(a, id="c"), dict(b, address="10.0.0.3")))
    assert server_state.can_carry(now, lbs(a, dict(b, backup=True)))          # backup: not in the state
    assert not server_state.can_carry(None, now)
    assert not server_state.can_carry(now, lbs(a, b, monitor={"type": "HTTP", "delay": 5, "timeout": 5,
                                                              "attempts": 2, "path": "/health"}))
