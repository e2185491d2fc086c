"""Following old HAProxy processes that drain their connections after a reload.

After a reload the old process keeps serving the connections it has until
they end (at most `hard-stop-after`), and HAProxy adds a connection's bytes
to its counters only as the connection ends.  The worker read that process
just before the reload; this reads it again until it is gone, and the
ledger carries what it sent in the meantime.

The reading is exact when the driver could open a stats session before the
reload (`held`): the old process cannot exit while that session is open, so
its last reading comes after its last client connection ended, and only then
is the session closed.  Otherwise the master CLI is asked, for as long as the
process lives.
"""
import logging
import threading

from libra_worker.drivers.haproxy import stats_socket
from libra_worker.errors import ServiceError

LOG = logging.getLogger(__name__)

FOLLOW_INTERVAL = 0.1


class DrainFollower:
    def __init__(self, ledger, service, busy, interval=FOLLOW_INTERVAL):
        self.ledger = ledger
        self.service = service
        self.busy = busy          # held by the job loop while it changes HAProxy
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None
        self.held = {}  # generation → HeldSession keeping that old process alive

    def start(self):
        self._thread = threading.Thread(target=self._run, name="drain follower", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self.busy:
            for session in self.held.values():
                session.close()
            self.held.clear()

    def hold(self, session):
        """Follow the old process `session` is attached to through it (called after a reload)."""
        generation = session.generation  # read before the reload, as a rule
        if generation is None:
            try:
                generation = session.snapshot().generation
            except ServiceError:
                session.close()
                return
        if generation in self.ledger.draining() and generation not in self.held:
            self.held[generation] = session
        else:
            session.close()

    def _run(self):
        while not self._stop.wait(self.interval):
            if not self.ledger.draining():
                continue
            # A reload in progress still shows the old process as current: wait for it.
            if not self.busy.acquire(blocking=False):
                continue
            try:
                self.follow_once()
            except Exception:  # the follower must outlive any one bad reading
                LOG.exception("following draining HAProxy processes failed")
            finally:
                self.busy.release()

    def follow_once(self):
        """Read every draining process once; forget those that are gone."""
        for generation, session in list(self.held.items()):
            self._follow_held(generation, session)
        unheld = [generation for generation in self.ledger.draining() if generation not in self.held]
        current = self.service.worker_pid() if unheld else None
        for generation in unheld:
            pid = int(generation.split("@", 1)[0])
            if pid == current:  # the reload did not replace it: it is counted as current
                self.ledger.drained(generation)
                continue
            try:
                snapshot = stats_socket.parse(self.service.ask_worker(pid, stats_socket.FRONTENDS_QUERY))
            except ServiceError as error:
                LOG.debug("HAProxy %s is gone (%s)", generation, error)
                self.ledger.drained(generation)
                continue
            if snapshot.generation != generation:
                self.ledger.drained(generation)
            else:
                self.ledger.drain(snapshot)

    def _follow_held(self, generation, session):
        try:
            snapshot = session.snapshot()
        except ServiceError as error:  # hard-stop-after ended it, or HAProxy was killed
            LOG.info("lost the held session to HAProxy %s: %s", generation, error)
            snapshot = None
        last = snapshot is None or snapshot.generation != generation or snapshot.connections == 0
        if snapshot is not None and snapshot.generation == generation:
            self.ledger.drain(snapshot, last=last)
        if not last:
            return
        # Its last client connection is counted: let it exit.
        session.close()
        del self.held[generation]
        self.ledger.drained(generation)  # a no-op when the last reading already said so
