"""bench/run: every figure of DESIGN.md's Targets, next to its floor, in one run.

The floors are measured in the same run, on the same machine, against the
same gearmand and the same HAProxy; A and B are interleaved round by round
(A B, B A, A B, ...) and each figure is the median of the rounds' medians,
so that load from other processes on the machine hits both sides alike.
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from bench import haproxy, procs
from libra_worker import models
from libra_worker.drivers.haproxy import plan as plans
from bench.gearclient import Client, wait_answering
from bench.report import Figure, judge, table, write_json

WORKER_NAME = "bench-device"
ECHO_NAME = "bench-echo"
DISCOVER = {"hpcs_action": "DISCOVER"}
STATS = {"hpcs_action": "STATS"}
METRICS = {"hpcs_action": "METRICS"}
RSS_LIMIT_MB = 40.0
RSS_GROWTH_MB = 1.0          # "no growth": less than this, allocator noise included
LOAD_RATE = 250              # new HTTP connections per second (target: >= 200)
MIN_LOAD_RATE = 200
KEEPALIVE_CLIENTS = 6        # alongside: clients reusing their connections (HTTP keep-alive)
RELOADS = 50
RUNTIME_UPDATES = 50         # UPDATEs adding and removing a node under load (runtime API)
RELOAD_TARGET = 1.1          # an UPDATE that reloads, against the reload floor
RUNTIME_TARGET = 0.4         # an UPDATE of nodes only, against the same floor (HAProxy 3.0)
NODE_CHANGES = ("add", "remove", "weight", "condition", "address")
MAX_NODES = 10_000           # per load balancer (models.MAX_NODES)
SLOW_CHECKS = {"type": "CONNECT", "delay": 3600, "timeout": 1, "attempts": 1}
# A just-reloaded HAProxy 3.0 took 3-5x longer over 1,000 runtime commands for its first
# ~0.3 s (measured): a timed step never starts on one.
FRESH_PROCESS_SETTLE = 0.5
CLIENTS = 4


class Plan:
    """How many rounds of what: full, or --quick (a smoke run, < 60 s)."""

    def __init__(self, quick):
        self.quick = quick
        self.warmup = 50 if quick else 200
        self.rt_rounds = 10 if quick else 30
        self.discover_per_round = 50 if quick else 100
        self.stats_per_round = 10 if quick else 30
        self.tput_rounds = 1 if quick else 3
        self.tput_seconds = 1.0 if quick else 2.0
        self.rss_jobs = 2_000 if quick else 10_000
        self.update_rounds = {10: 3, 1_000: 2, 10_000: 1} if quick else {10: 12, 1_000: 16, 10_000: 4}
        # UPDATEs that change only nodes (add, remove, weight, condition, address), per size
        self.node_rounds = {10: 2, 1_000: 1, 10_000: 1} if quick else {10: 6, 1_000: 4, 10_000: 2}
        self.node_protocols = ("HTTP", "TCP", "GALERA")


def median(values):
    return statistics.median(values)


def spread(values, scale=1e3):
    return f"{min(values) * scale:.2f}..{max(values) * scale:.2f}"


SERVER_ID = re.compile(r"^ +server (\S+) \S+ id (\d+) ", re.M)


def config_server_ids(text, protocol):
    """plan.server_ids' mapping as a config the worker wrote has it (one load balancer)."""
    return {protocol: {name: int(number) for name, number in SERVER_ID.findall(text)}}


def interleave(rounds, sides):
    """sides: {name: callable() -> list of samples}; → {name: [one median per round]}.

    Round r runs the sides in order, reversed on odd rounds (A B, B A, ...).
    """
    names = list(sides)
    medians = {name: [] for name in names}
    for index in range(rounds):
        for name in (names if index % 2 == 0 else list(reversed(names))):
            medians[name].append(median(sides[name]()))
    return medians


def update_message(port, nodes, weight=1, monitor=None, first_node_port=20000, variant=0):
    """One HTTP load balancer with `nodes` back-ends at 127.0.0.1:first_node_port+i.

    `variant` changes the client timeout by a millisecond: a change that only
    a reload can apply (weights alone could be set through the runtime API).
    """
    return {"hpcs_action": "UPDATE", "loadBalancers": [{
        "name": "bench", "protocol": "HTTP", "port": port,
        "options": {"client_timeout": 30000 + variant},
        "monitor": monitor or {"type": "CONNECT", "delay": 3600, "timeout": 1, "attempts": 1},
        "nodes": [{"id": f"node-{i}", "address": "127.0.0.1", "port": first_node_port + i,
                   "weight": weight} for i in range(nodes)]}]}


def node_list(protocol, count, first_port=20000, weight=1, condition="ENABLED", prefix="node"):
    """`count` nodes at 127.0.0.1:first_port+i; GALERA: all but the first are backup."""
    return [{"id": f"{prefix}-{i}", "address": "127.0.0.1", "port": first_port + i, "weight": weight,
             "condition": condition, **({"backup": True} if protocol == "GALERA" and i else {})}
            for i in range(count)]


def node_change_messages(protocol, port, count, change):
    """(A, B): two UPDATEs that differ only by `count` nodes' `change`; A → B is measured."""
    def message(nodes):
        return {"hpcs_action": "UPDATE", "loadBalancers": [{
            "protocol": protocol, "port": port, "monitor": SLOW_CHECKS, "nodes": nodes}]}
    if change in ("add", "remove"):   # beside one node that stays (10,000 at most in all)
        anchor = node_list(protocol, 1, first_port=19999, prefix="anchor")
        few = message(anchor)
        many = message(anchor + [dict(n, backup=True) if protocol == "GALERA" else n
                                 for n in node_list(protocol, min(count, MAX_NODES - 1))])
        return (few, many) if change == "add" else (many, few)
    if change == "weight":
        return message(node_list(protocol, count, weight=2)), message(node_list(protocol, count, weight=3))
    if change == "condition":
        return message(node_list(protocol, count)), message(node_list(protocol, count, condition="DISABLED"))
    return message(node_list(protocol, count)), message(node_list(protocol, count, first_port=40000))


class Bench:
    def __init__(self, plan, workdir):
        self.plan = plan
        self.dir = workdir
        self.figures = []
        self.gearmand = None
        self.worker = None
        self.echo = None
        self.backends = []
        self.client = None
        self.lb_port = procs.free_port()
        self.jobs_since_idle = 0
        self.socat_median = None

    # -- set-up ------------------------------------------------------------
    def setup(self):
        self.gearmand = procs.Gearmand(self.dir).start()
        self.worker = procs.LibraWorker(os.path.join(self.dir, "worker"), self.gearmand, WORKER_NAME).start()
        self.echo = procs.EchoWorker(os.path.join(self.dir, "echo"), self.gearmand, ECHO_NAME).start()
        self.backends = [procs.HttpBackend(os.path.join(self.dir, "backends"), name).start()
                         for name in ("node-a", "node-b", "node-c")]
        self.client = Client(self.gearmand.address)
        for name, process in ((WORKER_NAME, self.worker), (ECHO_NAME, self.echo)):
            try:
                wait_answering(self.client, name, json.dumps(DISCOVER).encode(), alive=process.running)
            except RuntimeError as error:
                raise RuntimeError(f"{error}: {process.stderr_tail()}") from None
        self.update(self.base_lb(1, 2))

    def base_lb(self, weight_a, weight_b, variant=0):
        """The load balancer of the STATS and reload-under-load figures: 2 real back-ends."""
        message = update_message(self.lb_port, 0, variant=variant, monitor={
            "type": "HTTP", "delay": 2, "timeout": 1, "attempts": 2, "path": "/"})
        message["loadBalancers"][0]["nodes"] = [
            {"id": backend.name, "address": "127.0.0.1", "port": backend.port, "weight": weight}
            for backend, weight in zip(self.backends, (weight_a, weight_b))]
        return message

    def teardown(self):
        if self.client is not None:
            self.client.close()
        for process in [self.worker, self.echo, *self.backends]:
            if process is not None:
                process.stop()
        if self.gearmand is not None:
            self.gearmand.stop()

    # -- jobs --------------------------------------------------------------
    def call(self, name, message_bytes, expect_pass=True):
        seconds, reply = self.client.call(name, message_bytes)
        if name == WORKER_NAME:
            self.jobs_since_idle += 1
            if expect_pass and b'"hpcs_response": "PASS"' not in reply:
                raise RuntimeError(f"the worker did not PASS: {reply[:300]!r}")
        return seconds

    def update(self, message):
        seconds, reply = self.client.call_json(WORKER_NAME, message)
        self.jobs_since_idle += 1
        if reply.get("hpcs_response") != "PASS":
            raise RuntimeError(f"UPDATE did not PASS: {reply.get('hpcs_error')}")
        return seconds

    def add(self, figure):
        self.figures.append(figure)
        print(f"  {figure.figure}: {figure.measured:.4g} {figure.unit}"
              + (f" (floor {figure.floor:.4g}, {figure.ratio:.2f}x)" if figure.ratio else "")
              + f" {figure.result}", flush=True)

    # -- figures -----------------------------------------------------------
    def warm_up(self):
        discover, stats = json.dumps(DISCOVER).encode(), json.dumps(STATS).encode()
        for _ in range(self.plan.warmup):
            self.call(WORKER_NAME, discover)
            self.call(ECHO_NAME, discover)
        for _ in range(self.plan.warmup // 10):
            self.call(WORKER_NAME, stats)
            haproxy.socat_show_stat(self.worker.stats_socket)
        time.sleep(0.5)

    def rss_idle(self):
        self.idle_rss = procs.rss_mb(self.worker.pid)
        self.jobs_since_idle = 0
        self.add(Figure("worker RSS, idle", self.idle_rss, "MB", target=f"<= {RSS_LIMIT_MB:g} MB",
                        result=judge(self.idle_rss, RSS_LIMIT_MB),
                        detail="VmRSS of the libra_worker process after start, one UPDATE and the warm-up"))

    @contextlib.contextmanager
    def same_placement(self):
        """Worker and echo on one CPU, gearmand and this client on another (DISCOVER).

        A ping-pong of three processes on two CPUs is faster or slower by where
        the scheduler happens to put each one, and it keeps that for the whole
        run: the same code measured 0.99x to 1.44x by placement alone.  Pinned,
        the worker and its floor are placed alike.  Everything is unpinned after.
        (STATS is left unpinned: a socat spawn dominates it, and the worker's
        socat would share one CPU with the worker while the floor's would not.)
        """
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            yield
            return
        servers, workers = {cpus[0]}, {cpus[1]}
        placement = [(self.gearmand.pid, servers), (os.getpid(), servers),
                     (self.worker.pid, workers), (self.echo.pid, workers)]
        try:
            for pid, chosen in placement:
                procs.set_cpus(pid, chosen)
            yield
        finally:
            for pid, _ in placement:
                procs.set_cpus(pid, set(cpus))

    def discover_rt(self):
        payload = json.dumps(DISCOVER).encode()
        count = self.plan.discover_per_round
        with self.same_placement():
            medians = interleave(self.plan.rt_rounds, {
                "worker": lambda: [self.call(WORKER_NAME, payload) for _ in range(count)],
                "echo": lambda: [self.call(ECHO_NAME, payload) for _ in range(count)]})
        measured, floor = median(medians["worker"]), median(medians["echo"])
        self.add(Figure("DISCOVER round trip", measured * 1e3, "ms", floor * 1e3, measured / floor,
                        "<= 1.2x", judge(measured / floor, 1.2),
                        f"{self.plan.rt_rounds} interleaved rounds x {count} sequential jobs; "
                        f"floor: bench/echo.py (a bare gear worker sending the payload back) "
                        f"on the same gearmand; round medians worker {spread(medians['worker'])} ms, "
                        f"echo {spread(medians['echo'])} ms",
                        {"worker_round_medians_s": medians["worker"], "echo_round_medians_s": medians["echo"]}))

    def stats_rt(self):
        payload = json.dumps(STATS).encode()
        count = self.plan.stats_per_round
        socket_path = self.worker.stats_socket
        medians = interleave(self.plan.rt_rounds, {
            "worker": lambda: [self.call(WORKER_NAME, payload) for _ in range(count)],
            "echo": lambda: [self.call(ECHO_NAME, payload) for _ in range(count)],
            "socat": lambda: [haproxy.socat_show_stat(socket_path)[0] for _ in range(count)]})
        measured = median(medians["worker"])
        floors = [echo + socat for echo, socat in zip(medians["echo"], medians["socat"])]
        floor = median(floors)
        self.socat_median = median(medians["socat"])
        self.add(Figure("STATS round trip", measured * 1e3, "ms", floor * 1e3, measured / floor,
                        "<= 1.5x", judge(measured / floor, 1.5),
                        f"{self.plan.rt_rounds} interleaved rounds x {count} jobs; floor: echo round trip "
                        f"(median {median(medians['echo']) * 1e3:.2f} ms) + one `socat stdio unix-connect:"
                        f"<stats socket>` `show stat` timed as a subprocess (median "
                        f"{self.socat_median * 1e3:.2f} ms); 2 servers behind 1 HTTP load balancer",
                        {"worker_round_medians_s": medians["worker"], "echo_round_medians_s": medians["echo"],
                         "socat_round_medians_s": medians["socat"]}))

    def run_clients(self, name, messages, seconds=None, jobs=None):
        """CLIENTS gearload processes at once → (jobs completed, FAIL replies, seconds)."""
        limit = ["--seconds", str(seconds)] if seconds else ["--jobs", str(jobs)]
        env = dict(os.environ, PYTHONPATH=str(procs.PROJECT))
        children = [subprocess.Popen([procs.PYTHON, "-m", "bench.gearload", self.gearmand.address, name,
                                      json.dumps(messages), *limit],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
                    for _ in range(CLIENTS)]
        try:
            for child in children:   # every client connected: start them together
                if child.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"a gearload client did not start: {child.stderr.read()[-300:]}")
            for child in children:
                child.stdin.write("go\n")
                child.stdin.flush()
            results = []
            for child in children:
                out, err = child.communicate(timeout=600)
                if child.returncode != 0:
                    raise RuntimeError(f"a gearload client failed: {err.strip()[-300:]}")
                results.append(json.loads(out))
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        done = sum(result["jobs"] for result in results)
        failed = sum(result["failed"] for result in results)
        if name == WORKER_NAME:
            self.jobs_since_idle += done
        return done, failed, max(result["seconds"] for result in results)

    def throughput(self):
        seconds = self.plan.tput_seconds
        rates = {}
        for label, message in (("DISCOVER", DISCOVER), ("STATS", STATS)):
            def rate(name, message=message):
                done, failed, elapsed = self.run_clients(name, [message], seconds=seconds)
                if failed:
                    raise RuntimeError(f"{failed} {label} jobs FAILed during the throughput run")
                return [done / elapsed]
            rates[label] = interleave(self.plan.tput_rounds, {"worker": lambda: rate(WORKER_NAME),
                                                               "echo": lambda: rate(ECHO_NAME)})
        worker, echo = median(rates["DISCOVER"]["worker"]), median(rates["DISCOVER"]["echo"])
        common = (f"{CLIENTS} client processes sending jobs back to back for {seconds:g} s, "
                  f"{self.plan.tput_rounds} interleaved round(s); ratio = floor / measured")
        self.add(Figure("DISCOVER jobs/s, 4 clients", worker, "jobs/s", echo, echo / worker, "-", "INFO",
                        f"{common}; floor: the echo worker", {"rates": rates["DISCOVER"]}))
        worker, echo = median(rates["STATS"]["worker"]), median(rates["STATS"]["echo"])
        floor = 1.0 / (1.0 / echo + self.socat_median)
        self.add(Figure("STATS jobs/s, 4 clients", worker, "jobs/s", floor, floor / worker, "-", "INFO",
                        f"{common}; floor: one job at a time costing an echo job (echo worker: "
                        f"{echo:.0f} jobs/s) + one socat show stat ({self.socat_median * 1e3:.2f} ms)",
                        {"rates": rates["STATS"]}))

    def rss_after_jobs(self):
        mix = [DISCOVER] * 8 + [STATS, METRICS]
        missing = self.plan.rss_jobs - self.jobs_since_idle
        if missing > 0:
            done, failed, _ = self.run_clients(WORKER_NAME, mix, jobs=-(-missing // CLIENTS))
            if failed:
                raise RuntimeError(f"{failed} jobs FAILed during the RSS run")
        time.sleep(0.5)
        after = procs.rss_mb(self.worker.pid)
        growth = after - self.idle_rss
        jobs = self.jobs_since_idle
        self.add(Figure(f"worker RSS after {jobs:,} jobs", after, "MB", target=f"<= {RSS_LIMIT_MB:g} MB",
                        result=judge(after, RSS_LIMIT_MB),
                        detail=f"the figures above plus DISCOVER/STATS/METRICS (8:1:1) from {CLIENTS} clients"))
        self.add(Figure(f"worker RSS growth over {jobs:,} jobs", growth, "MB",
                        target=f"< {RSS_GROWTH_MB:g} MB", result="PASS" if growth < RSS_GROWTH_MB else "FAIL",
                        detail=f"VmRSS after minus idle ({self.idle_rss:.1f} MB)"))

    def under_load(self, updates):
        """bench.httpload's load through the load balancer while `updates()` runs → its result."""
        load = subprocess.Popen([procs.PYTHON, "-m", "bench.httpload", str(self.lb_port), str(LOAD_RATE), "300",
                                 str(KEEPALIVE_CLIENTS)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=str(procs.PROJECT)))
        try:
            time.sleep(1.0)
            updates()
            time.sleep(1.0)
        finally:
            out, err = load.communicate("stop\n", timeout=60)
        if load.returncode != 0:
            raise RuntimeError(f"the HTTP load generator failed: {err.strip()[-300:]}")
        return json.loads(out)

    def reloads_under_load(self):
        workers, update_seconds = set(), []

        def updates():
            for index in range(RELOADS):
                weights = (1, 2) if index % 2 else (2, 1)   # every UPDATE a config only a reload applies
                update_seconds.append(self.update(self.base_lb(*weights, variant=1 + index % 2)))
                workers.add(haproxy.current_worker(haproxy.show_proc(self.worker.master_socket)))
                time.sleep(0.05)

        result = self.under_load(updates)
        failed = result["failed"]
        valid = result["rate"] >= MIN_LOAD_RATE and len(workers) == RELOADS
        outcome = ", ".join(f"{key} {value}" for key, value in sorted(result["outcomes"].items()))
        self.add(Figure(f"failed HTTP requests across {RELOADS} UPDATE reloads", failed, "failed",
                        target="0", result="PASS" if failed == 0 and valid else "FAIL",
                        detail=f"{result['requests']} new connections at {result['rate']:.0f}/s "
                               f"(GET /, Connection: close) through HAProxy to 2 back-ends over "
                               f"{result['seconds']:.1f} s while {RELOADS} UPDATEs (weights and client timeout alternating) "
                               f"each PASSed with a new HAProxy worker ({len(workers)} distinct); "
                               f"UPDATE median {median(update_seconds) * 1e3:.0f} ms; outcomes: {outcome}"
                               + (f"; details: {result['details']}" if result["details"] else "")
                               + ("" if valid else f"; INVALID RUN: rate below {MIN_LOAD_RATE}/s or "
                                                   f"not every UPDATE reloaded"),
                        samples=result))
        kept = result["keepalive"]
        self.add(Figure(f"failed keep-alive requests across {RELOADS} UPDATE reloads", kept["failed"], "failed",
                        target="0", result="PASS" if kept["failed"] == 0 and valid else "FAIL",
                        detail=f"at the same time, {kept['clients']} clients sending GET / after GET / on "
                               f"persistent connections ({kept['requests']} requests on {kept['connections']} "
                               f"connections; a new one only after an answer announcing the close); "
                               f"outcomes: {kept['outcomes']}"
                               + (f"; errors: {kept['details']}" if kept["details"] else ""),
                        samples=kept))

    def update_sizes(self):
        for nodes in sorted(self.plan.update_rounds):
            self.update(update_message(self.lb_port, nodes, weight=3, variant=3))   # warm-up: this size
            self.update_figure(nodes, self.plan.update_rounds[nodes])

    def current_worker(self):
        return haproxy.current_worker(haproxy.show_proc(self.worker.master_socket))

    def only_worker(self, timeout=10.0):
        """Wait until the workers of earlier reloads are gone (no old process busy beside
        a timed step) → the one HAProxy worker."""
        deadline = time.monotonic() + timeout
        while True:
            state = haproxy.show_proc(self.worker.master_socket)
            if state is not None and len(state.workers) == 1:
                return state.workers[0][0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"old HAProxy workers still running after {timeout:g}s")
            time.sleep(0.01)

    def install_config(self, text):
        """The live config file := text (atomically), behind the worker's back."""
        staged = self.worker.config.with_name("bench-floor.cfg")
        staged.write_text(text)
        os.replace(staged, self.worker.config)

    def update_figure(self, nodes, rounds):
        """UPDATE round trips (A) interleaved with haproxy -c + reload of the config they wrote (B).

        Each UPDATE also moves the client timeout, a change only a reload applies.
        """
        port, counter = self.lb_port, [0]

        def worker_side():
            counter[0] += 1
            flip = 1 + counter[0] % 2
            before = self.current_worker()
            seconds = self.update(update_message(port, nodes, weight=flip, variant=flip))
            if self.current_worker() == before:
                raise RuntimeError(f"an UPDATE of {nodes} nodes did not reload HAProxy: "
                                   f"not comparable with the floor")
            return [seconds]

        def floor_side():
            return [haproxy.check_and_reload(self.worker.config, self.worker.master_socket)]

        medians = interleave(rounds, {"worker": worker_side, "floor": floor_side})
        measured, floor = median(medians["worker"]), median(medians["floor"])
        self.add(Figure(f"UPDATE round trip, {nodes:,} nodes, reload", measured * 1e3, "ms", floor * 1e3,
                        measured / floor, f"<= {RELOAD_TARGET:g}x", judge(measured / floor, RELOAD_TARGET),
                        f"{rounds} interleaved round(s); UPDATEs: each a config only a reload applies (weights "
                        f"and client timeout alternating); floor: `haproxy -c -f` of the config the worker wrote "
                        f"+ `reload` on the same master CLI + `show proc` every {haproxy.POLL_INTERVAL * 1e3:g} ms "
                        f"until the new worker; worker {spread(medians['worker'])} ms, floor "
                        f"{spread(medians['floor'])} ms",
                        {"worker_s": medians["worker"], "floor_s": medians["floor"]}))

    def node_changes(self):
        """Every node-level change, per protocol and size, against the reload floor of the same config."""
        port = procs.free_port()
        for count in sorted(self.plan.node_rounds):
            for protocol in self.plan.node_protocols:
                for change in NODE_CHANGES:
                    self.node_change_figure(protocol, port, count, change, self.plan.node_rounds[count])
        self.update(self.base_lb(1, 2))   # what the other steps expect

    def node_change_figure(self, protocol, port, count, change, rounds):
        """A → B (the change) timed, interleaved with the bare tools' A → B: haproxy -c + reload of B's config.

        Both sides start from HAProxy running A (applied by the worker, untimed), so a row
        that removes 9,999 nodes compares the same transition on both sides: retiring the
        10,000-server process is in the floor too.
        """
        before_message, after_message = node_change_messages(protocol, port, count, change)
        paths = []
        self.update(before_message)
        before_config = self.worker.config.read_text()
        self.update(after_message)
        after_config = self.worker.config.read_text()   # what the worker writes for B, ids and all
        # HAProxy's own share of the runtime path: the commands the worker's planner makes,
        # with the server ids the worker wrote, sent over a bare socket.  Also for rows the
        # planner reloads (its cost estimate set aside): what the runtime API would have cost.
        lbs_a, lbs_b = models.parse_update(before_message), models.parse_update(after_message)
        running = plans.Accepts.from_info(haproxy.show_info(self.worker.stats_socket))
        accepts = dataclasses.replace(running, costs=dataclasses.replace(running.costs, reload=math.inf))
        forward, _ = plans.runtime_commands(lbs_a, lbs_b, accepts, config_server_ids(after_config, protocol))
        backward, _ = plans.runtime_commands(lbs_b, lbs_a, accepts, config_server_ids(before_config, protocol))

        def worker_side():
            self.update(before_message)
            before = self.only_worker()
            seconds = self.update(after_message)
            paths.append("runtime" if self.current_worker() == before else "reload")
            return [seconds]

        def floor_side():
            self.update(before_message)   # HAProxy runs A
            self.only_worker()
            self.install_config(after_config)
            seconds = haproxy.check_and_reload(self.worker.config, self.worker.master_socket)
            self.install_config(before_config)   # A again, as the worker knows it: every side starts alike
            haproxy.check_and_reload(self.worker.config, self.worker.master_socket)
            self.only_worker()
            time.sleep(FRESH_PROCESS_SETTLE)
            return [seconds]

        def api_side():
            self.update(before_message)   # HAProxy runs A (untimed)
            self.only_worker()
            seconds = haproxy.runtime_api(self.worker.stats_socket, forward)
            haproxy.runtime_api(self.worker.stats_socket, backward)   # A again, as the worker knows it
            return [seconds]

        sides = {"worker": worker_side, "floor": floor_side}
        if forward is not None and backward is not None:
            sides["api"] = api_side
        medians = interleave(rounds, sides)
        measured, floor = median(medians["worker"]), median(medians["floor"])
        api = median(medians["api"]) if "api" in medians else None
        path = "/".join(sorted(set(paths)))
        target = RUNTIME_TARGET if path == "runtime" else RELOAD_TARGET
        changed = min(count, MAX_NODES - 1) if change in ("add", "remove") else count
        alone = f", HAProxy alone {api / floor:.2f}x" if api is not None else ""
        self.add(Figure(f"UPDATE {change} {changed:,} {protocol} nodes ({path}{alone})", measured * 1e3, "ms",
                        floor * 1e3, measured / floor, f"<= {target:g}x", judge(measured / floor, target),
                        f"{rounds} interleaved round(s); each round applies the config without the change "
                        f"(untimed), then times the UPDATE that makes it; path taken: {path} (same HAProxy "
                        f"worker before and after = runtime); floor: from HAProxy running the config without "
                        f"the change, `haproxy -c -f` + reload of the config the timed UPDATE writes; "
                        f"worker {spread(medians['worker'])} ms, floor "
                        f"{spread(medians['floor'])} ms"
                        + (f"; HAProxy alone: the {len(forward)} runtime commands the planner makes (its "
                           f"cost estimate set aside) over a bare socket, {spread(medians['api'])} ms "
                           f"({api / floor:.2f}x the floor; the worker {measured / api:.2f}x that)"
                           if api is not None else ""),
                        {"worker_s": medians["worker"], "floor_s": medians["floor"], "paths": paths,
                         **({"api_s": medians["api"]} if api is not None else {})}))

    def runtime_under_load(self):
        """The third back-end added and removed RUNTIME_UPDATES times under the reload figure's load."""
        two, three = self.base_lb(1, 1), self.base_lb(1, 1)
        three["loadBalancers"][0]["nodes"].append(
            {"id": self.backends[2].name, "address": "127.0.0.1", "port": self.backends[2].port, "weight": 1})
        self.update(two)
        paths, seconds = [], []

        def updates():
            for index in range(RUNTIME_UPDATES):
                before = self.current_worker()
                seconds.append(self.update(three if index % 2 == 0 else two))
                paths.append("runtime" if self.current_worker() == before else "reload")
                time.sleep(0.05)

        result = self.under_load(updates)
        failed = result["failed"] + result["keepalive"]["failed"]
        counted = ", ".join(f"{paths.count(path)} {path}" for path in sorted(set(paths)))
        self.add(Figure(f"failed requests across {RUNTIME_UPDATES} UPDATEs adding/removing a node", failed,
                        "failed", target="0", result="PASS" if failed == 0 else "FAIL",
                        detail=f"{result['requests']} new connections at {result['rate']:.0f}/s and "
                               f"{result['keepalive']['requests']} keep-alive requests through HAProxy while "
                               f"{RUNTIME_UPDATES} UPDATEs added and removed a third back-end; paths: {counted}; "
                               f"UPDATE median {median(seconds) * 1e3:.1f} ms",
                        samples={"load": result, "paths": paths}))

    def rss_big(self):
        self.call(WORKER_NAME, json.dumps(STATS).encode())
        time.sleep(0.5)
        rss, peak = procs.rss_mb(self.worker.pid), procs.hwm_mb(self.worker.pid)
        self.add(Figure("worker RSS, idle after a 10,000-node UPDATE + STATS", rss, "MB",
                        target=f"<= {RSS_LIMIT_MB:g} MB", result=judge(rss, RSS_LIMIT_MB),
                        detail=f"VmRSS once the 10,000-node UPDATEs and a STATS are done; "
                               f"peak (VmHWM) {peak:.1f} MB"))

    def steps(self):
        """(name for --only, label, step); set-up and warm-up always run."""
        return [("setup", "set-up", self.setup), ("warmup", "warm-up", self.warm_up),
                ("rss", "idle RSS", self.rss_idle), ("discover", "DISCOVER", self.discover_rt),
                ("stats", "STATS", self.stats_rt), ("throughput", "throughput", self.throughput),
                ("rss-jobs", "RSS after jobs", self.rss_after_jobs),
                ("hitless", "reloads under load", self.reloads_under_load),
                ("hitless-runtime", "runtime UPDATEs under load", self.runtime_under_load),
                ("update", "UPDATE sizes", self.update_sizes), ("nodes", "node changes", self.node_changes),
                ("rss-big", "RSS, 10,000 nodes", self.rss_big)]

    def run(self, only=None):
        for name, label, step in self.steps():
            if only and name not in only and name not in ("setup", "warmup"):
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {label}", flush=True)
            step()
            if not self.worker.running():
                raise RuntimeError(f"the worker exited during {label}: {self.worker.stderr_tail()}")


def worker_source():
    """Which libra_worker code the worker runs: this checkout (git revision) or BENCH_WORKER_SRC."""
    source = os.environ.get("BENCH_WORKER_SRC")
    if source:
        return f"worker code from BENCH_WORKER_SRC={os.path.abspath(source)}"
    try:
        revision = subprocess.run(["git", "-C", str(procs.PROJECT), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(procs.PROJECT), "status", "--porcelain", "--", "libra_worker"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        revision, dirty = "", ""
    return f"worker code from {procs.PROJECT}" + (f" (git {revision}{', modified' if dirty else ''})"
                                                  if revision else "")


def header(plan):
    load = os.getloadavg()
    haproxy_version = subprocess.run([procs.HAPROXY, "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    return (f"libra_worker bench ({'--quick' if plan.quick else 'full'}), "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}, {platform.node()}, "
            f"{os.cpu_count()} CPUs, load average {load[0]:.2f} at the start\n"
            f"worker as in scripts/demo: --nodaemon, service = process, sudo = false, one gearmand "
            f"(-t 1) on 127.0.0.1; {worker_source()}\n"
            f"{haproxy_version.split(' - ')[0].strip()}; Python {platform.python_version()}; "
            f"ratio = measured / floor (jobs/s: floor / measured), 1.00x = as fast as the bare tools")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run (< 60 s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    parser.add_argument("--only", metavar="STEP[,STEP]", type=lambda text: set(text.split(",")),
                        help="run only these steps (a partial table): rss, discover, stats, throughput, "
                             "rss-jobs, hitless, hitless-runtime, update, nodes, rss-big")
    args = parser.parse_args(argv)
    for tool in (procs.GEARMAND, procs.HAPROXY, procs.SOCAT):
        if not os.access(tool, os.X_OK):
            print(f"bench/run: {tool} is missing (scripts/bootstrap installs it)", file=sys.stderr)
            return 1

    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, interrupted)

    plan = Plan(args.quick)
    workdir = tempfile.mkdtemp(prefix="libra-bench-")
    bench = Bench(plan, workdir)
    started = time.monotonic()
    title = header(plan)
    print(title, flush=True)
    status = 0
    try:
        bench.run(args.only)
    except (Exception, KeyboardInterrupt) as error:
        print(f"bench/run: the harness broke: {type(error).__name__}: {error}", file=sys.stderr)
        status = 1
    finally:
        bench.teardown()
        if args.keep or status:
            print(f"bench/run: files kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    print()
    print(table(bench.figures, title))
    print(f"\n{len(bench.figures)} figures in {elapsed:.0f} s, load average {os.getloadavg()[0]:.2f} "
          f"at the end; {sum(f.result == 'FAIL' for f in bench.figures)} FAIL")
    if args.json:
        write_json(args.json, bench.figures, title,
                   {"quick": plan.quick, "seconds": round(elapsed, 1), "harness_ok": status == 0,
                    "load_average_end": os.getloadavg()[0]})
    return status
