"""Every value Libra's API accepts, through a real HAProxy: an HTTP monitor path
reaches the back-end byte for byte, and the timeouts, retries and monitor
numbers at the ends of the API's ranges are applied.

A RequestLineRecorder is the node: it keeps the raw request line of every
request, so the test reads what HAProxy's health check really sent.  One
device (gearmand + worker + HAProxy) serves the module.
"""
import string

import pytest

from support.ports import free_port
from support.recorder import RequestLineRecorder, check_line, raw_get
from support.traffic import http_get, lb, update, wait_until

# Libra's API keeps these through urllib.quote(path, "/~+*,;:!$'[]()?&=#%").
API_CHARACTERS = "'#$;()[]?&=%~+*,!:"
EVERY_PRINTABLE = "".join(chr(code) for code in range(0x21, 0x7f))
CHECK_WITHIN = 15.0       # inter 1s, on a machine shared with other test runs


@pytest.fixture
def recorder():
    with RequestLineRecorder("rec") as server:
        yield server


def _monitor(path):
    return {"type": "HTTP", "delay": 1, "timeout": 1, "attempts": 1, "path": path}


def _node(server, **fields):
    return {"id": 11, "address": server.host, "port": server.port, "weight": 1,
            "condition": "ENABLED", "backup": "FALSE", **fields}


def _assert_check_sent(recorder, path):
    line = check_line(path)
    wait_until(lambda: recorder.count(line), CHECK_WITHIN,
               what=f"a health check with request line {line[:80]!r}...")


def _assert_traffic(port, recorder):
    status, body = raw_get(port, "/traffic")
    assert status == 200 and body == recorder.name.encode(), (status, body)


def _paths():
    yield from (f"/{char}" for char in API_CHARACTERS)          # each alone, at the end
    yield from (f"/a{char}b" for char in API_CHARACTERS)        # and inside a path
    yield "/" + EVERY_PRINTABLE                                 # all of printable ASCII at once
    yield "/${HOME}/$HOME/#not-a-comment/'quoted'/\"dq\"/\\x41/\\"
    yield "/health?x=1&y=%20#frag"


def test_each_path_character_reaches_the_backend_byte_for_byte(shared_device, recorder):
    port = free_port()
    for path in _paths():
        message = update(lb("HTTP", port, [_node(recorder)], monitor=_monitor(path)))
        shared_device.must_pass(message)
        _assert_check_sent(recorder, path)
        _assert_traffic(port, recorder)


def test_a_2000_character_path_reaches_the_backend_byte_for_byte(shared_device, recorder):
    port = free_port()
    pattern = string.ascii_letters + string.digits + API_CHARACTERS + "/-._"
    mixed = ("/" + pattern * 40)[:2000]
    assert len(mixed) == 2000 and mixed.count("'") > 20 and "#" in mixed and "$" in mixed
    quotes = "/" + "'" * 1999          # the longest config line: each quote is written '\''
    for path in (mixed, quotes):
        shared_device.must_pass(update(lb("HTTP", port, [_node(recorder)], monitor=_monitor(path))))
        _assert_check_sent(recorder, path)
        _assert_traffic(port, recorder)


@pytest.mark.parametrize("path, why", [
    ("/a b", "a space"), ("/a\tb", "a tab"), ("/a\nb", "a newline"), ("/caf\u00e9", "non-ASCII"),
    ("/a\x7fb", "DEL"), ("/" + "a" * 2000, "2,001 characters"), ("health", "no leading '/'"),
])
def test_a_path_haproxy_cannot_send_fails_clearly_and_changes_nothing(shared_device, recorder, path, why):
    port = free_port()
    shared_device.must_pass(update(lb("HTTP", port, [_node(recorder)], monitor=_monitor("/good"))))
    before = shared_device.config_bytes()
    reply = shared_device.submit(update(lb("HTTP", port, [_node(recorder)], monitor=_monitor(path))))
    assert reply["hpcs_response"] == "FAIL", (why, reply)
    assert reply["badRequest"]["validationErrors"]["message"] == reply["hpcs_error"], reply
    assert "monitor.path" in reply["hpcs_error"] and "\n" not in reply["hpcs_error"], reply
    assert shared_device.config_bytes() == before, f"{why}: the config changed after a FAIL"
    _assert_traffic(port, recorder)


# --------------------------------------------------------------------------
# The ends of the API's numeric ranges
# --------------------------------------------------------------------------

@pytest.mark.parametrize("options, monitor", [
    ({"client_timeout": 0, "server_timeout": 0, "connect_timeout": 0, "connect_retries": 0},
     {"type": "CONNECT", "delay": 3600, "timeout": 3600, "attempts": 10}),
    ({"client_timeout": 1_000_000, "server_timeout": 1_000_000, "connect_timeout": 1_000_000,
      "connect_retries": 256},
     {"type": "HTTP", "delay": 1, "timeout": 1, "attempts": 1, "path": "/x"}),
    # What Libra's API server sends for a load balancer with its defaults.
    ({"client_timeout": 30000, "server_timeout": 30000, "connect_timeout": 30000,
      "connect_retries": 3},
     {"type": "CONNECT", "delay": 30, "timeout": 30, "attempts": 2}),
], ids=["lowest", "highest", "libra-defaults"])
def test_every_value_the_api_accepts_is_applied(shared_device, recorder, options, monitor):
    port = free_port()
    reply = shared_device.must_pass(update(lb("HTTP", port, [_node(recorder, weight=256)],
                                       options=options, monitor=monitor)))
    assert reply["loadBalancers"][0]["nodes"][0]["condition"] == "ENABLED", reply
    config = shared_device.config_bytes().decode()
    assert f"timeout client {options['client_timeout']}\n" in config
    assert f"timeout server {options['server_timeout']}\n" in config
    assert f"timeout connect {options['connect_timeout']}\n" in config
    assert f"retries {options['connect_retries']}\n" in config
    assert f"check inter {monitor['delay']}s rise {monitor['attempts']} fall {monitor['attempts']}" in config
    assert f"timeout check {monitor['timeout']}s\n" in config
    response = http_get(port, "/traffic")
    assert response.status == 200 and response.backend == recorder.name, response
