"""One misbehaving job server next to a real gearmand costs its own connection only (issue 14).

For each behaviour of tests/support/hostile.py, a worker serves
`[gearmand, hostile]` and, over a window:
- the real gearmand's DISCOVER jobs, one a second, are each answered within 2 s;
- the worker's RSS stays under 100 MB and its CPU under half a core;
- its log grows by less than 200 KB and names the bad server;
- a foreign job is never run (its DELETE does not happen);
then SIGTERM makes it exit 0 within 10 s.

Deadlines are shortened through the real options (`[gearman] timeout`,
`probe_interval`) so each behaviour is met within the window; the backoff
cap is the default 60 s.  Set LIBRA_HOSTILE_FIGURES=FILE to append each
scenario's worst real-server latency as a JSON line.
"""
import json
import os
import threading
import time

import pytest

from support.client import GearClient
from support.faults import cpu_seconds, rss_kib
from support.hostile import BEHAVIOURS, HostileJobServer
from support.ports import free_port

WINDOW = 12.0          # seconds of DISCOVER, one a second
ANSWER_WITHIN = 2.0
RSS_LIMIT_KIB = 100 * 1024
CPU_LIMIT = 0.5        # cores
LOG_GROWTH_LIMIT = 200 * 1024
HOSTILE_INI = {"gearman": {"reconnect_sleep": 60, "timeout": 3, "probe_interval": 4}}


class Prober(threading.Thread):
    """DISCOVER through the real gearmand once a second; records each round trip."""

    def __init__(self, client, name, alive):
        super().__init__(daemon=True)
        self.client, self.name, self.alive = client, name, alive
        self.latencies, self.failures = [], []
        self.done = threading.Event()

    def run(self):
        number = 0
        while not self.done.is_set():
            started = time.monotonic()
            number += 1
            try:
                reply = self.client.submit(self.name, {"hpcs_action": "DISCOVER", "n": number},
                                           timeout=10, alive=self.alive)
                if reply.get("hpcs_response") != "PASS" or reply.get("n") != number:
                    self.failures.append(f"DISCOVER {number}: {reply}")
            except (AssertionError, TimeoutError) as error:
                self.failures.append(f"DISCOVER {number}: {error}")
            elapsed = time.monotonic() - started
            self.latencies.append(elapsed)
            self.done.wait(max(0.0, 1.0 - elapsed))


def _record(behaviour, worst, extra=None):
    path = os.environ.get("LIBRA_HOSTILE_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps({"behaviour": behaviour, "worst_real_latency_s": round(worst, 4),
                                     **(extra or {})}) + "\n")


def watch(process, gearmand, window=WINDOW):
    """Run the DISCOVER prober for `window` seconds; returns (prober, peak RSS KiB, CPU cores)."""
    with GearClient([gearmand]) as client:
        prober = Prober(client, process.name, process.alive)
        cpu_before, started = cpu_seconds(process.pid), time.monotonic()
        peak = 0
        prober.start()
        while time.monotonic() - started < window:
            assert process.alive(), f"the worker exited: {process.diagnosis()}"
            peak = max(peak, rss_kib(process.pid))
            time.sleep(0.25)
        cores = (cpu_seconds(process.pid) - cpu_before) / (time.monotonic() - started)
        prober.done.set()
        prober.join(15)
    return prober, peak, cores


def assert_unharmed(process, gearmand, hostile, log_before, window=WINDOW):
    prober, peak, cores = watch(process, gearmand, window)
    worst = max(prober.latencies)
    _record(hostile.behaviour, worst, {"rss_mib": round(peak / 1024, 1), "cpu_cores": round(cores, 3)})
    assert not prober.failures, prober.failures
    assert len(prober.latencies) >= window - 2, prober.latencies
    assert worst <= ANSWER_WITHIN, f"{hostile.behaviour}: a real DISCOVER took {worst:.2f}s ({prober.latencies})"
    assert peak < RSS_LIMIT_KIB, f"{hostile.behaviour}: RSS reached {peak / 1024:.0f} MB"
    assert cores < CPU_LIMIT, f"{hostile.behaviour}: the worker used {cores:.2f} cores"
    log = process.log_text()
    grown = len(log.encode()) - log_before
    assert grown < LOG_GROWTH_LIMIT, f"{hostile.behaviour}: the log grew by {grown} bytes"
    assert "Traceback" not in log, log[log.find("Traceback") - 200:][:1500]
    about = [line for line in log.splitlines() if hostile.address in line]
    assert about, f"{hostile.behaviour}: the log never names {hostile.address}: {log[-2000:]}"
    return about


def assert_sigterm_exits_0(process):
    started = time.monotonic()
    status = process.stop(timeout=10)
    took = time.monotonic() - started
    assert status == 0 and took < 10, f"SIGTERM: exit {status} after {took:.1f}s: {process.diagnosis()}"


# Behaviours and what the one line about the bad server must say.
EXPECTED = {
    "half_assign": "not the rest",
    "trickle": "not the rest",
    "never_reads": "did not take",
    "huge_header": "declares 2147483648 bytes",
    "garbage": "magic",
    "max_length": "declares 4294967295 bytes",
    "missing_fields": "2 of its 4 fields",
    "accept_close": "closed by the job server",
    "foreign_job": "did not register",
    "silent": "did not answer GRAB_JOB_UNIQ",
    "silent_after_no_job": "did not answer ECHO_REQ",
    "noop_flood": "NOOP flood",
    "wakeup_flood": "NOOP flood",
    "error_packet": "ERR_HOSTILE",
    "unsolicited_assign": "without a GRAB_JOB_UNIQ",
}


@pytest.mark.no_haproxy
def test_every_behaviour_has_an_expectation():
    assert sorted(EXPECTED) == BEHAVIOURS


@pytest.mark.parametrize("behaviour", sorted(set(BEHAVIOURS) - {"accept_close", "foreign_job"}))
@pytest.mark.no_haproxy
def test_hostile_server_next_to_a_real_one(worker, gearmand, behaviour):
    name = f"hostile-{behaviour}-{free_port()}"
    rcvbuf = 4096 if behaviour == "never_reads" else None
    with HostileJobServer(behaviour, function=name, rcvbuf=rcvbuf) as hostile:
        process = worker(servers=[gearmand, hostile.address], name=name, extra_ini=HOSTILE_INI)
        log_before = len(process.log_text().encode())
        about = assert_unharmed(process, gearmand, hostile, log_before)
        assert any(EXPECTED[behaviour] in line for line in about), \
            f"{behaviour}: no line says {EXPECTED[behaviour]!r}: {about}"
        assert len(about) <= 6, f"{behaviour}: {len(about)} lines about the bad server: {about}"
        assert_sigterm_exits_0(process)


@pytest.mark.no_haproxy
def test_accept_then_close_is_retried_with_backoff(worker, gearmand):
    window = 40.0
    with HostileJobServer("accept_close") as hostile:
        process = worker(servers=[gearmand, hostile.address], extra_ini=HOSTILE_INI)
        log_before = len(process.log_text().encode())
        started = time.monotonic()
        about = assert_unharmed(process, gearmand, hostile, log_before, window=window)
        later = [t for t in hostile.connect_times if t >= started + 5]
        per_minute = len(later) * 60 / (window - 5)
        assert per_minute <= 10, f"{len(later)} connections in {window - 5:.0f}s: {hostile.connect_times}"
        assert len(about) <= 2, about
        assert_sigterm_exits_0(process)


def test_foreign_job_is_refused_and_not_run(worker, gearmand, gear_client):
    """A DELETE for another device, assigned by a hostile server: WORK_FAIL, and the LB keeps serving."""
    name = f"hostile-foreign-{free_port()}"
    with HostileJobServer("foreign_job", function=name) as hostile:
        process = worker(servers=[gearmand, hostile.address], name=name, extra_ini=HOSTILE_INI)
        port = free_port()
        update = {"hpcs_action": "UPDATE", "loadBalancers": [{
            "protocol": "HTTP", "port": port,
            "nodes": [{"id": "n1", "address": "127.0.0.1", "port": free_port()}]}]}
        assert gear_client.submit(name, update, 30)["hpcs_response"] == "PASS"
        log_before = len(process.log_text().encode())
        assert_unharmed(process, gearmand, hostile, log_before)
        assert b"H:hostile:foreign" in hostile.packets_of(14), \
            f"the foreign job got no WORK_FAIL: {hostile.seen[:10]}"
        assert not [body for body in hostile.packets_of(13) if body.startswith(b"H:hostile:foreign")]
        stats = gear_client.submit(name, {"hpcs_action": "STATS"}, 30)
        assert stats.get("status") != "DELETED" and stats["hpcs_response"] == "PASS", stats
        assert os.path.exists(process.sections["worker:haproxy"]["config"]), "the DELETE ran"
        ran = [line for line in process.log_text().splitlines() if " DELETE " in line and " job " in line]
        assert not ran, ran
        assert_sigterm_exits_0(process)
