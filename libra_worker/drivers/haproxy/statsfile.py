"""The statsfile: one JSON document, written atomically, holding two parts.

The Ledger's byte accounting (ledger.py) and the load balancer's lifecycle
state (lifecycle.py) each own their keys; this module only loads, checks,
sets aside and writes the whole.  One file, one lock: a write of either
part is a write of both, so they never disagree on disk.
"""
import json
import logging
import os
import threading
import time

from libra_worker import safe_files
from libra_worker.drivers.haproxy import ledger, lifecycle

LOG = logging.getLogger(__name__)

VERSION = 1


def fresh():
    return {"version": VERSION, **lifecycle.fresh(), **ledger.fresh()}


def valid_state(state):
    return (isinstance(state, dict) and state.get("version") == VERSION
            and lifecycle.valid(state) and ledger.valid(state))


class Statsfile:
    def __init__(self, path):
        self.path = path
        self.state = self._load()
        # The job loop and the draining reader both write it.
        self.lock = threading.RLock()

    def _load(self):
        try:
            data = safe_files.read_bytes(self.path)  # OddFile (a FIFO, a link...) is raised: refused
            if data is None:
                return fresh()
            state = json.loads(data)
        except safe_files.OddFile:
            raise
        except (OSError, ValueError, RecursionError) as error:
            return self._set_aside(f"unreadable ({type(error).__name__}: {error})")
        if not valid_state(state):
            return self._set_aside("not a ledger this worker wrote")
        ledger.complete(state)
        return state

    def _set_aside(self, why):
        stamp = int(time.time())
        aside = f"{self.path}.corrupt-{stamp}"
        number = 1
        while os.path.lexists(aside):  # never overwrite an earlier one
            aside = f"{self.path}.corrupt-{stamp}-{number}"
            number += 1
        try:
            os.replace(self.path, aside)
            LOG.error("statsfile %s is %s: moved to %s, counting afresh", self.path, why, aside)
        except OSError as error:
            LOG.error("statsfile %s is %s and could not be moved aside (%s): counting afresh",
                      self.path, why, error.strerror)
        state = fresh()
        ledger.count_from_next_reading(state)
        return state

    def save(self):
        """Write the state; a failure is logged and counting goes on in memory."""
        try:
            self.write()
        except OSError as error:
            # The next save may succeed; METRICS refuses to report until one does.
            LOG.error("cannot write statsfile %s: %s", self.path, error)

    def write(self):
        """Atomic, durable write (temp file, fsync, rename, fsync of the directory); OSError."""
        safe_files.write_atomic(self.path, json.dumps(self.state).encode(), 0o600, make_dir=0o700)
