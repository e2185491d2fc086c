"""Libra's own callers, unchanged: the messages they send and the way they read replies.

The shapes come from stackforge/libra (a0e8b91):
- libra/common/api/gearman_client.py: send_update (integer ids, ports and
  weights; backup "TRUE"/"FALSE"; condition "ENABLED"; a monitor always,
  CONNECT 30/30/2 by default; options with three equal timeouts),
  send_delete (an UPDATE keeping the other load balancer, or DELETE) and
  _send_message (badRequest first, then hpcs_response, then hpcs_error);
- libra/admin_api/stats/stats_gearman.py, stats_sched.py, ping_sched.py:
  STATS (DELETED is skipped, node ids go through int()), METRICS (one row
  per load balancer, found by lower-case protocol, GALERA as tcp) and
  DIAGNOSTICS (offline when more than a third of the job servers FAIL).

Each flow runs through a real gearmand with three independent clients
(gear, libgearman's `gearman`, Perl's Gearman::Client), and every PASS is
followed by real traffic through HAProxy.
"""
import csv

import pytest

from support.backends import HttpBackend, TcpEchoBackend
from support.gearman_clients import CLIENTS
from support.gearmand import Gearmand
from support.metrics_helpers import download, echo, parse_utc
from support.ports import free_port
from support.traffic import backend_counts, refuses, stop_haproxy, tcp_exchange, unix_command, wait_until
from support.worker import sudo_ini

KB = 1024


# --------------------------------------------------------------------------
# Libra's side, re-told: the messages it builds and how it reads replies
# --------------------------------------------------------------------------

def send_update_message(lbs):
    """GearmanClientThread.send_update's job_data for the load balancers of one device."""
    job = {"hpcs_action": "UPDATE", "loadBalancers": []}
    for lb in lbs:
        data = {"name": lb["name"], "protocol": lb["protocol"], "algorithm": lb["algorithm"],
                "port": lb["port"], "nodes": [], "monitor": {}}
        for node in lb["nodes"]:
            data["nodes"].append({"id": node["id"], "port": node["port"], "address": node["address"],
                                  "weight": node["weight"], "condition": "ENABLED",
                                  "backup": "TRUE" if node.get("backup") else "FALSE"})
        monitor = lb.get("monitor") or {"type": "CONNECT", "delay": 30, "timeout": 30,
                                        "attempts": 2, "path": None}
        monitor_data = {key: monitor[key] for key in ("type", "delay", "timeout", "attempts")}
        if monitor.get("path") is not None:
            monitor_data["path"] = monitor["path"]
        if lb.get("timeout") or lb.get("retries"):
            data["options"] = {"client_timeout": lb["timeout"], "server_timeout": lb["timeout"],
                               "connect_timeout": lb["timeout"], "connect_retries": lb["retries"]}
        data["monitor"] = monitor_data
        job["loadBalancers"].append(data)
    return job


def send_delete_keep_message(keep):
    """send_delete's UPDATE when another load balancer stays on the device (no monitor, no backup)."""
    return {"hpcs_action": "UPDATE", "loadBalancers": [{
        "name": keep["name"], "protocol": keep["protocol"], "algorithm": keep["algorithm"],
        "port": keep["port"],
        "nodes": [{"id": node["id"], "port": node["port"], "address": node["address"],
                   "weight": node["weight"], "condition": "ENABLED"} for node in keep["nodes"]]}]}


def send_message(reply, response_name="hpcs_response"):
    """GearmanClientThread._send_message: (True, result) or (False, error text)."""
    if "badRequest" in reply:
        return False, reply["badRequest"]["validationErrors"]["message"]
    if reply[response_name] == "FAIL":
        return False, reply.get("hpcs_error", "Load Balancer error")
    return True, reply


def ping(reply):
    """GearJobs.send_pings for one device: 'failed', 'deleted', or {int(node id): status}."""
    if reply["hpcs_response"] == "FAIL":
        if reply.get("status") == "DELETED":
            return "deleted"
        return "failed"
    # ping_sched._update_nodes: Node.id == int(node['id']); status compared with UP / DOWN.
    return {int(node["id"]): node["status"] for node in reply.get("nodes", [])}


def bill(reply, lbs):
    """GearJobs.get_stats + StatsScheduler._update_stats: {lb id: Stats row} (missing: no row)."""
    if reply["hpcs_response"] == "FAIL":
        return None
    rows = {}
    for lb in lbs:
        protocol = lb["protocol"].lower()
        if protocol != "http":
            protocol = "tcp"              # "GALERA or TCP = TCP at the worker"
        bytes_out = -1
        for data in reply["loadBalancers"]:
            if data["protocol"] == protocol:
                bytes_out = data["bytes_out"]
        if bytes_out == -1:
            continue                      # Libra logs 'No stats found' and writes nothing
        rows[lb["id"]] = {"period_start": reply["utc_start"], "period_end": reply["utc_end"],
                          "bytes_out": bytes_out}
    return rows


def offline(reply):
    """GearJobs.offline_check for one device: True when the device is taken offline."""
    if reply["network"] == "FAIL":
        return True
    count = len(reply["gearman"])
    failed = sum(1 for test in reply["gearman"] if test["status"] == "FAIL")
    return failed > count // 3           # "Need 2/3rds gearman up" (Python 2 division)


# --------------------------------------------------------------------------
# The device
# --------------------------------------------------------------------------

@pytest.fixture(params=sorted(CLIENTS))
def client(request, gearmand):
    made = CLIENTS[request.param](gearmand)
    yield made
    made.close()


@pytest.fixture
def second_gearmand(tmp_path):
    server = Gearmand(tmp_path / "gearmand-2").start()
    yield server
    server.stop()


@pytest.fixture
def device(worker, gearmand, second_gearmand, tcp_backend):
    """A worker on three job servers (two real gearmands, one dead port) with a network check."""
    outside = tcp_backend("outside")
    dead = f"127.0.0.1:{free_port()}"
    process = worker(servers=[gearmand, second_gearmand, dead],
                     extra_ini={"worker": {"network_check": outside.address}, **sudo_ini()})
    process.job_servers = [("127.0.0.1", gearmand.port), ("127.0.0.1", second_gearmand.port),
                           ("127.0.0.1", int(dead.rpartition(":")[2]))]
    yield process
    process.stop()
    stop_haproxy(process.sections["worker:haproxy"]["config"])


def must_pass(client, device, message):
    status, result = send_message(client.submit(device.name, message))
    assert status, f"{message['hpcs_action']} failed as Libra reads it: {result!r}; {device.diagnosis()}"
    return result


def web_lb(lb_id, port, backends):
    return {"id": lb_id, "name": f"lb-{lb_id}", "protocol": "HTTP", "algorithm": "ROUND_ROBIN",
            "port": port, "timeout": 30000, "retries": 3,
            "nodes": [{"id": lb_id * 10 + index, "address": backend.host, "port": backend.port,
                       "weight": 1} for index, backend in enumerate(backends, 1)]}


def tcp_lb(lb_id, port, active, spare, protocol="TCP"):
    return {"id": lb_id, "name": f"lb-{lb_id}", "protocol": protocol, "algorithm": "LEAST_CONNECTIONS",
            "port": port, "timeout": 30000, "retries": 3,
            "nodes": [{"id": lb_id * 10 + 1, "address": active.host, "port": active.port, "weight": 1},
                      {"id": lb_id * 10 + 2, "address": spare.host, "port": spare.port, "weight": 1,
                       "backup": True}]}


def settle(device, *frontends):
    """Wait until no client connection is open on `frontends`.

    HAProxy adds a connection's bytes to its counters as the connection ends,
    so bytes of a connection the client just closed can land in the next window.
    """
    stats_socket = device.sections["worker:haproxy"]["stats_socket"]

    def idle():
        text = unix_command(stats_socket, "show stat -1 1 -1")
        rows = {row["pxname"]: row for row in csv.DictReader(text.lstrip("# ").splitlines())}
        return all(rows[name]["scur"] == "0" for name in frontends)
    wait_until(idle, 10.0, what=f"no open connection on {frontends}")


def node_ids(lbs):
    return {node["id"] for lb in lbs for node in lb["nodes"]}


def assert_traffic(http_port=None, tcp_port=None, web_names=None, tcp_name=None):
    if http_port is not None:
        counts = backend_counts(http_port, 2 * len(web_names))
        assert set(counts) == set(web_names), counts
    if tcp_port is not None:
        banner, echoed = tcp_exchange(tcp_port, b"libra")
        assert (banner, echoed) == (tcp_name, b"libra")


# --------------------------------------------------------------------------
# The flows
# --------------------------------------------------------------------------

def test_libra_api_and_admin_api_drive_a_device_from_update_to_delete(
        client, device, second_gearmand, http_backend, tcp_backend):
    webs = [http_backend("web-a"), http_backend("web-b")]
    active, spare = tcp_backend("db-active"), tcp_backend("db-spare")
    http_port, tcp_port = free_port(), free_port()
    lbs = [web_lb(101, http_port, webs), tcp_lb(102, tcp_port, active, spare)]

    # send_update: the API server's UPDATE of both load balancers on the device.
    result = must_pass(client, device, send_update_message(lbs))
    assert [n["condition"] for lb in result["loadBalancers"] for n in lb["nodes"]] == ["ENABLED"] * 4
    assert [n["id"] for lb in result["loadBalancers"] for n in lb["nodes"]] == [1011, 1012, 1021, 1022]
    assert_traffic(http_port, tcp_port, {"web-a", "web-b"}, "db-active")

    # The ping scheduler: every node by its integer id, all UP (the backup too: it is healthy).
    statuses = ping(client.submit(device.name, {"hpcs_action": "STATS"}))
    assert statuses == {node_id: "UP" for node_id in node_ids(lbs)}, statuses
    assert_traffic(http_port, tcp_port, {"web-a", "web-b"}, "db-active")

    # The stats scheduler: one Stats row per load balancer, bytes as sent.
    settle(device, "http", "tcp")
    must_pass(client, device, {"hpcs_action": "METRICS"})        # closes the window so far
    requests = download(http_port, 200 * KB, chunk=50 * KB)
    tcp_bytes = echo(tcp_port, 64 * KB)
    settle(device, "http", "tcp")
    rows = bill(client.submit(device.name, {"hpcs_action": "METRICS"}), lbs)
    assert set(rows) == {101, 102}, f"Libra would write no Stats row for {({101, 102} - set(rows))}"
    assert 200 * KB <= rows[101]["bytes_out"] <= 200 * KB + requests * 1024, rows
    assert rows[102]["bytes_out"] == tcp_bytes, rows
    assert parse_utc(rows[101]["period_start"]) <= parse_utc(rows[101]["period_end"])
    assert_traffic(http_port, tcp_port, {"web-a", "web-b"}, "db-active")

    # The offline check: host alone, port beside it; one of three job servers down is fine...
    reply = client.submit(device.name, {"hpcs_action": "DIAGNOSTICS"})
    assert reply["hpcs_response"] == "PASS", reply
    assert sorted((test["host"], test["port"], test["status"]) for test in reply["gearman"]) == sorted(
        [(host, port, "FAIL" if index == 2 else "PASS")
         for index, (host, port) in enumerate(device.job_servers)]), reply
    assert not offline(reply), reply
    assert_traffic(http_port, tcp_port, {"web-a", "web-b"}, "db-active")
    # ...two of three are not: Libra takes the device offline.
    second_gearmand.stop()
    reply = client.submit(device.name, {"hpcs_action": "DIAGNOSTICS"})
    assert [test["status"] for test in reply["gearman"]].count("FAIL") == 2, reply
    assert offline(reply), reply

    # A validation fault is read from badRequest first.
    status, error = send_message(client.submit(device.name, {
        "hpcs_action": "UPDATE", "loadBalancers": [{"protocol": "HTTP", "port": http_port}]}))
    assert (status, error) == (False, "Missing 'nodes' element")
    assert_traffic(http_port, tcp_port, {"web-a", "web-b"}, "db-active")

    # send_delete of the HTTP load balancer: an UPDATE that keeps the TCP one.
    must_pass(client, device, send_delete_keep_message(lbs[1]))
    assert refuses(http_port), "the deleted HTTP load balancer still listens"
    assert_traffic(tcp_port=tcp_port, tcp_name="db-active")
    assert ping(client.submit(device.name, {"hpcs_action": "STATS"})) == {1021: "UP", 1022: "UP"}
    rows = bill(client.submit(device.name, {"hpcs_action": "METRICS"}), lbs[1:])
    assert set(rows) == {102}, rows

    # send_delete of the last one: DELETE; the ping scheduler then skips the device.
    must_pass(client, device, {"hpcs_action": "DELETE"})
    assert refuses(tcp_port)
    assert ping(client.submit(device.name, {"hpcs_action": "STATS"})) == "deleted"
    assert bill(client.submit(device.name, {"hpcs_action": "METRICS"}), lbs[1:]) is None


def test_a_galera_load_balancer_is_billed_as_tcp(client, device, http_backend, tcp_backend):
    web = http_backend("web")
    primary, standby = tcp_backend("galera-1"), tcp_backend("galera-2")
    http_port, galera_port = free_port(), free_port()
    lbs = [web_lb(201, http_port, [web]), tcp_lb(202, galera_port, primary, standby, "GALERA")]
    must_pass(client, device, send_update_message(lbs))
    assert_traffic(http_port, galera_port, {"web"}, "galera-1")
    settle(device, "http", "galera")
    must_pass(client, device, {"hpcs_action": "METRICS"})

    requests = download(http_port, 100 * KB)
    galera_bytes = echo(galera_port, 32 * KB)
    settle(device, "http", "galera")
    reply = client.submit(device.name, {"hpcs_action": "METRICS"})
    assert sorted(row["protocol"] for row in reply["loadBalancers"]) == ["http", "tcp"], reply
    rows = bill(reply, lbs)
    assert set(rows) == {201, 202}, rows
    assert rows[202]["bytes_out"] == galera_bytes, rows
    assert 100 * KB <= rows[201]["bytes_out"] <= 100 * KB + requests * 1024, rows
    assert_traffic(http_port, galera_port, {"web"}, "galera-1")
