"""METRICS on a real HAProxy: bytes downloaded through the load balancer are
reported once, across reloads, SUSPEND/ENABLE, a worker killed with SIGKILL,
HAProxy killed or its counters cleared behind the worker's back, and a
corrupt statsfile.  Each test owns its device (worker + HAProxy + statsfile).
"""
import datetime
import json
import os
import stat
import time

from support.metrics_helpers import HEADER_SLACK, assert_http_bytes, download, echo, wait_counted
from support.ports import free_port
from support.traffic import SlowRequest, lb, node, unix_command, update, wait_until

MONITOR = {"type": "CONNECT", "delay": 1, "timeout": 1, "attempts": 1}
KB = 1000
BEHIND = "behind the worker's back"


def _serve_http(station, backends, port=None, **lb_fields):
    """UPDATE one HTTP LB over `backends` and wait until it serves; returns its port."""
    port = port or free_port()
    nodes = [node(f"n{index}", backend) for index, backend in enumerate(backends, 1)]
    station.must_pass(update(lb("HTTP", port, nodes, monitor=MONITOR, **lb_fields)))
    return port


def _settled(station, expected_http):
    """Wait until HAProxy's own counter has `expected_http` body bytes (streams close lazily)."""
    return wait_counted(station.stats_socket, "http", expected_http)


# --------------------------------------------------------------------------


def test_downloaded_bytes_are_reported_once_and_windows_follow_each_other(station, http_backend):
    station.start()
    port = _serve_http(station, [http_backend()])
    size = 1_000_000
    opening = station.metrics()            # closes whatever window came before

    requests = download(port, size)
    _settled(station, size)
    first = station.metrics()
    second = station.metrics()

    assert_http_bytes(first.get("HTTP"), size, requests, "first METRICS after 1 MB")
    assert second.get("HTTP") < HEADER_SLACK, f"the second METRICS counted again: {second}"
    assert first.utc_start >= opening.utc_end, (opening, first)
    assert second.utc_start >= first.utc_end, f"windows overlap: {first} then {second}"
    assert second.utc_end - second.utc_start < datetime.timedelta(seconds=30), second
    # utc_end is now, in UTC (the worker and this test share a clock)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert abs(now - second.utc_end) < datetime.timedelta(seconds=60), (now, second)

    # The ledger behind it: written atomically, private, no temp file left over.
    assert stat.S_IMODE(station.statsfile.stat().st_mode) == 0o600
    json.loads(station.statsfile.read_text())
    leftovers = [name for name in os.listdir(station.statsfile.parent)
                 if name.startswith(".statsfile") or name.endswith(".tmp")]
    assert leftovers == []


def test_reloads_lose_nothing_and_count_nothing_twice(station, http_backend):
    station.start()
    first_backend, second_backend = http_backend(), http_backend()
    port = _serve_http(station, [first_backend])
    before = download(port, 200 * KB)
    _settled(station, 200 * KB)
    station.metrics()                       # the ledger now has a baseline in this process

    total, requests = 0, 0
    requests += download(port, 300 * KB, chunk=100 * KB)
    total += 300 * KB
    _settled(station, 500 * KB)
    old_pid = station.serving_pid()
    _serve_http(station, [first_backend, second_backend], port=port,   # a new setting: a reload
                options={"client_timeout": 31000})
    assert station.serving_pid() != old_pid, "UPDATE did not start a new HAProxy process"

    requests += download(port, 250 * KB, chunk=125 * KB)
    total += 250 * KB
    _settled(station, 250 * KB)
    middle_pid = station.serving_pid()
    # A new algorithm cannot change at run time: this UPDATE reloads too.
    _serve_http(station, [second_backend], port=port, algorithm="LEAST_CONNECTIONS")
    assert station.serving_pid() != middle_pid

    requests += download(port, 150 * KB)
    total += 150 * KB
    _settled(station, 150 * KB)
    report = station.metrics()
    assert before == 1
    assert_http_bytes(report.get("HTTP"), total, requests, "bytes across two reloads")
    assert station.metrics().get("HTTP") < HEADER_SLACK


def test_suspend_and_enable_lose_nothing_and_count_nothing_twice(station, http_backend):
    station.start()
    port = _serve_http(station, [http_backend()])
    download(port, 400 * KB)
    _settled(station, 400 * KB)

    station.must_pass({"hpcs_action": "SUSPEND"})
    assert station.haproxy_pids() == []
    suspended = station.metrics()          # HAProxy is down: the carried bytes are reported
    assert_http_bytes(suspended.get("HTTP"), 400 * KB, 1, "METRICS while suspended")
    assert station.metrics().get("HTTP") == 0

    station.must_pass({"hpcs_action": "ENABLE"})
    download(port, 1)
    download(port, 300 * KB)
    _settled(station, 300 * KB + 1)
    station.must_pass({"hpcs_action": "SUSPEND"})
    station.must_pass({"hpcs_action": "SUSPEND"})                 # twice: nothing doubled
    station.must_pass({"hpcs_action": "ENABLE"})
    download(port, 1)
    download(port, 200 * KB)
    _settled(station, 200 * KB + 1)

    report = station.metrics()
    assert_http_bytes(report.get("HTTP"), 500 * KB + 2, 4, "bytes across SUSPEND/ENABLE")
    assert report.utc_start >= suspended.utc_end
    assert BEHIND not in station.log_text(), "a SUSPEND the worker did was taken for a crash"


def test_worker_killed_with_sigkill_resumes_its_ledger(station, http_backend):
    station.start()
    first_backend, second_backend = http_backend(), http_backend()
    port = _serve_http(station, [first_backend])
    download(port, 300 * KB)
    _settled(station, 300 * KB)
    first = station.metrics()
    assert_http_bytes(first.get("HTTP"), 300 * KB, 1)

    # B in the first process, reload, C in the second, then the worker dies.
    download(port, 200 * KB)
    _settled(station, 500 * KB)
    _serve_http(station, [first_backend, second_backend], port=port)
    download(port, 100 * KB)
    _settled(station, 100 * KB)
    # The process the reload replaced exits once the worker has read its last bytes.
    wait_until(lambda: len(station.haproxy_pids()) == 2, 10, what="the old HAProxy process exiting")
    haproxy_before = station.haproxy_pids()
    serving_before = station.serving_pid()

    station.restart_after_kill()
    assert station.haproxy_pids() == haproxy_before, "the new worker did not adopt HAProxy"
    assert station.serving_pid() == serving_before
    assert "adopted" in station.log_text()

    download(port, 50 * KB)
    _settled(station, 150 * KB)
    second = station.metrics()
    assert_http_bytes(second.get("HTTP"), 350 * KB, 3, "bytes across a SIGKILLed worker")
    assert second.reply["utc_start"] == first.reply["utc_end"], "the window did not survive"

    # Killed again right after a report: the report is not repeated.
    station.restart_after_kill()
    assert station.metrics().get("HTTP") < HEADER_SLACK


def test_haproxy_killed_behind_the_workers_back(station, http_backend):
    station.start()
    port = _serve_http(station, [http_backend()])
    download(port, 600 * KB)
    _settled(station, 600 * KB)
    station.metrics()
    download(port, 100 * KB)                # read by nobody before HAProxy dies
    _settled(station, 700 * KB)

    station.kill_haproxy()
    dead = station.metrics()                # nothing to read: PASS, never negative
    assert dead.get("HTTP") <= 100 * KB + HEADER_SLACK, dead

    station.must_pass({"hpcs_action": "ENABLE"})                    # brings it back
    wait_until(lambda: station.haproxy_pids(), what="HAProxy running after ENABLE")
    download(port, 250 * KB)
    _settled(station, 250 * KB)
    after_enable = station.metrics()
    reported = after_enable.get("HTTP")
    assert 250 * KB <= reported <= 350 * KB + 2 * HEADER_SLACK, after_enable
    assert BEHIND in station.log_text(), "the worker did not log HAProxy's death"
    mentions = station.log_text().count(BEHIND)

    station.kill_haproxy()
    _serve_http(station, [http_backend()], port=port)              # UPDATE brings it back
    download(port, 80 * KB)
    _settled(station, 80 * KB)
    after_update = station.metrics()
    assert_http_bytes(after_update.get("HTTP"), 80 * KB, 1, "bytes after an UPDATE restart")
    assert station.log_text().count(BEHIND) > mentions, "the second restart was not logged"
    assert station.metrics().get("HTTP") < HEADER_SLACK


def test_counters_cleared_behind_the_workers_back_never_go_negative(station, http_backend):
    station.start()
    port = _serve_http(station, [http_backend()])
    download(port, 500 * KB)
    _settled(station, 500 * KB)
    station.metrics()                       # baseline: ~500 kB

    unix_command(station.stats_socket, "clear counters all")
    download(port, 100 * KB)
    _settled(station, 100 * KB)
    report = station.metrics()
    assert_http_bytes(report.get("HTTP"), 100 * KB, 1, "bytes after `clear counters all`")


def test_http_and_tcp_load_balancers_are_reported_separately(station, http_backend, tcp_backend):
    station.start()
    web, echo_server = http_backend(), tcp_backend()
    http_port, tcp_port = free_port(), free_port()
    station.must_pass(update(lb("HTTP", http_port, [node("web", web)], monitor=MONITOR),
                             lb("TCP", tcp_port, [node("echo", echo_server)], monitor=MONITOR)))
    station.metrics()

    requests = download(http_port, 700 * KB, chunk=350 * KB)
    tcp_sent = echo(tcp_port, 60_000) + echo(tcp_port, 5_000)
    _settled(station, 700 * KB)
    wait_counted(station.stats_socket, "tcp", tcp_sent)
    report = station.metrics()

    assert set(report.bytes) == {"http", "tcp"}, report
    assert_http_bytes(report.get("HTTP"), 700 * KB, requests)
    assert report.get("TCP") == tcp_sent, f"TCP bytes_out {report.get('TCP')} != {tcp_sent} sent"


def test_corrupt_statsfile_is_moved_aside_and_counting_starts_afresh(station, http_backend):
    garbage = b"\x00\xff{\"version\": 1, \x13 not a ledger\n" * 4
    station.statsfile.write_bytes(garbage)
    station.start()

    asides = sorted(station.statsfile.parent.glob(station.statsfile.name + ".corrupt-*"))
    assert len(asides) == 1, f"no .corrupt-* file next to {station.statsfile}"
    assert asides[0].read_bytes() == garbage, "the corrupt statsfile was not kept as it was"
    log = station.log_text()
    assert str(station.statsfile) in log and "corrupt" in log, log[-2000:]

    assert station.metrics().bytes == {}, "a fresh ledger reports nothing"
    port = _serve_http(station, [http_backend()])
    download(port, 120 * KB)
    _settled(station, 120 * KB)
    assert_http_bytes(station.metrics().get("HTTP"), 120 * KB, 1)
    assert json.loads(station.statsfile.read_text())["version"] == 1
    assert stat.S_IMODE(station.statsfile.stat().st_mode) == 0o600
    assert station.worker.alive()


def test_a_download_in_progress_across_a_reload_is_counted(station, http_backend):
    station.start()
    port = _serve_http(station, [http_backend()])
    station.metrics()
    size = 300 * KB
    request = SlowRequest(port, size=size, seconds=1.5)
    time.sleep(0.4)
    # reload mid-download (a new algorithm cannot change at run time)
    _serve_http(station, [http_backend()], port=port, algorithm="LEAST_CONNECTIONS")
    assert len(request.finish()) == size
    report = station.metrics()
    assert_http_bytes(report.get("HTTP"), size, 1, "a download across a reload")


def test_a_50_mb_download_across_three_reloads_is_counted_exactly(station, http_backend):
    """Issue 9: the old process serving a long download is read until that download ends."""
    station.start()
    port = _serve_http(station, [http_backend()])
    station.metrics()
    size = 50 * 1000 * 1000
    request = SlowRequest(port, size=size, seconds=4)
    algorithms = ["LEAST_CONNECTIONS", "ROUND_ROBIN", "LEAST_CONNECTIONS"]
    serving = set()
    for algorithm in algorithms:                    # each one a real reload
        time.sleep(0.5)
        _serve_http(station, [http_backend()], port=port, algorithm=algorithm)
        serving.add(station.serving_pid())
    assert len(serving) == 3, "the three UPDATEs did not each start a new HAProxy process"
    assert len(request.finish()) == size
    report = station.metrics()
    assert_http_bytes(report.get("HTTP"), size, 1, "a 50 MB download across three reloads")
