"""The ledger's accounting of old HAProxy processes still draining after a reload."""
import pytest

from libra_worker.drivers.haproxy.ledger import Ledger
from libra_worker.drivers.haproxy.statsfile import Statsfile
from libra_worker.drivers.haproxy.stats_socket import Snapshot, StatRow

# scripts/test runs these once, where HAProxy cannot run (scripts/without-haproxy).
pytestmark = pytest.mark.no_haproxy


def reading(pid, http_bytes, started=1000):
    rows = (StatRow("http", "FRONTEND", "OPEN", str(http_bytes)),)
    return Snapshot(pid=pid, started=started, rows=rows)


def http_total(report):
    return dict(report.bytes_out).get("http", 0)  # the METRICS row, as Libra names it


def test_bytes_an_old_process_sends_after_the_reload_are_carried_once(tmp_path):
    ledger = Ledger(Statsfile(str(tmp_path / "stats")))
    ledger.report(reading(10, 0))
    ledger.carry(reading(10, 500))                 # just before the reload
    assert set(ledger.draining()) == {"10@1000"}

    ledger.drain(reading(10, 800))                 # the old process served 300 more
    ledger.drain(reading(10, 800))                 # read again: nothing new
    ledger.drain(reading(10, 750))                 # never backwards
    report = ledger.report(reading(11, 40))        # the new process served 40
    assert http_total(report) == 500 + 300 + 40

    ledger.drain(reading(10, 900))                 # still draining: 100 more, next window
    ledger.drained("10@1000")
    assert ledger.draining() == {}
    ledger.drain(reading(10, 2000))                # gone: ignored
    assert http_total(ledger.report(reading(11, 40))) == 100


def test_the_last_reading_of_an_old_process_is_carried_and_ends_its_draining(tmp_path):
    path = str(tmp_path / "stats")
    ledger = Ledger(Statsfile(path))
    ledger.report(reading(10, 0))
    ledger.carry(reading(10, 500))
    ledger.drain(reading(10, 700), last=True)
    assert ledger.draining() == {}
    assert Ledger(Statsfile(path)).draining() == {}               # written down, too
    ledger.drain(reading(10, 900))                     # no longer followed
    assert http_total(ledger.report(reading(11, 0))) == 700

    ledger.carry(reading(11, 50))
    ledger.drain(reading(11, 50), last=True)           # nothing new, still the end of it
    assert Ledger(Statsfile(path)).draining() == {}


def test_draining_survives_a_worker_restart(tmp_path):
    path = str(tmp_path / "stats")
    ledger = Ledger(Statsfile(path))
    ledger.report(reading(10, 0))
    ledger.carry(reading(10, 500))
    restarted = Ledger(Statsfile(path))
    restarted.drain(reading(10, 650))
    assert http_total(restarted.report(reading(11, 0))) == 650


def test_a_reading_of_another_process_is_not_drained(tmp_path):
    ledger = Ledger(Statsfile(str(tmp_path / "stats")))
    ledger.report(reading(10, 0))
    ledger.carry(reading(10, 500))
    ledger.drain(reading(10, 9999, started=2000))  # pid reused by a new process
    assert http_total(ledger.report(reading(11, 0))) == 500
