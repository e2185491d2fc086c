"""The floor of a Gearman round trip: a bare worker that sends each payload back.

    python -m bench.echo HOST:PORT FUNCTION

It is a bare `gear` worker (an independent Gearman implementation) with
TCP_NODELAY, as the worker has, and does nothing else: no JSON, no logging.
"""
import socket
import sys

import gear


class _Worker(gear.Worker):
    def _onConnect(self, conn):
        conn.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super()._onConnect(conn)


def main(argv):
    address, name = argv
    host, _, port = address.rpartition(":")
    worker = _Worker(f"bench-echo-{name}")
    worker.addServer(host, int(port))
    worker.waitForServer(timeout=10)
    worker.registerFunction(name)
    while True:  # until SIGTERM (its default action ends the process)
        try:
            job = worker.getJob()
        except gear.InterruptedError:
            return 0
        job.sendWorkComplete(bytes(job.arguments))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
