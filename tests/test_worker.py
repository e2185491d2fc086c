"""libra_worker as a process, through a real gearmand and a real gear client.

Issue 2: DISCOVER and DIAGNOSTICS, the envelope of every job (malformed
payloads, unknown fields, case of the action, the secret token), the one
INFO line per job, and the Gearman loop surviving job servers that go away.
"""
import json
import re
import socket
import time

import pytest

import libra_worker
from support.client import GearClient
from support.gearmand import Gearmand
from support.ports import free_port
from support.worker import WorkerProcess, unique_name

# scripts/test runs these once, where HAProxy cannot run (scripts/without-haproxy).
pytestmark = pytest.mark.no_haproxy

TIMEOUT = 10  # seconds for one job; a healthy worker answers in milliseconds


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One gearmand, one worker and one client for the stateless envelope tests.

    Each of those tests ends with a DISCOVER that must still PASS, so a
    payload that kills or wedges the worker fails the test that sent it.
    """
    tmp = tmp_path_factory.mktemp("shared")
    with Gearmand(tmp / "gearmand") as server:
        process = WorkerProcess(tmp / "worker", [server])
        process.start()
        try:
            process.wait_registered(15)
            with GearClient([server]) as client:
                yield process, client
        finally:
            process.stop()


def ask(shared, payload, timeout=TIMEOUT):
    process, client = shared
    return client.submit(process.name, payload, timeout, alive=process.alive)


def assert_still_serving(shared):
    reply = ask(shared, {"hpcs_action": "DISCOVER"})
    assert reply["hpcs_response"] == "PASS", reply


def assert_fail(reply):
    assert reply.get("hpcs_response") == "FAIL", reply
    error = reply.get("hpcs_error")
    assert isinstance(error, str) and error.strip(), reply
    assert "\n" not in error, f"hpcs_error is more than one line: {error!r}"
    assert "Traceback" not in error, error


# --- DISCOVER ------------------------------------------------------------

def test_discover_reports_version_and_release(shared):
    reply = ask(shared, {"hpcs_action": "DISCOVER"})
    assert reply["hpcs_action"] == "DISCOVER"
    assert reply["hpcs_response"] == "PASS"
    assert reply["release"] == libra_worker.__version__
    assert re.fullmatch(r"\d+\.\d+", reply["version"]), reply
    assert reply["release"].startswith(reply["version"] + "."), reply
    assert "hpcs_error" not in reply


@pytest.mark.parametrize("action", ["discover", "Discover", "DISCOVER"])
def test_action_value_is_case_insensitive(shared, action):
    reply = ask(shared, {"hpcs_action": action})
    assert reply["hpcs_response"] == "PASS", reply
    assert reply["hpcs_action"] == action, "the request's own fields come back untouched"
    assert reply["release"] == libra_worker.__version__


def test_unknown_fields_are_echoed_untouched(shared):
    request = {
        "hpcs_action": "DISCOVER",
        "x_correlation": "abc-123",
        "nested": {"list": [1, "two", None, 3.5, True], "empty": {}},
        "unicode": "h\u00e9llo \u2603",
        "loadbalancers": "lower-case name is just another unknown field",
    }
    reply = ask(shared, request)
    assert reply["hpcs_response"] == "PASS", reply
    for key, value in request.items():
        assert reply[key] == value, key


def test_function_name_defaults_to_hostname(worker, gear_client):
    """No [worker] name: the worker registers `socket.gethostname()`."""
    process = worker(extra_ini={"worker": {"name": None}})
    assert process.name == socket.gethostname()
    reply = gear_client.submit(socket.gethostname(), {"hpcs_action": "DISCOVER"}, TIMEOUT)
    assert reply["hpcs_response"] == "PASS"


# --- malformed payloads --------------------------------------------------

MALFORMED = {
    "invalid utf-8": b"\xff\xfe",
    "invalid utf-8 inside json": b'{"hpcs_action": "DISCOVER", "x": "\xff"}',
    "invalid json": b'{"hpcs_action": "DISCOVER"',
    "empty payload": b"",
    "json array": b'["DISCOVER"]',
    "json string": b'"DISCOVER"',
    "json number": b"42",
    "json null": b"null",
    "missing hpcs_action": b'{"loadBalancers": []}',
    "unknown action": b'{"hpcs_action": "FROB"}',
    "hpcs_action a number": b'{"hpcs_action": 5}',
    "hpcs_action a list": b'{"hpcs_action": ["DISCOVER"]}',
    "hpcs_action null": b'{"hpcs_action": null}',
    "hpcs_action empty": b'{"hpcs_action": ""}',
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_payload_gets_fail_and_next_job_is_served(shared, payload):
    assert_fail(ask(shared, payload))
    assert_still_serving(shared)


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_payload_reply_carries_bad_request(shared, payload):
    """PROTOCOL.md: a malformed request also gets `badRequest` (older API servers read it)."""
    reply = ask(shared, payload)
    assert_fail(reply)
    assert reply.get("badRequest") == {
        "code": "400", "message": "Validation fault", "details": "The object is not valid",
        "validationErrors": {"message": reply["hpcs_error"]},
    }, reply


def test_unknown_action_reply_keeps_the_request(shared):
    reply = ask(shared, {"hpcs_action": "FROB", "keep": [1, 2]})
    assert_fail(reply)
    assert "FROB" in reply["hpcs_error"]
    assert reply["hpcs_action"] == "FROB" and reply["keep"] == [1, 2], reply


# --- DIAGNOSTICS ---------------------------------------------------------

def test_diagnostics_checks_job_servers_and_network(worker, gearmand, gear_client, tcp_backend):
    outside = tcp_backend("outside")
    dead = f"127.0.0.1:{free_port()}"
    process = worker(servers=[gearmand, dead],
                     extra_ini={"worker": {"network_check": outside.address}})
    reply = gear_client.submit(process.name, {"hpcs_action": "DIAGNOSTICS"}, TIMEOUT)
    assert reply["hpcs_response"] == "PASS", reply
    assert reply["release"] == libra_worker.__version__
    assert reply["network"] == "PASS", reply
    # `host` is the host alone, as Libra's worker gave it; `port` beside it.
    assert sorted(reply["gearman"], key=lambda entry: entry["port"]) == sorted(
        [{"host": "127.0.0.1", "port": gearmand.port, "status": "PASS"},
         {"host": "127.0.0.1", "port": int(dead.rpartition(":")[2]), "status": "FAIL"}],
        key=lambda entry: entry["port"]), reply
    assert outside.connections >= 1, "the network check really connected to the target"


@pytest.mark.parametrize("network_check", [None, "unreachable"])
def test_diagnostics_network_fails_without_a_reachable_target(worker, gearmand, gear_client,
                                                             network_check):
    target = None if network_check is None else f"127.0.0.1:{free_port()}"
    process = worker(extra_ini={"worker": {"network_check": target}})
    reply = gear_client.submit(process.name, {"hpcs_action": "diagnostics"}, TIMEOUT)
    assert reply["network"] == "FAIL", reply
    assert reply["gearman"] == [{"host": "127.0.0.1", "port": gearmand.port, "status": "PASS"}], reply


# --- logging -------------------------------------------------------------

DURATION = re.compile(r"\d+(?:\.\d+)?\s*(?:ms|s|us|\u00b5s)\b")


def wait_for_log(process, needle, timeout=5.0):
    deadline = time.monotonic() + timeout
    while needle not in process.log_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} never appeared in {process.logfile}: {process.diagnosis()}")
        time.sleep(0.05)
    return process.log_text()


def test_one_info_line_per_job(shared):
    process, client = shared
    for request, verdict in (({"hpcs_action": "DISCOVER"}, "PASS"),
                             ({"hpcs_action": "FROB"}, "FAIL")):
        job = client.send(process.name, request)
        client.wait(job, TIMEOUT, alive=process.alive)
        handle = job.handle.decode()
        wait_for_log(process, handle)
        time.sleep(0.1)  # let any further line about this job land too
        text = process.log_text()
        lines = [line for line in text.splitlines() if re.search(re.escape(handle) + r"(?!\d)", line)]
        assert len(lines) == 1, f"expected one line for job {handle} at INFO, got {lines}"
        line = lines[0]
        assert request["hpcs_action"] in line, line
        assert verdict in line, line
        assert DURATION.search(line), f"no duration in {line!r}"


def test_token_is_masked_in_replies_and_debug_log(worker, gear_client):
    token = "tok-" + unique_name("secret")
    process = worker(args=["--debug"])
    requests = [
        {"hpcs_action": "DISCOVER", "hpcs_object_store_token": token},
        {"hpcs_action": "ARCHIVE", "hpcs_object_store_type": "swift",
         "hpcs_object_store_basepath": "lbaas", "hpcs_object_store_endpoint": "http://127.0.0.1:9/v1/x",
         "hpcs_object_store_token": token, "loadBalancers": [{"id": "1", "protocol": "HTTP"}]},
        {"hpcs_action": "FROB", "hpcs_object_store_token": token},
    ]
    for request in requests:
        raw = gear_client.submit_raw(process.name, request, TIMEOUT, alive=process.alive)
        assert token.encode() not in raw, f"{request['hpcs_action']} reply carries the token"
        reply = json.loads(raw)
        assert reply["hpcs_object_store_token"] == "*****", reply
    assert process.stop() is not None
    logged = process.log_text() + process.stderr_text() + process.stdout_text()
    assert "hpcs_object_store_token" in process.log_text(), \
        "at --debug the full request is logged (with the token masked)"
    assert token not in logged


def test_token_in_malformed_payload_is_not_logged(worker, gear_client):
    token = "tok-" + unique_name("secret")
    process = worker(args=["--debug"])
    payload = ('{"hpcs_action": "ARCHIVE", "hpcs_object_store_token": "%s", ' % token).encode()
    raw = gear_client.submit_raw(process.name, payload, TIMEOUT, alive=process.alive)
    assert token.encode() not in raw
    assert json.loads(raw)["hpcs_response"] == "FAIL"
    process.stop()
    assert token not in process.log_text() + process.stderr_text() + process.stdout_text()


# --- job servers coming and going ----------------------------------------

def _mentions(line, port):
    return "127.0.0.1" in line and re.search(rf"(?<!\d){port}(?!\d)", line)


def _repeated(lines):
    """Lines that occur more than once once their numbers (times, pids, delays) are blanked."""
    seen = {}
    for line in lines:
        key = re.sub(r"\d+", "#", line)
        seen[key] = seen.get(key, 0) + 1
    return {key: count for key, count in seen.items() if count > 1}


def test_reconnects_after_gearmand_restart_and_logs_outage_once(worker, gearmand):
    reconnect_sleep = 2
    process = worker(extra_ini={"gearman": {"reconnect_sleep": reconnect_sleep}})
    log_before = len(process.log_text().splitlines())
    err_before = len(process.stderr_text().splitlines())

    gearmand.stop()
    time.sleep(2 * reconnect_sleep + 0.5)   # several retries at the capped backoff
    assert process.alive(), f"the worker died without its job server: {process.diagnosis()}"
    gearmand.start()

    started = time.monotonic()
    with GearClient([gearmand]) as client:
        reply = client.submit(process.name, {"hpcs_action": "DISCOVER"}, reconnect_sleep + 4,
                              alive=process.alive)
    served_after = time.monotonic() - started
    assert reply["hpcs_response"] == "PASS"
    assert served_after <= reconnect_sleep + 3, f"served again only after {served_after:.1f}s"

    time.sleep(0.2)
    for label, lines, at_least in (("log file", process.log_text().splitlines()[log_before:], 1),
                                   ("stderr", process.stderr_text().splitlines()[err_before:], 0)):
        about_server = [line for line in lines if _mentions(line, gearmand.port)]
        assert at_least <= len(about_server) <= 2, \
            f"{label}: want one 'lost' (+ one 'reconnected') line for {gearmand.address}, got {about_server}"
        repeated = _repeated(line for line in lines if "DISCOVER" not in line)
        assert not repeated, f"{label}: lines repeated during one outage: {repeated}"


def test_two_job_servers_one_never_started(worker, gearmand):
    dead = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    process = worker(servers=[dead, gearmand], timeout=10)
    assert time.monotonic() - started < 8, "the dead job server held up registration"
    with GearClient([gearmand]) as client:
        for number in range(5):
            reply = client.submit(process.name, {"hpcs_action": "DISCOVER", "n": number}, TIMEOUT,
                                  alive=process.alive)
            assert reply["hpcs_response"] == "PASS" and reply["n"] == number
    assert gearmand.status()[process.name][2] == 1, "exactly one worker registered on the live server"


def test_job_server_that_starts_late_is_used(worker, gearmand, tmp_path):
    late = Gearmand(tmp_path / "late")
    process = worker(servers=[gearmand, late.address], extra_ini={"gearman": {"reconnect_sleep": 2}})
    with late:
        with GearClient([late]) as client:
            reply = client.submit(process.name, {"hpcs_action": "DISCOVER"}, 2 + 4,
                                  alive=process.alive)
        assert reply["hpcs_response"] == "PASS"


def test_worker_keeps_serving_when_one_of_two_servers_dies(worker, gearmand, tmp_path):
    other = Gearmand(tmp_path / "other").start()
    try:
        process = worker(servers=[gearmand, other])
        other.kill()
        with GearClient([gearmand]) as client:
            reply = client.submit(process.name, {"hpcs_action": "DISCOVER"}, TIMEOUT,
                                  alive=process.alive)
        assert reply["hpcs_response"] == "PASS"
    finally:
        other.stop()


def test_sigterm_stops_the_worker(worker):
    process = worker()
    started = time.monotonic()
    status = process.stop(timeout=5)
    assert time.monotonic() - started < 5, "SIGTERM did not stop the worker; it had to be killed"
    assert status in (0, -15, 143), status
