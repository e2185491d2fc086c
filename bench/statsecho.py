"""The fleet's floor: a bare gear worker that reads its device's stats socket once per job.

    python -m bench.statsecho STATS_SOCKET FUNCTION HOST:PORT [HOST:PORT...]

Each job costs one `show stat` on the HAProxy stats socket (the least a
STATS reply needs) and sends the payload back.  No JSON, no logging.
"""
import socket
import sys
import time

import gear


class _Worker(gear.Worker):
    def _onConnect(self, conn):
        conn.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super()._onConnect(conn)


def show_stat(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(b"show stat\n")
        while sock.recv(65536):
            pass


def main(argv):
    stats_socket, name, *servers = argv
    worker = _Worker(f"bench-statsecho-{name}")
    for address in servers:
        host, _, port = address.rpartition(":")
        worker.addServer(host, int(port))
    # Register once every server is connected: gear sends CAN_DO only to the
    # connections it has at that moment, and the floor must be on both servers.
    deadline = time.monotonic() + 60
    while len(worker.active_connections) < len(servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.registerFunction(name)
    while True:  # until SIGTERM (its default action ends the process)
        try:
            job = worker.getJob()
        except gear.InterruptedError:
            return 0
        try:
            show_stat(stats_socket)
        except OSError:
            pass
        job.sendWorkComplete(bytes(job.arguments))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
