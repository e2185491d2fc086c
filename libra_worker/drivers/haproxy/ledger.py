"""The ledger behind METRICS, persisted in the statsfile (statsfile.py).

HAProxy's byte counters start at zero in every new process ("generation":
a reload, a restart, a SUSPEND/ENABLE).  The ledger remembers, per
frontend, how much of the current generation was already accounted for
(`baseline`) and the bytes of finished generations not yet reported
(`carried`).  It is written atomically after every change, so a worker
killed at any moment loses nothing it had accounted for.

Generations the worker has seen replaced are `retired`: a late answer from
one is not counted as the current process.  An old process that keeps
serving its connections after a reload is `draining`: the driver reads it
through a held stats session (else the master CLI) until it exits, and drain() adds what it sent
since its last reading, so no reload loses bytes.
"""
import copy
import datetime
import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

from libra_worker.errors import CommandFailed

LOG = logging.getLogger(__name__)

TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
RETIRED_KEPT = 16
PROTOCOL_BY_FRONTEND = {"http": "HTTP", "tcp": "TCP", "galera": "GALERA"}
# The METRICS row of each protocol, as Libra's worker named it: its billing
# (stats_sched._update_stats) looks for "http" or "tcp" and counts GALERA as tcp.
BILLING_PROTOCOL = {"HTTP": "http", "TCP": "tcp", "GALERA": "tcp"}


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime(TIME_FORMAT)


@dataclass(frozen=True)
class MetricsReport:
    utc_start: str
    utc_end: str
    bytes_out: List[Tuple[str, int]]  # [("http" | "tcp", bytes)]


def billing_rows(totals):
    """{protocol: bytes} → [(billing protocol, bytes)], GALERA summed into tcp."""
    rows = {}
    for protocol, count in totals.items():
        row = BILLING_PROTOCOL.get(protocol, protocol.lower())
        rows[row] = rows.get(row, 0) + count
    return sorted(rows.items())


def fresh():
    """The accounting part of a new statsfile."""
    return {"window_start": utc_now(), "carried": {}, "generation": None, "baseline": {},
            "expect_new_generation": False, "retired": [], "draining": {}}


def _is_time(text):
    try:
        datetime.datetime.strptime(text, TIME_FORMAT)
    except (TypeError, ValueError):
        return False
    return True


def _is_counts(value):
    # bool is an int to Python, not to whoever reads the METRICS reply
    return isinstance(value, dict) and all(type(v) is int and v >= 0 for v in value.values())


def valid(state):
    """Whether a loaded statsfile's accounting part is one this worker wrote."""
    return (_is_time(state.get("window_start"))
            and _is_counts(state.get("carried"))
            and _is_counts(state.get("baseline"))
            and (state.get("generation") is None or isinstance(state["generation"], str))
            and isinstance(state.get("expect_new_generation", False), bool)
            and isinstance(state.get("retired", []), list)
            and all(isinstance(g, str) for g in state.get("retired", []))
            and isinstance(state.get("draining", {}), dict)
            and all(_is_counts(counts) for counts in state.get("draining", {}).values()))


def complete(state):
    """A statsfile from before these keys existed: add them."""
    state.setdefault("expect_new_generation", False)
    state.setdefault("retired", [])
    state.setdefault("draining", {})


def count_from_next_reading(state):
    """A statsfile set aside: what HAProxy counted so far may have been reported already."""
    state["baseline_next_reading"] = True


def _protocol_counts(snapshot):
    """{protocol: bytes out} of the load balancers' frontends in a reading."""
    return {PROTOCOL_BY_FRONTEND[name]: count
            for name, count in snapshot.frontend_bytes_out().items()
            if name in PROTOCOL_BY_FRONTEND}


class Ledger:
    """METRICS byte accounting, kept in the statsfile (a statsfile.Statsfile)."""

    def __init__(self, statsfile):
        self.file = statsfile
        self.lock = statsfile.lock

    @property
    def state(self):
        return self.file.state

    def save(self):
        self.file.save()

    # -- byte accounting ----------------------------------------------------
    def _unaccounted(self, snapshot):
        """{protocol: bytes of this generation not yet carried or reported}."""
        counters = _protocol_counts(snapshot)
        if self.state.get("baseline_next_reading"):
            baseline = counters
        elif snapshot.generation != self.state["generation"]:
            if self.state["generation"] is not None and not self.state["expect_new_generation"]:
                LOG.warning("HAProxy was restarted behind the worker's back (pid %s, was %s): "
                            "bytes sent since the last reading cannot be counted",
                            snapshot.generation, self.state["generation"])
            baseline = {}
        else:
            baseline = self.state["baseline"]
        # A counter below its baseline was cleared: only what it shows now is proven.
        unaccounted = {protocol: count - baseline.get(protocol, 0)
                       if count >= baseline.get(protocol, 0) else count
                       for protocol, count in counters.items()}
        return counters, unaccounted

    def _advance(self, snapshot, counters):
        previous = self.state["generation"]
        if snapshot.generation == previous:
            # Same process, same frontends: keep a baseline a reading lacked.
            counters = {**self.state["baseline"], **counters}
        elif previous is not None:
            self.state["retired"] = (self.state["retired"] + [previous])[-RETIRED_KEPT:]
        self.state["generation"] = snapshot.generation
        self.state["baseline"] = counters
        self.state["expect_new_generation"] = False
        self.state.pop("baseline_next_reading", None)

    def _current(self, snapshot):
        """The snapshot, or None when it comes from a generation already replaced."""
        if snapshot is not None and snapshot.generation in self.state["retired"]:
            LOG.info("ignored the counters of HAProxy %s: a newer process already answered",
                     snapshot.generation)
            return None
        return snapshot

    def carry(self, snapshot):
        """Before the worker resets HAProxy's counters (reload, stop): fold them in.

        The process read here may go on serving its open connections after a
        reload: it is followed as `draining` from these counters on.
        """
        with self.lock:
            self._carry(snapshot)

    def _carry(self, snapshot):
        if snapshot is None:
            # No process runs now: the next one counts from zero, all of it new.
            self.state.pop("baseline_next_reading", None)
        if (snapshot is None and self.state["generation"] is not None
                and not self.state["expect_new_generation"]):
            LOG.warning("HAProxy (%s) stopped behind the worker's back: bytes sent since "
                        "the last reading cannot be counted", self.state["generation"])
        snapshot = self._current(snapshot)
        if snapshot is not None:
            counters, unaccounted = self._unaccounted(snapshot)
            carried = self.state["carried"]
            for protocol, count in unaccounted.items():
                carried[protocol] = carried.get(protocol, 0) + count
            self._advance(snapshot, counters)
            self.state["draining"][snapshot.generation] = dict(self.state["baseline"])
        self.state["expect_new_generation"] = True
        self.save()

    def draining(self):
        """{generation: counters already accounted} of old processes still to follow."""
        with self.lock:
            return dict(self.state["draining"])

    def drain(self, snapshot, last=False):
        """A reading of a draining old process: carry what it sent since the last one.

        `last`: the process has no client connection left, so this reading is
        its final count and it is followed no further (one write for both).
        """
        with self.lock:
            accounted = self.state["draining"].get(snapshot.generation)
            if accounted is None:
                return
            counters = _protocol_counts(snapshot)
            grown = {protocol: count - accounted.get(protocol, 0)
                     for protocol, count in counters.items() if count > accounted.get(protocol, 0)}
            if grown:
                carried = self.state["carried"]
                for protocol, count in grown.items():
                    carried[protocol] = carried.get(protocol, 0) + count
                self.state["draining"][snapshot.generation] = {**accounted, **counters}
            if last:
                del self.state["draining"][snapshot.generation]
            if grown or last:
                self.save()

    def drained(self, generation):
        """The old process exited: nothing more to follow."""
        with self.lock:
            if self.state["draining"].pop(generation, None) is not None:
                self.save()

    def report(self, snapshot: Optional[object]) -> MetricsReport:
        """Bytes since the previous report; the window closes now."""
        with self.lock:
            return self._report(snapshot)

    def _report(self, snapshot):
        """A report is only given once the window it closes is on disk.

        Otherwise a restarted worker would report the same bytes again: on a
        failed write the state goes back to what it was, and the next METRICS
        that can be saved reports these bytes, once.
        """
        before = copy.deepcopy(self.state)
        totals = dict(self.state["carried"])
        snapshot = self._current(snapshot)
        if snapshot is not None:
            counters, unaccounted = self._unaccounted(snapshot)
            for protocol, count in unaccounted.items():
                totals[protocol] = totals.get(protocol, 0) + count
            self._advance(snapshot, counters)
        # Windows never overlap, even when the clock was set back.
        utc_end = max(utc_now(), self.state["window_start"])
        report = MetricsReport(self.state["window_start"], utc_end, billing_rows(totals))
        self.state["carried"] = {}
        self.state["window_start"] = utc_end
        try:
            self.file.write()
        except OSError as error:
            self.file.state = before
            LOG.error("METRICS not reported: cannot write statsfile %s: %s", self.file.path, error)
            raise CommandFailed(f"cannot save the METRICS window to the statsfile {self.file.path}: "
                                f"{error.strerror or error}; the window was not moved, the next "
                                "METRICS reports these bytes") from None
        return report

    def reset(self):
        """DELETE: nothing of the old load balancer is reported again."""
        with self.lock:
            self.state.pop("baseline_next_reading", None)
            self.state.update(fresh())
            self.save()
