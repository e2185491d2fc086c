"""A fleet on one machine: N devices on two gearmand, the admin API's fan-out, a job server crash.

    bench/fleet [--devices N] [--rounds R] [--keep]

N devices (default 50), each a libra_worker with its own HAProxy (process
mode, one HTTP load balancer over a shared back-end), all registered on two
gearmand, everything on 127.0.0.1.  The fan-out is the one Libra's admin API
does: STATS, METRICS and DIAGNOSTICS to every device at once
(`submit_multiple_jobs`), a poll time-out, then one retry of what did not
come back.  The floor is the same fan-out to N bare gear workers that each
read their device's stats socket once per job (bench/statsecho.py),
measured in the same run.

Then the crash: a fan-out, and gearmand A SIGKILLed once a third of the
replies are in; what did not come back is retried through B; A restarts.
Reported: workers that exited (must be 0), jobs lost and answered on retry,
seconds until every worker is registered on A again (bound: reconnect_sleep
+ 10 s) and how the reconnects spread (jitter).
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime

import gear

from bench import procs
from bench.gearclient import Client

ACTIONS = ("STATS", "METRICS", "DIAGNOSTICS")
POLL_TIMEOUT = 10.0        # the admin API's poll time-out for a fan-out
RETRY_TIMEOUT = 30.0
RECONNECT_SLEEP = 5


class FanClient(Client):
    """The bench client on every job server; each job's completion time stamped by the reader thread."""

    def __init__(self, servers, client_id="fleet"):
        super().__init__([server.address for server in servers], client_id)

    def _finished(self, job):
        if getattr(job, "done", None) is not None:
            job.finished = time.perf_counter()
        return super()._finished(job)

    def handleDisconnect(self, job):
        job.lost = True  # before the waiter wakes
        return super().handleDisconnect(job)


def fan_out(client, requests, poll_timeout, on_progress=None):
    """Submit every (function, payload) at once → {key: seconds or None (no reply in time)}."""
    jobs = {}
    started = time.perf_counter()
    for key, (function, payload) in requests.items():
        job = gear.Job(function.encode(), payload)
        job.done, job.lost, job.finished = threading.Event(), False, None
        job.started = time.perf_counter()
        try:
            client.submitJob(job, timeout=5)
        except gear.GearmanError:
            job.lost = True
            job.done.set()
        jobs[key] = job
        if on_progress is not None:   # the crash may come while the fan-out is still being sent
            on_progress(sum(1 for sent in jobs.values() if sent.done.is_set()), len(requests))
    deadline = started + poll_timeout
    pending = dict(jobs)
    while pending and time.perf_counter() < deadline:
        for key in [key for key, job in pending.items() if job.done.is_set()]:
            del pending[key]
        if on_progress is not None:
            on_progress(len(jobs) - len(pending), len(jobs))
        time.sleep(0.001)
    wall = time.perf_counter() - started
    results = {}
    for key, job in jobs.items():
        answered = job.done.is_set() and job.complete and not job.failure and not job.lost
        results[key] = (job.finished - job.started) if answered else None
    return results, wall


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))] if ordered else float("nan")


def registered(gearmand, names):
    """The function names with at least one worker on `gearmand` (admin 'status')."""
    try:
        with socket.create_connection((procs.LOOPBACK, gearmand.port), timeout=5) as sock:
            sock.sendall(b"status\n")
            data = b""
            while not data.endswith(b".\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return set()
    found = set()
    for line in data.decode(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and parts[0] in names and int(parts[3]) >= 1:
            found.add(parts[0])
    return found


class Fleet:
    def __init__(self, devices, keep):
        self.count = devices
        self.keep = keep
        self.dir = tempfile.mkdtemp(prefix="libra-fleet-")
        self.gearmands = []
        self.workers = []
        self.echoes = []
        self.backend = None

    def start(self):
        for i in (1, 2):
            os.makedirs(os.path.join(self.dir, f"gearmand-{i}"))
        self.gearmands = [procs.Gearmand(os.path.join(self.dir, f"gearmand-{i}")).start() for i in (1, 2)]
        self.backend = procs.HttpBackend(os.path.join(self.dir, "backend"), "web").start()
        for number in range(self.count):
            worker = procs.LibraWorker(os.path.join(self.dir, f"device-{number}"), self.gearmands,
                                       f"fleet-device-{number}", reconnect_sleep=RECONNECT_SLEEP)
            self.workers.append(worker.start())
        client = FanClient(self.gearmands, "fleet-setup")
        try:
            updates = {}
            for worker in self.workers:
                message = {"hpcs_action": "UPDATE", "loadBalancers": [{
                    "protocol": "HTTP", "port": procs.free_port(),
                    "nodes": [{"id": "1", "address": procs.LOOPBACK, "port": self.backend.port}]}]}
                updates[worker.name] = (worker.name, json.dumps(message).encode())
            results, _ = fan_out(client, updates, 120)
            missing = [name for name, seconds in results.items() if seconds is None]
            if missing:
                raise RuntimeError(f"{len(missing)} devices did not take their UPDATE: {missing[:5]}")
        finally:
            client.shutdown()
        addresses = [server.address for server in self.gearmands]
        for number, worker in enumerate(self.workers):
            echo = procs._Child(os.path.join(self.dir, f"echo-{number}"), "statsecho")
            echo._spawn([procs.PYTHON, "-m", "bench.statsecho", str(worker.stats_socket),
                         f"fleet-echo-{number}", *addresses])
            self.echoes.append(echo)
        names = {f"fleet-echo-{number}" for number in range(self.count)}
        procs.wait_for(lambda: all(registered(g, names) == names for g in self.gearmands), 300,
                       "every echo worker registered on both job servers")

    def requests(self, prefix):
        return {(number, action): (f"{prefix}-{number}", json.dumps({"hpcs_action": action}).encode())
                for number in range(self.count) for action in ACTIONS}

    def stop(self):
        for child in self.echoes + self.workers:
            try:
                child.stop()
            except Exception as error:  # keep stopping the others
                print(f"fleet: could not stop {child.label}: {error}", file=sys.stderr)
        if self.backend is not None:
            self.backend.stop()
        for server in self.gearmands:
            server.stop()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def report_fan_out(label, runs):
    walls = [wall for _, wall in runs]
    latencies = [seconds for results, _ in runs for seconds in results.values() if seconds is not None]
    unanswered = sum(1 for results, _ in runs for seconds in results.values() if seconds is None)
    print(f"  {label:<28} wall {statistics.median(walls) * 1e3:8.1f} ms   p50 {percentile(latencies, .5) * 1e3:7.1f} ms"
          f"   p99 {percentile(latencies, .99) * 1e3:7.1f} ms   unanswered {unanswered}")
    return statistics.median(walls), percentile(latencies, .5), percentile(latencies, .99)


def crash(fleet):
    victim, survivor = fleet.gearmands
    names = {worker.name for worker in fleet.workers}
    client = FanClient(fleet.gearmands, "fleet-crash")
    killed = {}

    def kill_at_a_third(done, total):
        if not killed and done >= total // 3:
            killed["at"] = time.monotonic()
            killed["done"] = done
            os.kill(victim.pid, 9)

    try:
        results, wall = fan_out(client, fleet.requests("fleet-device"), POLL_TIMEOUT, kill_at_a_third)
    finally:
        client.shutdown()
    lost = [key for key, seconds in results.items() if seconds is None]
    retry_client = FanClient([survivor], "fleet-retry")
    try:
        retried, _ = fan_out(retry_client, {key: (f"fleet-device-{key[0]}", json.dumps({"hpcs_action": key[1]}).encode())
                                            for key in lost}, RETRY_TIMEOUT)
    finally:
        retry_client.shutdown()
    still_lost = [key for key, seconds in retried.items() if seconds is None]
    exited = [worker.name for worker in fleet.workers if not worker.running()]
    restarted = time.monotonic()
    victim.kill()       # already dead: forgets its pid and waits for its port to close
    victim.start()
    back = None
    while time.monotonic() - restarted < RECONNECT_SLEEP + 30:
        if registered(victim, names) == names:
            back = time.monotonic() - restarted
            break
        time.sleep(0.1)
    stamps = []
    for worker in fleet.workers:
        try:
            text = (worker.dir / "libra_worker.log").read_text(errors="replace")
        except OSError:
            continue
        found = [line for line in text.splitlines() if victim.address in line and "answers again" in line]
        if found:
            stamps.append(datetime.strptime(found[-1][:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    spread = (max(stamps) - min(stamps)) if len(stamps) > 1 else float("nan")
    print(f"  crash: gearmand {victim.address} SIGKILLed after {killed.get('done', '?')} of {len(results)} replies; "
          f"fan-out wall {wall * 1e3:.0f} ms")
    print(f"  jobs lost with it: {len(lost)}; answered on retry through {survivor.address}: "
          f"{len(lost) - len(still_lost)}; still unanswered: {len(still_lost)}")
    print(f"  workers that exited: {len(exited)} {exited[:5]}")
    bound = RECONNECT_SLEEP + 10
    print(f"  every worker registered on the restarted server after: "
          f"{'never' if back is None else f'{back:.1f} s'} (bound {bound} s: "
          f"{'PASS' if back is not None and back <= bound else 'FAIL'})")
    print(f"  reconnects spread over {spread:.2f} s ({len(stamps)} 'answers again' lines)")
    return not exited and not still_lost and back is not None and back <= bound


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench/fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5, help="fan-out rounds for the figures (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    print(f"bench/fleet: {args.devices} devices on 2 gearmand, {datetime.now().isoformat(timespec='seconds')}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    fleet = Fleet(args.devices, args.keep)
    ok = False
    try:
        started = time.monotonic()
        fleet.start()
        print(f"  set-up: {time.monotonic() - started:.1f} s", flush=True)
        client = FanClient(fleet.gearmands)
        try:
            worker_runs, floor_runs = [], []
            for _ in range(args.rounds):   # interleaved: worker, floor, worker, floor, ...
                worker_runs.append(fan_out(client, fleet.requests("fleet-device"), POLL_TIMEOUT))
                floor_runs.append(fan_out(client, fleet.requests("fleet-echo"), POLL_TIMEOUT))
        finally:
            client.shutdown()
        print(f"  fan-out of {len(ACTIONS)} x {args.devices} jobs, median of {args.rounds} rounds:")
        wall, p50, p99 = report_fan_out("libra_worker fleet", worker_runs)
        floor_wall, floor_p50, floor_p99 = report_fan_out("floor (gear + 1 stats read)", floor_runs)
        print(f"  ratio: wall {wall / floor_wall:.2f}x, p50 {p50 / floor_p50:.2f}x, p99 {p99 / floor_p99:.2f}x")
        ok = crash(fleet)
    except Exception as error:
        print(f"bench/fleet: the harness broke: {type(error).__name__}: {error} (files in {fleet.dir})",
              file=sys.stderr)
        fleet.keep = True
        return 1
    finally:
        fleet.stop()
    print(f"bench/fleet: {'PASS' if ok else 'FAIL'}; load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
