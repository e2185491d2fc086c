"""A job server SIGKILLed during a fan-out costs no worker (issue 14, the small fleet).

A handful of workers on two real gearmands; the admin API's fan-out
(STATS, METRICS, DIAGNOSTICS to every device at once, a poll time-out, one
retry of what did not come back) while one gearmand is SIGKILLed and
restarted, several times over.  No worker exits, every job lost with the
dead server is answered through the other one on retry, and every worker
is registered on the restarted server again within reconnect_sleep + 10 s.
"""
import time

import pytest

from support.client import GearClient
from support.gearmand import Gearmand

# scripts/test runs these once, where HAProxy cannot run (scripts/without-haproxy).
pytestmark = pytest.mark.no_haproxy

WORKERS = 4
CYCLES = 4
RECONNECT_SLEEP = 3
POLL_TIMEOUT = 10.0
ACTIONS = ("STATS", "METRICS", "DIAGNOSTICS")


def fan_out(client, names):
    """Submit every (name, action) at once; the jobs the server still owes after the poll time-out."""
    jobs = {}
    for name in names:
        for action in ACTIONS:
            try:
                jobs[(name, action)] = client.send(name, {"hpcs_action": action}, timeout=5)
            except Exception:  # the submitting server is the one being killed
                jobs[(name, action)] = None
    return jobs


def unanswered(jobs, deadline):
    """Wait until each job is complete or lost, or the poll time-out; the keys without a reply."""
    missing = []
    for key, job in jobs.items():
        while job is not None and not job.complete and not job.disconnected and time.monotonic() < deadline:
            time.sleep(0.005)
        if job is None or not job.complete or job.failure:
            missing.append(key)
    return missing


def test_a_gearmand_killed_mid_fan_out_costs_no_worker(tmp_path, worker, gearmand):
    second = Gearmand(tmp_path / "second").start()
    try:
        processes = [worker(servers=[gearmand, second],
                            extra_ini={"gearman": {"reconnect_sleep": RECONNECT_SLEEP}})
                     for _ in range(WORKERS)]
        names = [process.name for process in processes]
        retried_total = 0
        for cycle in range(CYCLES):
            victim, survivor = (gearmand, second) if cycle % 2 == 0 else (second, gearmand)
            with GearClient([victim]) as doomed:
                jobs = fan_out(doomed, names)
                time.sleep(0.002 * cycle)  # a different point of the fan-out each cycle
                victim.kill()
                missing = unanswered(jobs, time.monotonic() + POLL_TIMEOUT)
            # Libra's admin API retries what did not come back, once, on what is left.
            with GearClient([survivor]) as retry:
                for name, action in missing:
                    reply = retry.submit(name, {"hpcs_action": action}, timeout=POLL_TIMEOUT)
                    assert reply["hpcs_action"] == action and reply["hpcs_response"] in ("PASS", "FAIL"), reply
            retried_total += len(missing)
            for process in processes:
                assert process.alive(), f"cycle {cycle}: worker {process.name} exited: {process.diagnosis()}"
            restarted = time.monotonic()
            victim.start()
            deadline = restarted + RECONNECT_SLEEP + 10
            while True:
                status = victim.status()
                registered = [name for name in names if status.get(name, (0, 0, 0))[2] >= 1]
                if len(registered) == len(names):
                    break
                assert time.monotonic() < deadline, \
                    f"cycle {cycle}: only {registered} registered again on {victim.address} after " \
                    f"{time.monotonic() - restarted:.1f}s"
                time.sleep(0.1)
        assert retried_total > 0, "no job was ever lost with a killed server: the kill came too late to test"
        for process in processes:
            assert "Traceback" not in process.log_text(), process.diagnosis()
            assert process.stop() == 0
    finally:
        second.stop()
