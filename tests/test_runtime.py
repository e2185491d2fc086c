"""UPDATEs applied through HAProxy's runtime API instead of a reload (issue 9).

Each change is checked three ways: traffic through the load balancer, HAProxy's
own `show servers state`, and the master's `show proc` (same worker process,
no new reload).  The config file on disk must always match what a reload of
it would run, so the next reload changes nothing.
"""
import collections
import re

from support.ports import free_port
from support.traffic import (FAST_CONNECT_MONITOR, backend_counts, lb, node, tcp_banner, unix_command,
                             update, wait_until)


def proc_state(device):
    """(current worker pid, master's reload count) from `show proc`."""
    text = unix_command(device.master_socket, "show proc")
    master = re.search(r"^\d+\s+master\s+(\d+)", text, re.M)
    workers = re.findall(r"^(\d+)\s+worker\s+(\d+)", text, re.M)
    assert master and workers, text
    newest = min(workers, key=lambda worker: int(worker[1]))
    return int(newest[0]), int(master.group(1))


def servers_state(device, backend):
    """{server name: (address, admin state, user weight, port)} from `show servers state`."""
    text = unix_command(device.stats_socket, f"show servers state {backend}")
    lines = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    header = text.splitlines()[1].lstrip("# ").split()
    rows = [dict(zip(header, fields)) for fields in lines[1:]]
    return {row["srv_name"]: (row["srv_addr"], int(row["srv_admin_state"]), int(row["srv_uweight"]),
                              int(row["srv_port"])) for row in rows}


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
    assert re.search(rb"server b \S+ weight 3 ", device.config_bytes())


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
    """A new HTTP node carries a cookie, which HAProxy 2.6 refuses on a dynamic server."""
    first, second = http_backend("r-a"), http_backend("r-b")
    port = free_port()
    device.must_pass(update(lb("HTTP", port, [node("a", first)])))
    pid, reloads = proc_state(device)

    device.must_pass(update(lb("HTTP", port, [node("a", first), node("b", second)])))
    assert last_update_path(device) == "reload"
    new_pid, new_reloads = proc_state(device)
    assert new_pid != pid and new_reloads == reloads + 1
    assert set(backend_counts(port, 20)) == {"r-a", "r-b"}


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
