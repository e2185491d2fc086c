"""The test side of Gearman: a `gear` client that submits one job and waits."""
import json
import socket
import time

import gear


class _Client(gear.Client):
    """gear.Client with TCP_NODELAY and jobs marked when their server goes away."""

    def _onConnect(self, conn):
        conn.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super()._onConnect(conn)

    def handleDisconnect(self, job):
        job.disconnected = True
        return super().handleDisconnect(job)


def _host_port(server):
    text = getattr(server, "address", server)
    host, _, port = str(text).rpartition(":")
    return host, int(port)


def encode_payload(payload):
    """dict/list → JSON bytes; str → UTF-8; bytes as they are."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload).encode("utf-8")


class GearClient:
    """Submits jobs to one or more job servers ("host:port" or Gearmand objects).

    Waits up to `connect_timeout` for at least one of them to accept.
    """

    def __init__(self, servers, connect_timeout=10.0, client_id="tests"):
        if isinstance(servers, (str, bytes)) or hasattr(servers, "address"):
            servers = [servers]
        self.servers = [_host_port(server) for server in servers]
        self._client = _Client(client_id)
        for host, port in self.servers:
            self._client.addServer(host, port)
        try:
            self._client.waitForServer(timeout=connect_timeout)
        except gear.TimeoutError:
            self.close()
            raise TimeoutError(f"no job server of {self.servers} accepted a connection "
                               f"within {connect_timeout}s") from None

    def send(self, name, payload, timeout=10.0):
        """Submit a foreground job and return the gear.Job (handle set) at once."""
        job = gear.Job(name, encode_payload(payload))
        job.disconnected = False
        self._client.submitJob(job, timeout=timeout)
        return job

    def wait(self, job, timeout=30.0, alive=None):
        """Block until `job` completes; its reply as bytes.

        `alive` (optional) is called while waiting; when it returns a
        false value the wait stops with an AssertionError (e.g. the worker
        process died).
        """
        name = job.name
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while not job.complete:
            if job.disconnected:
                raise AssertionError(f"{name} job {job.handle!r}: the job server went away")
            if alive is not None and not alive():
                raise AssertionError(f"{name} job {job.handle!r}: given up, {alive.__doc__ or 'not alive'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to the {name} job {job.handle!r} within {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        if job.failure:
            raise AssertionError(f"{name} job {job.handle!r} got WORK_FAIL/WORK_EXCEPTION "
                                 f"(exception={job.exception!r}) instead of a reply")
        return b"".join(job.data)

    def submit_raw(self, name, payload, timeout=30.0, alive=None):
        """Submit, wait, and return the reply's bytes."""
        return self.wait(self.send(name, payload, timeout=timeout), timeout, alive)

    def submit(self, name, payload, timeout=30.0, alive=None):
        """Submit, wait, and return the reply decoded as a JSON object."""
        data = self.submit_raw(name, payload, timeout, alive)
        try:
            reply = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise AssertionError(f"the reply to {name} is not UTF-8 JSON ({error}): {data[:300]!r}") from None
        if not isinstance(reply, dict):
            raise AssertionError(f"the reply to {name} is not a JSON object: {data[:300]!r}")
        return reply

    def close(self):
        if self._client is not None:
            client, self._client = self._client, None
            client.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
