"""A Gearman client that times round trips without polling.

A `gear` client (TCP_NODELAY), with a threading.Event set by
gear's own reader thread the moment WORK_COMPLETE (or FAIL/EXCEPTION)
arrives, so a round trip is measured from just before SUBMIT_JOB to the
moment the reply is in, with no sleep-poll quantum in it.
"""
import json
import socket
import threading
import time

import gear


class Client(gear.Client):
    def __init__(self, address, client_id="bench"):
        """`address`: "host:port", or a list of them (a connection to each)."""
        super().__init__(client_id)
        for one in [address] if isinstance(address, str) else address:
            host, _, port = one.rpartition(":")
            self.addServer(host, int(port))
        self.waitForServer(timeout=10)

    def _onConnect(self, conn):
        conn.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super()._onConnect(conn)

    def _finished(self, job):
        event = getattr(job, "done", None)
        if event is not None:
            event.set()
        return job

    def handleWorkComplete(self, packet):
        return self._finished(super().handleWorkComplete(packet))

    def handleWorkFail(self, packet):
        return self._finished(super().handleWorkFail(packet))

    def handleWorkException(self, packet):
        return self._finished(super().handleWorkException(packet))

    def handleDisconnect(self, job):
        job = super().handleDisconnect(job)
        self._finished(job)
        return job

    def call(self, name, payload, timeout=120.0):
        """Submit one job and wait for its reply → (seconds, reply bytes)."""
        job = gear.Job(name.encode() if isinstance(name, str) else name, payload)
        job.done = threading.Event()
        started = time.perf_counter()
        self.submitJob(job, timeout=timeout)
        if not job.done.wait(timeout):
            raise RuntimeError(f"no reply to a {name} job within {timeout:g}s")
        elapsed = time.perf_counter() - started
        if job.failure or not job.complete:
            raise RuntimeError(f"the {name} job failed (WORK_FAIL/EXCEPTION or job server gone)")
        return elapsed, b"".join(job.data)

    def call_json(self, name, message, timeout=120.0):
        """Submit a JSON message → (seconds, reply dict)."""
        elapsed, data = self.call(name, json.dumps(message).encode(), timeout)
        return elapsed, json.loads(data)

    def close(self):
        self.shutdown()


def wait_answering(client, name, payload, timeout=20.0, alive=lambda: True):
    """Send one job and wait for a reply: the worker registered (the job waits in gearmand)."""
    job = gear.Job(name.encode(), payload)
    job.done = threading.Event()
    client.submitJob(job, timeout=timeout)
    deadline = time.monotonic() + timeout
    while not job.done.wait(0.1):
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{name} never answered (worker alive: {alive()})")
    return b"".join(job.data)
