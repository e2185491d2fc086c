"""ARCHIVE never sends the token anywhere but the endpoint it was given.

The endpoint here is a hostile "Swift" (a RequestLineRecorder) that
answers 307 to the container HEAD, or to the object PUT, pointing at a
second recorder: the worker must FAIL at once, naming the redirect, and
the second one must never be asked anything.  An endpoint with
credentials in its URL is refused before any request is made, without
quoting them back.
"""
import random
import time

import pytest

from support.recorder import RequestLineRecorder
from support.worker import unique_name
from test_archive import haproxy_log, http_line, tcp_line, worker_ini

# scripts/test runs these once, where HAProxy cannot run (scripts/without-haproxy).
pytestmark = pytest.mark.no_haproxy

TOKEN = "AUTH_tk" + "7" * 32
SWIFT_TIMEOUT = 3


@pytest.fixture
def logged_worker(worker):
    process = worker(extra_ini=worker_ini())
    rnd = random.Random(2)
    haproxy_log(process).write_bytes(b"".join(http_line(rnd) + tcp_line(rnd) for _ in range(3)))
    return process


@pytest.fixture
def trap():
    with RequestLineRecorder("elsewhere") as server:
        yield server


@pytest.fixture
def endpoint():
    with RequestLineRecorder("swift") as server:
        yield server


def _archive(endpoint_url, container):
    """ARCHIVE as Libra's API server sends it (send_archive)."""
    return {"hpcs_action": "ARCHIVE", "hpcs_object_store_basepath": container,
            "hpcs_object_store_endpoint": endpoint_url, "hpcs_object_store_token": TOKEN,
            "hpcs_object_store_type": "swift",
            "loadBalancers": [{"id": "42", "name": "lb-42", "protocol": "HTTP"}]}


def _redirect_on(method, trap):
    """An answer(): 307 to `trap` for `method`, Swift-like success for the rest."""
    def answer(asked, path):
        if asked == method:
            return "307 Temporary Redirect", [f"Location: http://{trap.address}{path}"]
        if asked == "HEAD":
            return "204 No Content", []
        return "201 Created", []
    return answer


@pytest.mark.parametrize("method", ["HEAD", "PUT"])
def test_a_redirect_is_not_followed_and_the_token_goes_nowhere_else(
        logged_worker, gear_client, endpoint, trap, method):
    endpoint.answer = _redirect_on(method, trap)
    container = unique_name("c")
    started = time.monotonic()
    reply = gear_client.submit(logged_worker.name,
                               _archive(f"http://{endpoint.address}/v1/AUTH_test", container),
                               timeout=30.0, alive=logged_worker.alive)
    elapsed = time.monotonic() - started
    # Read as Libra's _send_message reads it: badRequest first, then hpcs_response, then hpcs_error.
    assert "badRequest" not in reply, reply
    assert reply["hpcs_response"] == "FAIL", reply
    error = reply["hpcs_error"]
    assert "307" in error and "redirect" in error, error
    assert TOKEN not in error and reply["hpcs_object_store_token"] == "*****", reply
    assert elapsed < SWIFT_TIMEOUT, f"took {elapsed:.1f}s"
    assert trap.seen() == [], f"the worker followed the redirect: {trap.seen()}"
    heads = endpoint.heads
    assert heads and heads[-1].startswith(method.encode()), heads
    assert all(TOKEN.encode() in head for head in heads), "the endpoint itself did get the token"
    assert TOKEN not in logged_worker.log_text()


@pytest.mark.parametrize("netloc", ["alice:s3cr3t@{address}", "alice@{address}", ":s3cr3t@{address}"])
def test_an_endpoint_with_credentials_is_refused_before_any_request(
        logged_worker, gear_client, endpoint, netloc):
    url = f"http://{netloc.format(address=endpoint.address)}/v1/AUTH_test"
    reply = gear_client.submit(logged_worker.name, _archive(url, unique_name("c")),
                               timeout=30.0, alive=logged_worker.alive)
    assert reply["hpcs_response"] == "FAIL", reply
    assert reply["badRequest"]["validationErrors"]["message"] == reply["hpcs_error"], reply
    assert "credentials" in reply["hpcs_error"], reply
    assert "s3cr3t" not in reply["hpcs_error"] and "alice" not in reply["hpcs_error"], reply
    assert endpoint.seen() == [], "a request went out to an endpoint with credentials"
    assert "s3cr3t" not in logged_worker.log_text()
