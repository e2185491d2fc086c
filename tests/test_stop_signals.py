"""SIGTERM during start-up or during a job is a first signal: finish, reply, exit 0 (issue 14)."""
import signal
import stat
import time

from support.client import GearClient
from support.faults import SlowHaproxy
from support.hostile import HostileJobServer
from support.ports import free_port
from support.traffic import stop_haproxy
from support.worker import HAPROXY, WorkerProcess


def _update(port):
    return {"hpcs_action": "UPDATE", "loadBalancers": [{
        "protocol": "HTTP", "port": port, "nodes": [{"id": "n1", "address": "127.0.0.1", "port": free_port()}]}]}


def wait_for_line(process, needle, timeout=15):
    deadline = time.monotonic() + timeout
    while needle not in process.log_text():
        assert process.alive(), process.diagnosis()
        assert time.monotonic() < deadline, f"{needle!r} never logged: {process.diagnosis()}"
        time.sleep(0.02)


def test_sigterm_while_haproxy_starts_is_a_first_signal(tmp_path, worker, gearmand, gear_client):
    """The driver brings back an active HAProxy at start-up (here: slowly); SIGTERM then → exit 0."""
    toggle = tmp_path / "slow-start"
    wrapper = tmp_path / "haproxy-slow-start"
    wrapper.write_text(f'#!/bin/sh\n[ -e {toggle} ] && sleep 3\nexec {HAPROXY} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    ini = {"worker:haproxy": {"haproxy": str(wrapper)}}
    first = worker(extra_ini=ini)
    assert gear_client.submit(first.name, _update(free_port()), 30)["hpcs_response"] == "PASS"
    assert first.stop() == 0
    config = first.sections["worker:haproxy"]["config"]
    stop_haproxy(config)                       # HAProxy is down: the next start brings it back

    toggle.touch()
    again = WorkerProcess(first.dir, [gearmand], name=first.name, extra_ini=ini)  # same files
    mark = len(again.log_text())
    again.start()
    try:
        wait_for_line(again, "starting it")        # the driver is starting HAProxy (3 s)
        started = time.monotonic()
        again.proc.send_signal(signal.SIGTERM)
        status = again.wait_exit(15)
        assert status == 0, f"exit {status}: {again.diagnosis()}"
        assert time.monotonic() - started < 10
        log = again.log_text()[mark:]
        assert "second SIGTERM" not in log and "stopped before serving" in log, log[-1500:]
    finally:
        again.stop()
        stop_haproxy(config)


def test_sigterm_during_a_job_next_to_a_silent_server_replies_and_exits_0(tmp_path, worker, gearmand):
    slow = SlowHaproxy(tmp_path / "slow")
    with HostileJobServer("silent") as silent:
        process = worker(servers=[gearmand, silent.address],
                         extra_ini={"worker:haproxy": {"haproxy": str(slow.path)},
                                    "gearman": {"timeout": 3, "reconnect_sleep": 60}})
        slow.set_delay(3)
        with GearClient([gearmand]) as client:
            job = client.send(process.name, _update(free_port()))
            slow.wait_checking()
            started = time.monotonic()
            process.proc.send_signal(signal.SIGTERM)
            reply = client.wait(job, 30)
            status = process.wait_exit(15)
        assert b'"PASS"' in reply, reply
        assert status == 0, process.diagnosis()
        assert time.monotonic() - started < 10
        assert "second" not in process.log_text()
