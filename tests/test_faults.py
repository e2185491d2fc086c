"""Faults injected for real around a working device, one test each.

Job servers killed and restarted, HAProxy killed or unable to bind, the
worker SIGKILLed at each step of a config swap, the config file system
full, the statsfile corrupted.  After each: every job still gets a reply,
the config file is the old one or the new one (never partial), what runs
matches the file, and the device serves the next job.
"""
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from support.backends import HttpBackend, TcpEchoBackend
from support.client import GearClient
from support.faults import (Killer, MountRefused, PortHolder, SlowHaproxy, TemplateOracle, Tmpfs,
                            WorkerLog, file_identity, haproxy_check, mode_of)
from support.gearmand import Gearmand
from support.ports import free_port
from support.worker import sudo_ini
from support.device import Device
from support.traffic import (backend_counts, haproxy_processes, http_get, kill_haproxy, lb, node,
                             refuses, socat_sessions, stop_haproxy, tcp_exchange, update, wait_until)

from libra_worker import settings as settings_module

JOB_TIMEOUT = 30.0

# A load balancer setting changes too: only a reload applies it, on every HAProxy
# (3.0 would add and remove the HTTP nodes alone at run time, with no haproxy -c).
RELOADING = {"options": {"client_timeout": 31000}}


@pytest.fixture
def web():
    """Two HTTP back-ends: `old` serves the config before a change, `new` the one after."""
    started = [HttpBackend("fault-old").start(), HttpBackend("fault-new").start()]
    yield started
    for backend in started:
        backend.stop()


def _device(directory, **haproxy_options):
    device = Device(directory)
    device.extra_ini = sudo_ini(**haproxy_options)
    return device


def _staging(device):
    return Path(str(device.config) + ".NEW")


def _server_ids(device, config_text):
    loaded = settings_module.load(["--config", str(device.worker.config_path), "--nodaemon"])
    return sorted(server_id for server_id, _ in TemplateOracle(loaded.haproxy).servers(config_text))


def _without_server_ids(config):
    return re.sub(rb"^(    server \S+ \S+) id [0-9]+ ", rb"\1 ", config, flags=re.M)


def _assert_running_matches_file(device):
    """STATS lists exactly the servers of the config file: HAProxy runs what the file says."""
    reply = device.must_pass({"hpcs_action": "STATS"})
    in_file = _server_ids(device, device.config_bytes().decode())
    assert sorted(entry["id"] for entry in reply["nodes"]) == in_file, (reply["nodes"], in_file)


# ==========================================================================
# Job servers
# ==========================================================================

def test_gearmand_killed_mid_update_and_restarted(tmp_path, web):
    old_web, new_web = web
    slow = SlowHaproxy(tmp_path / "slow")
    device = _device(tmp_path / "device", haproxy=str(slow.path))
    with device:
        log = WorkerLog(device.worker.logfile)
        port = free_port()
        old = update(lb("HTTP", port, [node("old-node", old_web)]))
        new = update(lb("HTTP", port, [node("new-node", new_web)], **RELOADING))
        device.must_pass(old)
        old_bytes = device.config_bytes()
        log.skip_to_end()
        log.mark = len(device.worker.log_text())

        slow.set_delay(2)
        device.client.send(device.name, new)  # its client and its job server are about to go
        slow.wait_checking()
        device.gearmand.kill()                # SIGKILL while the UPDATE is in haproxy -c
        device.gearmand.start()
        slow.set_delay(0)

        # The worker finishes the job it holds and cannot deliver the reply; nothing is lost
        # on the device: the file is the old or the new one, and HAProxy runs the file.
        _, jobs = log.wait_job_lines(1, timeout=JOB_TIMEOUT)
        assert jobs[0].group("status") in ("PASS", "FAIL")
        assert device.worker.alive(), device.worker.diagnosis()
        after = device.config_bytes()

        device.client.close()
        device.client = GearClient([device.gearmand])  # a client of the restarted job server
        device.must_pass({"hpcs_action": "DISCOVER"}, timeout=JOB_TIMEOUT)
        since_fault = device.worker.log_text()[log.mark:]
        assert "Traceback" not in since_fault, \
            f"a traceback after the job server restarted: {since_fault[since_fault.find('Traceback') - 300:][:900]}"
        _assert_running_matches_file(device)
        device.must_pass(new)
        new_bytes = device.config_bytes()
        assert after in (old_bytes, new_bytes), "the config is neither the old nor the new one"
        assert backend_counts(port, 3) == {new_web.name: 3}
        assert haproxy_check(device.config).returncode == 0


def test_one_of_two_job_servers_down_for_a_while(tmp_path, gearmand, worker):
    second = Gearmand(tmp_path / "gearmand-2").start()
    try:
        process = worker(servers=[gearmand, second])
        with GearClient([gearmand]) as first_client:
            second.kill()
            started = time.monotonic()
            served = 0
            while time.monotonic() - started < 4.0:  # two reconnect attempts or more (backoff cap 2 s)
                began = time.monotonic()
                reply = first_client.submit(process.name, {"hpcs_action": "DISCOVER", "n": served},
                                            timeout=JOB_TIMEOUT, alive=process.alive)
                assert reply["hpcs_response"] == "PASS" and reply["n"] == served
                assert time.monotonic() - began < 2.0, "a job waited on the job server that is down"
                served += 1
                time.sleep(0.2)
            assert served >= 10

            second.start()
            with GearClient([second]) as second_client:
                reply = second_client.submit(process.name, {"hpcs_action": "DISCOVER"},
                                             timeout=JOB_TIMEOUT, alive=process.alive)
            assert reply["hpcs_response"] == "PASS"
            reply = first_client.submit(process.name, {"hpcs_action": "DISCOVER"}, timeout=JOB_TIMEOUT)
            assert reply["hpcs_response"] == "PASS"
        # An outage is news, not noise: a line or two about it, not one per reconnect attempt.
        about_second = [line for line in process.log_text().splitlines()
                        if second.address in line and " WARNING " in line]
        assert 1 <= len(about_second) <= 2, about_second
    finally:
        second.stop()


# ==========================================================================
# HAProxy
# ==========================================================================

def test_haproxy_killed_behind_the_workers_back(tmp_path, web):
    with _device(tmp_path) as device:
        port = free_port()
        message = update(lb("HTTP", port, [node(f"n-{b.name}", b) for b in web]))
        device.must_pass(message)
        assert set(backend_counts(port, 4)) == {b.name for b in web}

        # 1. STATS says so; METRICS stays sane; the next UPDATE brings it back.
        kill_haproxy(device.config)
        wait_until(lambda: refuses(port), timeout=5, what="the dead HAProxy's port to close")
        stats = device.submit({"hpcs_action": "STATS"})
        assert stats["hpcs_response"] == "FAIL", stats
        assert stats.get("hpcs_error", "").strip(), stats
        assert "badRequest" not in stats and stats.get("status") != "DELETED", stats
        metrics = device.must_pass({"hpcs_action": "METRICS"})
        assert all(isinstance(row["bytes_out"], int) and row["bytes_out"] >= 0
                   for row in metrics["loadBalancers"]), metrics
        device.must_pass(message)
        assert set(backend_counts(port, 4)) == {b.name for b in web}
        assert len(device.masters()) == 1
        _assert_running_matches_file(device)

        # 2. ENABLE brings it back.
        kill_haproxy(device.config)
        assert device.submit({"hpcs_action": "STATS"})["hpcs_response"] == "FAIL"
        device.must_pass({"hpcs_action": "ENABLE"})
        assert set(backend_counts(port, 4)) == {b.name for b in web}
        assert len(device.masters()) == 1

        # 3. A worker that restarts brings it back by itself (the device was ACTIVE).
        kill_haproxy(device.config)
        device.restart_worker()
        wait_until(lambda: http_get(port).status == 200, what="HAProxy back after a worker restart")
        assert len(device.masters()) == 1
        _assert_running_matches_file(device)


def test_reload_fails_on_a_port_held_by_another_process(tmp_path, web):
    tcp = TcpEchoBackend("fault-tcp").start()
    try:
        with _device(tmp_path) as device:
            port = free_port()
            http_lb = lb("HTTP", port, [node(f"n-{b.name}", b) for b in web])
            device.must_pass(update(http_lb))
            before = device.config_bytes()
            masters = device.masters()
            held = free_port()
            both = update(http_lb, lb("TCP", held, [node("tcp-node", tcp)]))
            with PortHolder(held):
                for attempt in (1, 2):  # a failed reload leaves the device fit for the next try
                    reply = device.submit(both)
                    assert reply["hpcs_response"] == "FAIL", f"attempt {attempt}: {reply}"
                    error = reply.get("hpcs_error", "")
                    assert re.search(r"bind|address already in use|port", error, re.I), error
                    assert "restored" in error, error
                    assert "badRequest" not in reply
                    assert device.config_bytes() == before, f"attempt {attempt} changed the config"
                    assert set(backend_counts(port, 4)) == {b.name for b in web}
                    assert device.masters() == masters
                    _assert_running_matches_file(device)
            device.must_pass(both)
            assert tcp_exchange(held, b"x") == ("fault-tcp", b"x")
    finally:
        tcp.stop()


# ==========================================================================
# The worker SIGKILLed in the middle of an UPDATE
# ==========================================================================

KILL_POINTS = {
    # haproxy -c of the candidate is running (the wrapper sleeps there)
    "validating": lambda device, slow, live: slow.checking(),
    # `cp live live.BKUP` has created the backup
    "backed-up": lambda device, slow, live: device.backup.exists(),
    # `cp candidate live.NEW` has created the staged copy
    "staged": lambda device, slow, live: _staging(device).exists(),
    # `mv live.NEW live` happened: the reload is next
    "swapped": lambda device, slow, live: file_identity(device.config) != live,
}


@pytest.fixture
def tcp_pair():
    started = [TcpEchoBackend("fault-tcp-a").start(), TcpEchoBackend("fault-tcp-b").start()]
    yield started
    for backend in started:
        backend.stop()


def _serving_names(port, protocol):
    """The back-end names three new connections to the load balancer reach."""
    if protocol == "HTTP":
        return set(backend_counts(port, 3))
    return {tcp_exchange(port)[0] for _ in range(3)}


def test_a_candidate_haproxy_refuses_changes_nothing(tmp_path, web):
    """`haproxy -c` says no: FAIL with its ALERT, and everything the worker did while the
    check ran (backup, staged copy, the stats session held for the reload) is undone."""
    slow = SlowHaproxy(tmp_path / "slow")
    device = _device(tmp_path / "device", haproxy=str(slow.path))
    with device:
        port = free_port()
        old_web, new_web = web
        old = update(lb("HTTP", port, [node("old-node", old_web)]))
        new = update(lb("HTTP", port, [node("new-node", new_web)], **RELOADING))
        device.must_pass(old)
        before = device.config_bytes()
        processes = set(haproxy_processes(device.config))
        slow.set_reject(True)
        for attempt in (1, 2):
            reply = device.submit(new)
            assert reply["hpcs_response"] == "FAIL", f"attempt {attempt}: {reply}"
            assert reply["hpcs_error"].startswith("haproxy rejected the configuration: [ALERT]"), reply
            assert "wrapper refuses every candidate" in reply["hpcs_error"], reply
            assert "badRequest" not in reply
            assert device.config_bytes() == before
            assert not _staging(device).exists(), "the refused candidate is left staged"
            assert backend_counts(port, 3) == {old_web.name: 3}
            assert set(haproxy_processes(device.config)) == processes, "HAProxy was reloaded"
            wait_until(lambda: not socat_sessions(device.stats_socket), 5,
                       what="the stats session held during the check to be closed")
        # The node stays and only a setting changes: its health is saved while the check
        # runs, and a refused check must leave none of it for a later start.
        kept = update(lb("HTTP", port, [node("old-node", old_web)], **RELOADING))
        state_file = device.statsfile.parent / "haproxy.server-state"
        reply = device.submit(kept)
        assert reply["hpcs_response"] == "FAIL" and "wrapper refuses" in reply["hpcs_error"], reply
        assert state_file.read_text() == "1\n", "health saved for a reload that never came"
        slow.set_reject(False)
        device.must_pass(new)
        assert backend_counts(port, 3) == {new_web.name: 3}
        assert device.backup.read_bytes() == before


@pytest.mark.parametrize("point,protocol", [(point, "HTTP") for point in KILL_POINTS]
                         + [("swapped", "TCP")],
                         ids=[f"{point}-reload" for point in KILL_POINTS] + ["swapped-runtime"])
def test_worker_killed_mid_update(tmp_path, web, tcp_pair, point, protocol):
    """HTTP: a node replaced, so the swap ends in a reload.  TCP: a node added, which the
    worker applies through HAProxy's runtime API right after the swap."""
    slow = SlowHaproxy(tmp_path / "slow")
    device = _device(tmp_path / "device", haproxy=str(slow.path))
    with device:
        port = free_port()
        if protocol == "HTTP":
            old_web, new_web = web
            old = update(lb("HTTP", port, [node("old-node", old_web)]))
            new = update(lb("HTTP", port, [node("new-node", new_web)], **RELOADING))
            old_names, new_names = {old_web.name}, {new_web.name}
        else:
            old = update(lb("TCP", port, [node("tcp-a", tcp_pair[0])]))
            new = update(lb("TCP", port, [node("tcp-a", tcp_pair[0]), node("tcp-b", tcp_pair[1])]))
            old_names = new_names = {tcp_pair[0].name, tcp_pair[1].name}
        device.must_pass(old)
        old_bytes = device.config_bytes()
        assert not device.backup.exists() and not _staging(device).exists()

        slow.set_delay(1.0 if point == "validating" else 0)
        condition = KILL_POINTS[point]
        live_identity = file_identity(device.config)
        killer = Killer(device.worker.pid, lambda: condition(device, slow, live_identity))
        killer.start()
        job = device.client.send(device.name, new)
        assert killer.wait(), f"the worker never reached '{point}'"
        device.worker.proc.wait(5)
        slow.set_delay(0)

        # While what the dead worker started finishes (sudo cp/mv, haproxy -c), and after:
        # the live file is always whole, the old or the new one.
        samples = []
        settle = time.monotonic() + 1.0
        while time.monotonic() < settle:
            samples.append(device.config_bytes())
            time.sleep(0.005)
        slow.wait_idle()
        samples.append(device.config_bytes())
        assert not refuses(port), "HAProxy stopped serving when the worker died"

        # A restarted worker serves: gearmand hands it the interrupted job again.
        device.start_worker()
        reply = device.client.wait(job, JOB_TIMEOUT, alive=device.worker.alive)
        assert json.loads(reply)["hpcs_response"] == "PASS", reply
        new_bytes = device.config_bytes()
        assert new_bytes != old_bytes
        # Whole configs compare without server ids: a restarted worker numbers them afresh.
        whole = {_without_server_ids(old_bytes), _without_server_ids(new_bytes)}
        partial = [sample[:80] for sample in samples if _without_server_ids(sample) not in whole]
        assert not partial, f"a config that is neither old nor new after a kill at '{point}': {partial[:2]}"
        if point == "validating":  # the only point the test holds the worker at for sure
            assert samples[0] == old_bytes, "killed while validating, yet the live file changed"
        assert not _staging(device).exists(), "config.NEW left behind after a good UPDATE"
        assert _serving_names(port, protocol) <= new_names
        _assert_running_matches_file(device)

        device.must_pass(old)  # and the next job
        # The same servers; their ids follow the history (old-node takes an id the new nodes left free).
        assert _without_server_ids(device.config_bytes()) == _without_server_ids(old_bytes)
        assert _serving_names(port, protocol) <= old_names
        _assert_running_matches_file(device)


# ==========================================================================
# The config directory's file system full
# ==========================================================================

@pytest.mark.parametrize("room", ["nothing", "backup-only"])
def test_config_file_system_full(tmp_path, web, room):
    """No room left where the config lives: FAIL, the live file untouched, no half-written file."""
    old_web, new_web = web
    config_dir = tmp_path / "config-fs"
    filesystem = Tmpfs(config_dir, size="64k")
    try:
        filesystem.start()
    except MountRefused as error:
        pytest.skip(f"!!! NOT TESTED: the config file system full fault needs "
                    f"`mount -t tmpfs`, refused here: {error} !!!")
    config = config_dir / "haproxy.cfg"
    device = _device(tmp_path / "device", config=str(config))
    try:
        device.start()
        port = free_port()
        old = update(lb("HTTP", port, [node("old-node", old_web)]))
        new = update(lb("HTTP", port, [node("new-node", new_web)], **RELOADING))
        if room == "backup-only":
            device.must_pass(new)  # then old: a .BKUP exists, and overwriting it needs no new room
        device.must_pass(old)
        old_bytes = config.read_bytes()
        backup = Path(str(config) + ".BKUP")
        staging = Path(str(config) + ".NEW")
        backup_before = backup.read_bytes() if backup.exists() else None
        if room == "backup-only":
            assert backup.exists()
        filler = filesystem.fill()

        reply = device.submit(new)
        assert reply["hpcs_response"] == "FAIL", reply
        assert re.search(r"space", reply.get("hpcs_error", ""), re.I), reply.get("hpcs_error")
        assert config.read_bytes() == old_bytes
        assert backend_counts(port, 3) == {old_web.name: 3}
        _assert_running_matches_file_at(device, config)
        left = sorted(path.name for path in config_dir.iterdir())
        assert not staging.exists(), f"a half-written {staging.name} is left: {left}"
        if backup.exists():
            assert backup.read_bytes() in (old_bytes, backup_before), \
                f"a half-written {backup.name} ({backup.stat().st_size} bytes) is left"

        filler.unlink()
        device.must_pass(new)
        assert backend_counts(port, 3) == {new_web.name: 3}
        assert not staging.exists()
    finally:
        device.stop()
        stop_haproxy(config)
        filesystem.stop()


def _assert_running_matches_file_at(device, config):
    reply = device.must_pass({"hpcs_action": "STATS"})
    assert sorted(entry["id"] for entry in reply["nodes"]) == _server_ids(device, config.read_text())


# ==========================================================================
# The statsfile corrupted or unreadable
# ==========================================================================

def _write(text):
    return lambda path: path.write_bytes(text)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _negative(path):
    state = json.loads(path.read_text())
    state["carried"] = {"HTTP": -5}
    path.write_text(json.dumps(state))


def _directory(path):
    path.unlink()
    path.mkdir()
    (path / "inside").write_text("not a ledger")


CORRUPTIONS = {
    "garbage": _write(b"\x00\x01 this is not json \xff\xfe"),
    "truncated": _truncate,
    "empty": _write(b""),
    "not-an-object": _write(b"[1, 2, 3]"),
    "negative-counter": _negative,
    # A directory (or a FIFO, a link) there is no corrupt ledger but an odd file:
    # the worker refuses to start and names it (tests/test_safe_files.py).
}


def _bytes_out(reply, protocol="http"):
    rows = [row["bytes_out"] for row in reply["loadBalancers"] if row["protocol"] == protocol]
    assert all(isinstance(value, int) and value >= 0 for value in rows), reply
    return sum(rows)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_statsfile_is_moved_aside_and_metrics_keep_working(tmp_path, web, corruption):
    with _device(tmp_path) as device:
        statsfile = device.haproxy_dir / "haproxy.stats"
        port = free_port()
        device.must_pass(update(lb("HTTP", port, [node("n", web[0])])))
        for _ in range(5):
            assert http_get(port, "/bytes/1000").status == 200
        first = device.must_pass({"hpcs_action": "METRICS"})
        assert _bytes_out(first) >= 5000, first
        assert statsfile.is_file() and mode_of(statsfile) == 0o600

        device.worker.stop()
        CORRUPTIONS[corruption](statsfile)
        damaged = statsfile.read_bytes() if statsfile.is_file() else None
        device.start_worker()

        log = device.worker.log_text()
        assert re.search(r"(ERROR|WARNING) .*statsfile", log), "the bad statsfile was not logged"
        asides = [path for path in device.haproxy_dir.iterdir()
                  if path.name.startswith("haproxy.stats") and path != statsfile]
        assert len(asides) == 1, f"the bad statsfile was not moved aside: {sorted(os.listdir(device.haproxy_dir))}"
        if damaged is not None:
            assert asides[0].read_bytes() == damaged, "what was moved aside is not what was there"
        else:
            assert asides[0].is_dir()

        # METRICS works, and the bytes it had already reported are not reported again.
        again = device.must_pass({"hpcs_action": "METRICS"})
        assert _bytes_out(again) == 0, f"bytes reported before the statsfile broke were reported again: {again}"
        for _ in range(3):
            assert http_get(port, "/bytes/1000").status == 200
        later = device.must_pass({"hpcs_action": "METRICS"})
        assert 3000 <= _bytes_out(later) < 3000 + 5 * 1000, later
        assert later["utc_start"] >= again["utc_end"]
        assert statsfile.is_file() and mode_of(statsfile) == 0o600
        json.loads(statsfile.read_text())
        _assert_running_matches_file(device)


def test_statsfile_unwritable_while_running_metrics_fail_and_keep_the_window(tmp_path, web):
    """A window that cannot be saved is not reported: a restarted worker would report it again."""
    with _device(tmp_path) as device:
        statsfile = device.haproxy_dir / "haproxy.stats"
        port = free_port()
        device.must_pass(update(lb("HTTP", port, [node("n", web[0])])))
        before = device.must_pass({"hpcs_action": "METRICS"})
        log = WorkerLog(device.worker.logfile)
        log.skip_to_end()
        _directory(statsfile)  # the next atomic rename onto it fails

        for _ in range(3):
            assert http_get(port, "/bytes/1000").status == 200
        reply = device.submit({"hpcs_action": "METRICS"})
        assert reply["hpcs_response"] == "FAIL", reply
        assert "statsfile" in reply["hpcs_error"] and "not moved" in reply["hpcs_error"], reply
        assert "badRequest" not in reply and "loadBalancers" not in reply, reply
        lines, _ = log.wait_job_lines(1)
        assert any("statsfile" in line and " ERROR " in line for line in lines), lines
        assert not any(path.name.startswith((".statsfile-", ".haproxy.stats.")) and path.name.endswith(".tmp")
                       or path.name.startswith(".statsfile-") for path in device.haproxy_dir.iterdir()), \
            "temporary statsfiles left behind"

        shutil.rmtree(statsfile)  # writable again: the next METRICS reports those bytes, once
        reply = device.must_pass({"hpcs_action": "METRICS"})
        assert 3000 <= _bytes_out(reply) < 3000 + 5 * 1000, reply
        assert reply["utc_start"] == before["utc_end"], (before, reply)
        reply = device.must_pass({"hpcs_action": "METRICS"})
        assert _bytes_out(reply) < 1000, "bytes counted twice"
