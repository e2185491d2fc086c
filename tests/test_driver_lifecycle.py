"""SUSPEND, ENABLE, DELETE and a restarted worker, on a real HAProxy (service = process).

Each test has its own device (gearmand + worker + the HAProxy it runs),
because these actions change the device's state for good.
"""
import pytest

from support.backends import HttpBackend
from support.ports import free_port
from support.traffic import (backend_counts, http_get, lb, master_pid_from_socket, node,
                             refuses, update)

NAMES = ("life-a", "life-b")


@pytest.fixture
def web():
    started = [HttpBackend(name).start() for name in NAMES]
    yield started
    for backend in started:
        backend.stop()


def _serving(device, web):
    """UPDATE an HTTP LB over `web`; returns its port once it serves both nodes."""
    port = free_port()
    device.must_pass(update(lb("HTTP", port, [node(f"n-{b.name}", b) for b in web])))
    assert set(backend_counts(port, 4)) == {b.name for b in web}
    return port


def _pidfile_pid(device):
    return int(device.pidfile.read_text().split()[0])


def test_suspend_refuses_connections_and_enable_serves_again(device, web):
    port = _serving(device, web)
    config = device.config_bytes()

    for attempt in (1, 2):
        reply = device.submit({"hpcs_action": "SUSPEND"})
        assert reply.get("hpcs_response") == "PASS", f"SUSPEND #{attempt}: {reply}"
        assert refuses(port), f"the LB port still accepts connections after SUSPEND #{attempt}"
        assert device.masters() == [], f"haproxy still runs after SUSPEND #{attempt}"
        assert device.config_bytes() == config, "SUSPEND must keep the configuration"

    stats = device.submit({"hpcs_action": "STATS"})
    assert stats.get("hpcs_response") == "FAIL" and stats.get("hpcs_error"), stats
    assert stats.get("status") != "DELETED"

    for attempt in (1, 2):
        reply = device.submit({"hpcs_action": "ENABLE"})
        assert reply.get("hpcs_response") == "PASS", f"ENABLE #{attempt}: {reply}"
        assert http_get(port).backend in NAMES, f"no service right after ENABLE #{attempt}"
        assert len(device.masters()) == 1, f"haproxy masters after ENABLE #{attempt}: {device.masters()}"
        assert device.config_bytes() == config, "ENABLE must run the same configuration"
    assert set(backend_counts(port, 4)) == set(NAMES)


def test_delete_removes_everything_and_update_brings_it_back(device, web):
    port = _serving(device, web)
    port = _serving(device, web)           # a second UPDATE: a live file to back up
    if not device.logfile.exists():
        # HAProxy logs through syslog; stand in for the syslog daemon's file.
        device.logfile.write_text("Nov 22 18:00:00 localhost haproxy[1]: 127.0.0.1 GET /\n")
    leftovers = [device.config, device.backup, device.logfile]
    assert [path.name for path in leftovers if not path.exists()] == [], "nothing for DELETE to remove"

    for attempt in (1, 2):
        reply = device.submit({"hpcs_action": "DELETE"})
        assert reply.get("hpcs_response") == "PASS", f"DELETE #{attempt}: {reply}"
        assert refuses(port), f"the LB port still accepts connections after DELETE #{attempt}"
        assert device.masters() == [], f"haproxy still runs after DELETE #{attempt}"
        assert [path.name for path in leftovers if path.exists()] == []

    for action in ("STATS", "METRICS"):
        reply = device.submit({"hpcs_action": action})
        assert reply.get("hpcs_response") == "FAIL", f"{action} after DELETE: {reply}"
        assert reply.get("status") == "DELETED", f"{action} after DELETE: {reply}"
        assert reply.get("hpcs_error")

    port = _serving(device, web)
    assert len(device.masters()) == 1
    stats = device.must_pass({"hpcs_action": "STATS"})
    assert {entry["id"] for entry in stats["nodes"]} == {f"n-{name}" for name in NAMES}


def test_restarted_worker_adopts_the_running_haproxy(device, web):
    port = _serving(device, web[:1])
    master = master_pid_from_socket(device.master_socket)
    assert _pidfile_pid(device) == master
    assert device.masters() == [master]

    device.worker.stop()                    # SIGTERM
    assert http_get(port).backend == web[0].name, "HAProxy should outlive its worker"
    device.start_worker()

    stats = device.must_pass({"hpcs_action": "STATS"})
    assert [entry["id"] for entry in stats["nodes"]] == [f"n-{web[0].name}"]
    assert device.masters() == [master], "the new worker started a second HAProxy"

    # The adopted HAProxy is reloaded, not replaced.
    port = _serving(device, web)
    device.must_pass({"hpcs_action": "ENABLE"})
    assert master_pid_from_socket(device.master_socket) == master
    assert _pidfile_pid(device) == master
    assert device.masters() == [master]
    assert http_get(port).backend in NAMES
