"""A plain `gear` worker in a thread: records every job and answers it.

Used where a test needs to see exactly what a client sent, and as the
floor (a bare echo worker) that the real worker is compared against.
"""
import socket
import threading

import gear

from .client import _host_port


class _Worker(gear.Worker):
    def _onConnect(self, conn):
        conn.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super()._onConnect(conn)


class RecordingWorker:
    """Registers `name` on `servers`; `reply(payload_bytes) -> bytes` answers.

    The default reply echoes the payload.  `payloads` lists what it got.
    """

    def __init__(self, servers, name, reply=None):
        if isinstance(servers, str) or hasattr(servers, "address"):
            servers = [servers]
        self.servers = [_host_port(server) for server in servers]
        self.name = name
        self.reply = reply or (lambda payload: payload)
        self.payloads = []
        self._worker = None
        self._thread = None

    def start(self, timeout=10.0):
        worker = _Worker(client_id=f"recording-{self.name}")
        for host, port in self.servers:
            worker.addServer(host, port)
        worker.waitForServer(timeout=timeout)
        worker.registerFunction(self.name)
        self._worker = worker
        self._thread = threading.Thread(target=self._loop, name=f"worker {self.name}", daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while True:
            try:
                job = self._worker.getJob()
            except gear.InterruptedError:
                return
            self.payloads.append(bytes(job.arguments))
            job.sendWorkComplete(self.reply(bytes(job.arguments)))

    def stop(self):
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown()
            self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
