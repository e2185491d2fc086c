"""The floor of a Gearman round trip: a bare worker that sends each payload back.

    python -m bench.echo HOST:PORT FUNCTION

It uses libra_worker.gearman.Worker (the same gear worker class, TCP_NODELAY
and all, as the real worker) and does nothing else: no JSON, no logging.
"""
import sys

import gear

from libra_worker import gearman


def main(argv):
    address, name = argv
    host, _, port = address.rpartition(":")
    worker = gearman.Worker(f"bench-echo-{name}", reconnect_sleep=1)
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
