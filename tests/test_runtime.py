"""UPDATEs applied through HAProxy's runtime API instead of a reload (issue 9).

Each change is checked three ways: traffic through the load balancer, HAProxy's
own `show servers state`, and the master's `show proc` (same worker process,
no new reload).  The config file on disk must always match what a reload of
it would run, so the next reload changes nothing.
"""
import collections
import re

from support.haproxy_version import dynamic_cookie
from support.ports import free_port
from support.traffic import (FAST_CONNECT_MONITOR, SlowRequest, backend_counts, http_get, lb, node, tcp_banner,
                             unix_command, update, wait_until)


def proc_state(device):
    """(current worker pid, master's reload count) from `show proc`."""
    text = unix_command(device.master_socket, "show proc")
    master = re.search(r"^\d+\s+master\s+(\d+)", text, re.M)
    workers = re.findall(r"^(\d+)\s+worker\s+(\d+)", text, re.M)
    assert master and workers, text
    newest = min(workers, key=lambda worker: int(worker[1]))
    return int(newest[0]), int(master.group(1))


def servers_state(device, backend):
    """{server name: (address, admin state, user weight, port, server id)} from `show servers state`."""
    text = unix_command(device.stats_socket, f"show servers state {backend}")
    lines = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    header = text.splitlines()[1].lstrip("# ").split()
    rows = [dict(zip(header, fields)) for fields in lines[1:]]
    return {row["srv_name"]: (row["srv_addr"], int(row["srv_admin_state"]), int(row["srv_uweight"]),
                              int(row["srv_port"]), int(row["srv_id"])) for row in rows}


def last_update_path(device):
    lines = [line for line in device.worker.log_text().splitlines() if " UPDATE PASS " in line]
    assert lines, device.worker.log_text()
    return re.search(r"\((unchanged|runtime|reload|start)\)", lines[-1]).group(1)


def test_weight_change_needs_no_reload(device, http_backend, tcp_backend):
    first, second = http_backend("w-a"), http_backend("w-b")
    port = free_port()
    nodes = [node("a", first), node("b", second)]
    device.must_pass(update(lb("HTTP", port, nodes, monitor=FAST_CONNECT_MONITOR)))
    before = proc_state(device)

    nodes[1]["weight"] = 3
    config_before = device.config_bytes()
    device.must_pass(update(lb("HTTP", port, nodes, monitor=FAST_CONNECT_MONITOR)))

    assert last_update_path(device) == "runtime"
    assert proc_state(device) == before, "the weight change reloaded HAProxy"
    assert servers_state(device, "http_servers")["b"][2] == 3
    counts = backend_counts(port, 200)
    assert 120 <= counts["w-b"] <= 180 and counts["w-a"] + counts["w-b"] == 200, counts
    # The file on disk is what a reload would run: the same weight.
    assert device.config_bytes() != config_before
    assert re.search(rb"server b \S+ id \d+ weight 3 ", device.config_bytes())


def test_identical_update_changes_nothing(device, http_backend, tcp_backend):
    only = http_backend("same")
    port = free_port()
    message = update(lb("HTTP", port, [node("n1", only)]))
    device.must_pass(message)
    before, config = proc_state(device), device.config_bytes()
    backup_mtime = device.backup.stat().st_mtime_ns if device.backup.exists() else None

    reply = device.must_pass(message)

    assert last_update_path(device) == "unchanged"
    assert proc_state(device) == before
    assert device.config_bytes() == config
    assert (device.backup.stat().st_mtime_ns if device.backup.exists() else None) == backup_mtime
    assert reply["loadBalancers"][0]["nodes"][0]["condition"] == "ENABLED"


def test_node_disabled_then_enabled_at_run_time(device, http_backend, tcp_backend):
    first, second = http_backend("d-a"), http_backend("d-b")
    port = free_port()
    nodes = [node("a", first), node("b", second)]
    device.must_pass(update(lb("HTTP", port, nodes)))
    before = proc_state(device)

    nodes[1]["condition"] = "DISABLED"
    reply = device.must_pass(update(lb("HTTP", port, nodes)))
    assert [n["condition"] for n in reply["loadBalancers"][0]["nodes"]] == ["ENABLED", "DISABLED"]
    assert last_update_path(device) == "runtime"
    assert servers_state(device, "http_servers")["b"][1] & 1, "b is not in maintenance"
    assert backend_counts(port, 20) == collections.Counter({"d-a": 20})

    nodes[1]["condition"] = "enabled"
    device.must_pass(update(lb("HTTP", port, nodes)))
    assert last_update_path(device) == "runtime"
    assert servers_state(device, "http_servers")["b"][1] & 1 == 0
    assert set(backend_counts(port, 20)) == {"d-a", "d-b"}
    assert proc_state(device) == before


def test_tcp_node_added_and_removed_without_reload(device, http_backend, tcp_backend):
    first, second = tcp_backend("t-a"), tcp_backend("t-b")
    port = free_port()
    device.must_pass(update(lb("TCP", port, [node("a", first)], monitor=FAST_CONNECT_MONITOR)))
    before = proc_state(device)

    device.must_pass(update(lb("TCP", port, [node("a", first), node("b", second)],
                               monitor=FAST_CONNECT_MONITOR)))
    assert last_update_path(device) == "runtime"
    assert set(servers_state(device, "tcp_servers")) == {"a", "b"}

    # Remove the first node: new connections can only reach the second.
    device.must_pass(update(lb("TCP", port, [node("b", second)], monitor=FAST_CONNECT_MONITOR)))
    assert last_update_path(device) == "runtime"
    assert set(servers_state(device, "tcp_servers")) == {"b"}
    wait_until(lambda: servers_state(device, "tcp_servers")["b"][1] == 0, 5, what="b ready")
    assert {tcp_banner(port) for _ in range(5)} == {"t-b"}
    assert proc_state(device) == before
    assert b"server a " not in device.config_bytes()


def test_address_change_moves_traffic_without_reload(device, http_backend, tcp_backend):
    old, new = http_backend("addr-old"), http_backend("addr-new")
    port = free_port()
    device.must_pass(update(lb("HTTP", port, [node("n", old)])))
    before = proc_state(device)

    device.must_pass(update(lb("HTTP", port, [node("n", new)])))
    assert last_update_path(device) == "runtime"
    assert servers_state(device, "http_servers")["n"][3] == new.port
    assert backend_counts(port, 5) == collections.Counter({"addr-new": 5})
    assert proc_state(device) == before


def test_what_the_runtime_api_cannot_do_reloads(device, http_backend, tcp_backend):
    """A node's backup flag cannot change at run time, on any HAProxy."""
    first, second = tcp_backend("r-a"), tcp_backend("r-b")
    port = free_port()
    device.must_pass(update(lb("TCP", port, [node("a", first), node("b", second)])))
    pid, reloads = proc_state(device)

    device.must_pass(update(lb("TCP", port, [node("a", first), node("b", second, backup=True)])))
    assert last_update_path(device) == "reload"
    new_pid, new_reloads = proc_state(device)
    assert new_pid != pid and new_reloads == reloads + 1
    assert {tcp_banner(port) for _ in range(5)} == {"r-a"}
    assert "changes its backup flag" in device.worker.log_text()


def test_http_node_added_and_removed(device, http_backend, tcp_backend):
    """HAProxy 3.0 takes `cookie` on `add server`: an HTTP node comes and goes without a reload.
    HAProxy 2.6 refuses it: the node is added by a reload, and removed at run time."""
    first, second = http_backend("h-a"), http_backend("h-b")
    port = free_port()
    device.must_pass(update(lb("HTTP", port, [node("a", first)], monitor=FAST_CONNECT_MONITOR)))
    before = proc_state(device)

    device.must_pass(update(lb("HTTP", port, [node("a", first), node("b", second)],
                               monitor=FAST_CONNECT_MONITOR)))
    assert last_update_path(device) == ("runtime" if dynamic_cookie() else "reload")
    assert (proc_state(device) == before) == dynamic_cookie()
    wait_until(lambda: set(backend_counts(port, 6)) == {"h-a", "h-b"}, 5, what="both nodes serving")
    # The added node's persistence cookie works like the configured one's.
    assert backend_counts(port, 6, headers={"Cookie": "SERVERID=b"}) == {"h-b": 6}
    assert http_get(port, headers={"Cookie": "SERVERID=x"}).headers["Set-Cookie"].split(";")[0] in (
        "SERVERID=a", "SERVERID=b")

    after_add = proc_state(device)
    device.must_pass(update(lb("HTTP", port, [node("a", first)], monitor=FAST_CONNECT_MONITOR)))
    assert last_update_path(device) == "runtime"
    assert proc_state(device) == after_add
    assert set(servers_state(device, "http_servers")) == {"a"}
    assert backend_counts(port, 6, headers={"Cookie": "SERVERID=b"}) == {"h-a": 6}


def test_the_next_reload_changes_nothing(device, http_backend, tcp_backend):
    """After runtime changes of every kind, a reload of the file on disk runs the same servers."""
    web = [http_backend(f"n-{i}") for i in range(4)]
    protocol = "HTTP" if dynamic_cookie() else "TCP"   # 2.6 adds HTTP nodes by reloading
    backend = f"{protocol.lower()}_servers"
    port = free_port()
    device.must_pass(update(lb(protocol, port, [node("a", web[0]), node("b", web[1]), node("c", web[2])],
                               monitor=FAST_CONNECT_MONITOR)))
    before = proc_state(device)
    device.must_pass(update(lb(protocol, port, [
        node("a", web[0], weight=9), node("b", web[3], condition="DISABLED"),
        node("d", web[2]), node("e", web[1], weight=4, condition="DISABLED")], monitor=FAST_CONNECT_MONITOR)))
    assert last_update_path(device) == "runtime" and proc_state(device) == before
    running = comparable(servers_state(device, backend))
    # a and b keep their ids (1, 2); d and e, added while c (3) still ran, take 4 and 5

    pid, reloads = before
    unix_command(device.master_socket, "reload")
    wait_until(lambda: proc_state(device)[1] == reloads + 1, 10, what="the reload")
    assert comparable(servers_state(device, backend)) == running
    assert running == {"a": ("127.0.0.1", False, 9, web[0].port, 1), "b": ("127.0.0.1", True, 1, web[3].port, 2),
                       "d": ("127.0.0.1", False, 1, web[2].port, 4), "e": ("127.0.0.1", True, 4, web[1].port, 5)}


def comparable(state):
    """servers_state without how a server came into maintenance (config `disabled` or the CLI)."""
    return {name: (address, bool(admin & 0x7), weight, port, server_id)
            for name, (address, admin, weight, port, server_id) in state.items()}


def test_a_removed_node_finishes_its_request_first(device, http_backend, tcp_backend):
    """`del server` waits (a little) for the removed node's last request: it completes, no reload."""
    first, second = http_backend("s-a"), http_backend("s-b")
    port = free_port()
    both = [node("a", first), node("b", second)]
    device.must_pass(update(lb("HTTP", port, both)))
    before = proc_state(device)

    held = SlowRequest(port, size=40, seconds=0.5)
    remaining = [n for n in both if n["id"] != ("a" if held.backend == "s-a" else "b")]
    device.must_pass(update(lb("HTTP", port, remaining)))
    assert len(held.finish()) == 40
    assert last_update_path(device) == "runtime", device.worker.log_text()[-1500:]
    assert proc_state(device) == before
    assert set(servers_state(device, "http_servers")) == {remaining[0]["id"]}


def test_a_removed_node_busy_for_longer_is_removed_by_a_reload(device, http_backend, tcp_backend):
    first, second = http_backend("l-a"), http_backend("l-b")
    port = free_port()
    both = [node("a", first), node("b", second)]
    device.must_pass(update(lb("HTTP", port, both)))
    pid, _ = proc_state(device)

    held = SlowRequest(port, size=30, seconds=3)
    remaining = [n for n in both if n["id"] != ("a" if held.backend == "l-a" else "b")]
    device.must_pass(update(lb("HTTP", port, remaining)))
    assert last_update_path(device) == "reload" and proc_state(device)[0] != pid
    assert "still had connections" in device.worker.log_text()
    assert len(held.finish()) == 30, "the old process cut the removed node's request"
    assert set(servers_state(device, "http_servers")) == {remaining[0]["id"]}


def test_a_thousand_weights_change_at_run_time(device, http_backend, tcp_backend):
    """No cap on the number of commands: 1,000 weights in one UPDATE, through the runtime API."""
    only = http_backend("k")
    port = free_port()
    slow_checks = {"type": "CONNECT", "delay": 3600, "timeout": 1, "attempts": 1}
    nodes = [node(f"n{i}", only) for i in range(1000)]
    device.must_pass(update(lb("HTTP", port, nodes, monitor=slow_checks)))
    before = proc_state(device)
    for index, one in enumerate(nodes):
        one["weight"] = 1 + index % 200
    device.must_pass(update(lb("HTTP", port, nodes, monitor=slow_checks)))
    assert last_update_path(device) == "runtime" and proc_state(device) == before
    weights = {name: weight for name, (_, _, weight, _, _) in servers_state(device, "http_servers").items()}
    assert weights == {f"n{i}": 1 + i % 200 for i in range(1000)}


def test_a_refused_runtime_command_falls_back_to_a_reload(device, http_backend, tcp_backend):
    """Someone deleted a server behind the worker's back: `set server` fails, the reload fixes it."""
    first, second = tcp_backend("f-a"), tcp_backend("f-b")
    port = free_port()
    device.must_pass(update(lb("TCP", port, [node("a", first), node("b", second)])))
    unix_command(device.stats_socket, "set server tcp_servers/b state maint")
    assert "Server deleted" in unix_command(device.stats_socket, "del server tcp_servers/b")
    pid, _ = proc_state(device)

    device.must_pass(update(lb("TCP", port, [node("a", first), node("b", second, weight=5)])))

    assert last_update_path(device) == "reload"
    assert proc_state(device)[0] != pid
    assert servers_state(device, "tcp_servers")["b"][2] == 5
    assert "reloading instead" in device.worker.log_text()


def test_after_a_refused_add_no_node_leaves_service_before_the_reload(device, http_backend, tcp_backend):
    """A plan that adds c and removes a: `add server c` is refused (c was added behind the
    worker's back), so `a` must keep serving in the old process until the reload, which
    then makes the new configuration (the removals go in a second exchange)."""
    first, second, third = tcp_backend("r-a"), tcp_backend("r-b"), tcp_backend("r-c")
    port = free_port()
    device.must_pass(update(lb("TCP", port, [node("a", first), node("b", second)])))
    c = node("c", third)
    assert "New server registered" in unix_command(
        device.stats_socket, f"add server tcp_servers/c {c['address']}:{c['port']} id 99")
    pid, _ = proc_state(device)

    device.must_pass(update(lb("TCP", port, [node("b", second), node("c", third)])))

    assert last_update_path(device) == "reload" and proc_state(device)[0] != pid
    assert "HAProxy refused 'add server tcp_servers/c" in device.worker.log_text()
    assert set(servers_state(device, "tcp_servers")) == {"b", "c"}
    # HAProxy writes each server state change to its output too: the old process's lines.
    output = (device.master_socket.parent / (device.master_socket.name + ".log")).read_text()
    old_lines = [line for line in output.splitlines() if f"({pid})" in line]
    assert old_lines, output[-2000:]
    assert not [line for line in old_lines if "tcp_servers/a" in line and "maintenance" in line], old_lines


def test_stats_and_metrics_stay_exact_across_runtime_adds_and_removes(device, http_backend, tcp_backend):
    """A removed node's bytes are counted once: METRICS counts the frontend, which a runtime
    change does not reset; STATS lists exactly the nodes of the last UPDATE each time."""
    from support.metrics_helpers import HEADER_SLACK, Metrics, assert_http_bytes, download, echo, wait_counted

    def statuses():
        reply = device.must_pass({"hpcs_action": "STATS"})
        return sorted(entry["id"] for entry in reply["nodes"])

    def metrics():
        return Metrics(device.must_pass({"hpcs_action": "METRICS"}))

    tcp = [tcp_backend("m-t1"), tcp_backend("m-t2")]
    web = [http_backend("m-h1"), http_backend("m-h2")]
    http_port, tcp_port = free_port(), free_port()

    def apply(http_nodes, tcp_nodes):
        device.must_pass(update(lb("HTTP", http_port, http_nodes, monitor=FAST_CONNECT_MONITOR),
                                lb("TCP", tcp_port, tcp_nodes, monitor=FAST_CONNECT_MONITOR)))

    apply([node("h1", web[0])], [node("t1", tcp[0])])
    before = proc_state(device)
    metrics()                                   # the window starts here

    apply([node("h1", web[0]), node("h2", web[1])], [node("t1", tcp[0]), node("t2", tcp[1])])
    assert last_update_path(device) == ("runtime" if dynamic_cookie() else "reload")
    assert statuses() == ["h1", "h2", "t1", "t2"]
    after_add = proc_state(device)
    # Traffic through the nodes about to go: h2 (its cookie) and t2 (the TCP LB sticks to one).
    sent_http = 0
    for _ in range(3):
        response = http_get(http_port, "/bytes/100000", headers={"Cookie": "SERVERID=h2"})
        assert response.status == 200 and response.backend == "m-h2"
        sent_http += 100_000
    sent_tcp = sum(echo(tcp_port, 50_000) for _ in range(2))
    wait_counted(device.stats_socket, "http", sent_http)

    apply([node("h1", web[0])], [node("t1", tcp[0])])
    assert last_update_path(device) == "runtime" and proc_state(device) == after_add
    assert statuses() == ["h1", "t1"]
    requests = download(http_port, 200_000)
    sent_http += 200_000
    sent_tcp += echo(tcp_port, 30_000)
    wait_counted(device.stats_socket, "http", sent_http)

    apply([node("h1", web[0]), node("h2", web[1])], [node("t1", tcp[0]), node("t2", tcp[1])])
    assert statuses() == ["h1", "h2", "t1", "t2"]
    report = metrics()
    assert_http_bytes(report.get("HTTP"), sent_http, 3 + requests, "HTTP bytes across a runtime add and remove")
    assert report.get("TCP") == sent_tcp, report
    again = metrics()
    assert again.get("HTTP") < HEADER_SLACK and again.get("TCP") == 0, f"counted twice: {again}"
    if dynamic_cookie():
        assert proc_state(device) == before, "a runtime change reloaded HAProxy"
