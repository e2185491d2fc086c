"""METRICS never double-counts: a window that cannot be saved is not reported.

Libra's billing stores every METRICS row it gets.  If the worker answered
PASS without having saved the new window, a worker restart would report
the same bytes again.  Here the statsfile's file system is a real, full
tmpfs: METRICS FAILs, the window stays where it was (also across a
SIGKILLed worker), and once there is room again the next METRICS reports
the bytes once.
"""
import pytest

from support.backends import HttpBackend
from support.faults import MountRefused, Tmpfs
from support.metrics_helpers import HEADER_SLACK, Metrics, assert_http_bytes, download
from support.ports import free_port
from support.traffic import http_get, lb, node, stop_haproxy, update
from support.worker import WorkerProcess, sudo_ini, unique_name

KB = 1024


@pytest.fixture
def ledger_dir(tmp_path):
    filesystem = Tmpfs(tmp_path / "ledger", size="256k")
    try:
        filesystem.start()
    except MountRefused as error:
        pytest.fail(f"cannot mount a tmpfs to fill (needs root): {error}")
    yield filesystem
    filesystem.stop()


class Device:
    """A worker whose statsfile lives on `ledger_dir`; restartable on the same files."""

    def __init__(self, tmp_path, gearmand, client, ledger):
        self.dir = tmp_path / "w"
        self.gearmand, self.client = gearmand, client
        self.name = unique_name()
        self.ini = sudo_ini(statsfile=str(ledger.dir / "haproxy.stats"))
        self.process = None

    def start(self):
        self.process = WorkerProcess(self.dir, [self.gearmand], name=self.name, extra_ini=self.ini)
        self.process.start()
        self.process.wait_registered()
        self.config = self.process.sections["worker:haproxy"]["config"]
        return self

    def kill_and_restart(self):
        self.process.kill()
        return self.start()

    def submit(self, message):
        return self.client.submit(self.name, message, timeout=30.0, alive=self.process.alive)

    def must_pass(self, message):
        reply = self.submit(message)
        assert reply["hpcs_response"] == "PASS", f"{reply}; {self.process.diagnosis()}"
        return reply

    def metrics_fail(self):
        reply = self.submit({"hpcs_action": "METRICS"})
        assert reply["hpcs_response"] == "FAIL", f"METRICS passed without saving its window: {reply}"
        assert "statsfile" in reply["hpcs_error"] and "not moved" in reply["hpcs_error"], reply
        assert "loadBalancers" not in reply and "utc_start" not in reply, reply
        return reply

    def stop(self):
        if self.process is not None:
            self.process.stop()
            stop_haproxy(self.config)


@pytest.fixture
def device(tmp_path, gearmand, gear_client, ledger_dir):
    dev = Device(tmp_path, gearmand, gear_client, ledger_dir)
    yield dev
    dev.stop()


def test_a_full_disk_fails_metrics_and_the_next_saved_one_reports_the_bytes_once(device, ledger_dir):
    device.start()
    port = free_port()
    web = HttpBackend("web").start()
    try:
        device.must_pass(update(lb("HTTP", port, [node(1, web)])))
        assert http_get(port, "/").status == 200
        first = Metrics(device.must_pass({"hpcs_action": "METRICS"}))
        assert http_get(port, "/").status == 200

        filler = ledger_dir.fill()
        requests = download(port, 300 * KB, chunk=100 * KB)
        device.metrics_fail()
        device.metrics_fail()                              # still not moved
        assert http_get(port, "/").status == 200           # HAProxy serves on regardless

        device.kill_and_restart()
        # Start-up empties the server-state file, or removes it when it cannot: that
        # frees a page, so fill again.
        refill = ledger_dir.fill("filler-2")
        device.metrics_fail()

        filler.unlink()                                    # room again
        refill.unlink()
        report = Metrics(device.must_pass({"hpcs_action": "METRICS"}))
        assert report.reply["utc_start"] == first.reply["utc_end"], (first, report)
        assert_http_bytes(report.get("HTTP"), 300 * KB, requests + 2, "the bytes of the failed windows")
        again = Metrics(device.must_pass({"hpcs_action": "METRICS"}))
        assert again.get("HTTP") < HEADER_SLACK, f"reported twice: {report} then {again}"
        assert again.reply["utc_start"] == report.reply["utc_end"]

        device.kill_and_restart()                          # a restart after PASS repeats nothing
        after_restart = Metrics(device.must_pass({"hpcs_action": "METRICS"}))
        assert after_restart.get("HTTP") < HEADER_SLACK, after_restart
        assert after_restart.reply["utc_start"] == again.reply["utc_end"]
        assert http_get(port, "/").status == 200
    finally:
        web.stop()
