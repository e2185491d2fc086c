"""STATS on a real HAProxy: node health from real health checks, every node of
every load balancer, FAIL when HAProxy is not running or the load balancer
was deleted, and a stats socket that answers nonsense.
"""
import time

from support.metrics_helpers import FakeStatsSocket, assert_http_bytes, download
from support.ports import free_port
from support.traffic import lb, node, update

# HAProxy: check inter 1s rise 2 fall 2, timeout check 1s
HTTP_MONITOR = {"type": "HTTP", "delay": 1, "timeout": 1, "attempts": 2, "path": "/bytes/2"}
CONNECT_MONITOR = {"type": "CONNECT", "delay": 1, "timeout": 1, "attempts": 2}
# delay x attempts, plus slack for a machine shared with other test runs
FLIP_DEADLINE = 1 * 2 + 6.0


def _wait_statuses(station, expected, steady=(), timeout=FLIP_DEADLINE):
    """Poll STATS until every node in `expected` has its status; nodes in `steady`
    must keep theirs all along.  Returns the seconds it took."""
    started = time.monotonic()
    last = None
    while True:
        last = station.node_statuses()
        for node_id, status in steady:
            assert last.get(node_id) == status, f"{node_id} left {status}: {last}"
        if all(last.get(node_id) == status for node_id, status in expected.items()):
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, (
            f"STATS never showed {expected} within {timeout}s; last: {last}")
        time.sleep(0.1)


def test_health_monitors_mark_nodes_down_and_up_again(station, http_backend, tcp_backend):
    station.start()
    sick, gone, steady = http_backend("sick"), http_backend("gone"), http_backend("steady")
    echo = tcp_backend("echo")
    http_port, tcp_port = free_port(), free_port()
    nowhere = free_port()               # nothing listens there: never passes a check
    station.must_pass(update(
        lb("HTTP", http_port, [node("sick", sick), node("gone", gone), node("steady", steady),
                               {"id": "nowhere", "address": "127.0.0.1", "port": nowhere}],
           monitor=HTTP_MONITOR),
        lb("TCP", tcp_port, [node("echo", echo)], monitor=CONNECT_MONITOR)))

    all_up = {"sick": "UP", "gone": "UP", "steady": "UP", "echo": "UP", "nowhere": "DOWN"}
    _wait_statuses(station, all_up)
    assert sick.requests > 0, "the HTTP monitor never reached the back-end"

    # The HTTP path starts answering 500, one back-end and the TCP one stop listening.
    sick.healthy = False
    gone.stop()
    echo.stop()
    took = _wait_statuses(station, {"sick": "DOWN", "gone": "DOWN", "echo": "DOWN"},
                          steady=[("steady", "UP")])
    assert took < FLIP_DEADLINE
    assert station.node_statuses()["nowhere"] == "DOWN"

    # Recovery.
    sick.healthy = True
    gone.start()
    echo.start()
    took = _wait_statuses(station, all_up, steady=[("steady", "UP"), ("nowhere", "DOWN")])
    assert took < FLIP_DEADLINE


def test_stats_lists_every_node_of_every_load_balancer_by_its_id(station, http_backend, tcp_backend):
    station.start()
    webs = [http_backend() for _ in range(3)]
    echoes = [tcp_backend() for _ in range(2)]
    http_ids = ["web-1", "42", "node_b.example"]
    tcp_ids = ["tcp.A-1", 7]                       # an integer id is accepted as it came
    station.must_pass(update(
        lb("HTTP", free_port(), [node(i, b) for i, b in zip(http_ids, webs)], monitor=HTTP_MONITOR),
        lb("TCP", free_port(), [node(i, b) for i, b in zip(tcp_ids, echoes)], monitor=CONNECT_MONITOR)))

    reply = station.must_pass({"hpcs_action": "STATS"})
    assert sorted(entry["id"] for entry in reply["nodes"]) == sorted(
        ["web-1", "42", "node_b.example", "tcp.A-1", "7"]), reply
    _wait_statuses(station, {str(i): "UP" for i in http_ids + tcp_ids})

    # UPDATE replaces the whole configuration: a node it no longer names is gone.
    station.must_pass(update(lb("HTTP", free_port(), [node("web-1", webs[0])], monitor=HTTP_MONITOR)))
    assert set(station.node_statuses()) == {"web-1"}


def test_stats_fails_when_haproxy_is_not_running_and_after_delete(station, http_backend):
    station.start()
    fresh = station.must_fail({"hpcs_action": "STATS"})       # nothing configured yet
    assert fresh.get("status") != "DELETED"

    port = free_port()
    station.must_pass(update(lb("HTTP", port, [node("a", http_backend())], monitor=HTTP_MONITOR)))
    assert set(station.node_statuses()) == {"a"}

    station.must_pass({"hpcs_action": "SUSPEND"})
    suspended = station.must_fail({"hpcs_action": "STATS"})
    assert suspended.get("status") != "DELETED", suspended
    assert "nodes" not in suspended, suspended

    station.must_pass({"hpcs_action": "ENABLE"})
    assert set(station.node_statuses()) == {"a"}

    station.must_pass({"hpcs_action": "DELETE"})
    for action in ("STATS", "METRICS"):
        deleted = station.must_fail({"hpcs_action": action, "extra": [1]})
        assert deleted.get("status") == "DELETED", deleted
        assert deleted.get("extra") == [1], "unknown fields must be echoed back"
        assert "nodes" not in deleted and "utc_start" not in deleted, deleted
    assert station.worker.alive()


ANSWERS = {
    "binary garbage": b"\x00\xff\xfe garbage \x01\x02\n\n",
    "plain nonsense": b"Unknown command. Please enter one of the following commands only :\n",
    "nothing at all": b"",
    "info without stats": b"Name: HAProxy\nPid: 4242\nStart_time_sec: 1700000000\n\n",
    "stats cut short": (b"Pid: 4242\nStart_time_sec: 1700000000\n\n"
                        b"# pxname,svname,status,bout\nhttp,FRONTEND,OPEN,99999\nhttp,a,UP,1"),
    "no bout column": (b"Pid: 4242\nStart_time_sec: 1700000000\n\n"
                       b"# pxname,svname,status\nhttp,FRONTEND,OPEN\n\n"),
}


def test_garbage_on_the_stats_socket_fails_stats_with_a_reason(station, http_backend):
    station.start()
    port = free_port()
    station.must_pass(update(lb("HTTP", port, [node("a", http_backend())], monitor=HTTP_MONITOR)))
    requests = download(port, 150_000)
    station.must_pass({"hpcs_action": "SUSPEND"})            # HAProxy stops; its bytes are carried

    carried_reported = False
    for name, answer in ANSWERS.items():
        with FakeStatsSocket(station.stats_socket, answer) as fake:
            reply = station.must_fail({"hpcs_action": "STATS"})
            assert fake.connections >= 1, f"{name}: the worker never asked the fake socket"
            assert fake.received[0].startswith(b"show info"), fake.received
            assert "stats socket" in reply["hpcs_error"], f"{name}: {reply}"
            assert "nodes" not in reply and reply.get("status") != "DELETED", reply

            # METRICS does not trust the garbage: it reports what the ledger carried.
            metrics = station.must_pass({"hpcs_action": "METRICS"})
            counts = {entry["protocol"]: entry["bytes_out"] for entry in metrics["loadBalancers"]}
            if not carried_reported:
                assert_http_bytes(counts.get("http", 0), 150_000, requests, f"{name}: carried bytes")
                carried_reported = True
            else:
                assert counts.get("http", 0) == 0, f"{name}: {metrics}"

        assert station.must_pass({"hpcs_action": "DISCOVER"}).get("version")
    assert station.worker.alive()
