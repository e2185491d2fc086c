"""ARCHIVE against a real Swift (tests/support/swift.py) and a real worker, HAProxy and gearmand.

One Swift serves the whole module; tests that stop or pause part of it
bring it back before they end.  Each test uses a container of its own, so
"created if missing" and "nothing uploaded" can be checked.
"""
import gzip
import hashlib
import logging
import os
import random
import re
import socket
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import pytest

from support.ports import free_port
from support.device import Device
from support.traffic import http_get, lb, node, serves, tcp_exchange, update, wait_until
from support.worker import unique_name

from libra_worker.drivers.haproxy import archive, logsink
from libra_worker.errors import BadRequest, CommandFailed
from libra_worker.settings import HaproxySettings

TIMEOUT = 30.0
SWIFT_TIMEOUT = 3          # [worker:haproxy] job_timeout: each request to Swift
OBJECT_NAME = re.compile(r"^(?P<id>[^/]+)/haproxy-(?P<stamp>\d{8}-\d{6})\.log\.gz$")
SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------

@pytest.fixture
def container():
    return unique_name("lbaas")


def archive_request(swift, container, lb_id, protocol="HTTP", token=None, **extra):
    return {"hpcs_action": "ARCHIVE", "hpcs_object_store_type": "swift",
            "hpcs_object_store_basepath": container, "hpcs_object_store_endpoint": swift.storage_url,
            "hpcs_object_store_token": token or swift.token,
            "loadBalancers": [{"id": lb_id, "protocol": protocol}], **extra}


def worker_ini(tmpdir=None, **haproxy):
    values = {"job_timeout": SWIFT_TIMEOUT, **haproxy}
    return {"worker:haproxy": {key: str(value) for key, value in values.items()}}


def haproxy_log(process):
    return Path(process.sections["worker:haproxy"]["logfile"])


def submit(gear_client, process, message, timeout=TIMEOUT):
    reply = gear_client.submit(process.name, message, timeout=timeout, alive=process.alive)
    if "hpcs_object_store_token" in message:
        assert reply["hpcs_object_store_token"] == "*****", reply
    return reply


def must_pass(gear_client, process, message, timeout=TIMEOUT):
    reply = submit(gear_client, process, message, timeout)
    assert reply["hpcs_response"] == "PASS", f"{reply.get('hpcs_error')!r}; {process.diagnosis()}"
    return reply


def must_fail(gear_client, process, message, timeout=TIMEOUT, bad_request=False):
    reply = submit(gear_client, process, message, timeout)
    assert reply["hpcs_response"] == "FAIL", reply
    assert reply["hpcs_error"], reply
    if bad_request:
        assert reply["badRequest"]["validationErrors"]["message"] == reply["hpcs_error"], reply
    else:
        assert "badRequest" not in reply, reply
    return reply["hpcs_error"]


def container_exists(swift, container):
    from swiftclient.exceptions import ClientException
    try:
        swift.connection().head_container(container)
    except ClientException as error:
        if error.http_status == 404:
            return False
        raise
    return True


def objects(swift, container):
    return [item["name"] for item in swift.connection().get_container(container, full_listing=True)[1]]


def fetch(swift, container, name):
    """(ETag header, the object's bytes)."""
    headers, body = swift.connection().get_object(container, name)
    return headers["etag"], body


def syslog_line(message, pid=4242, when="Nov 22 18:26:39"):
    return f"{when} lb-device haproxy[{pid}]: {message}\n".encode()


def http_line(rnd, frontend="http", path=None):
    path = path or f"/item/{rnd.randrange(10 ** 9)}"
    return syslog_line(
        f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(256)}:{rnd.randrange(1024, 65535)} "
        f"[22/Nov/2026:18:26:39.{rnd.randrange(1000):03d}] {frontend} {frontend}_servers/{rnd.randrange(100, 120)} "
        f"0/0/0/{rnd.randrange(99)}/{rnd.randrange(999)} 200 {rnd.randrange(99999)} - - --NI 1/1/0/0/0 0/0 "
        f'"GET {path} HTTP/1.1"', pid=rnd.randrange(1000, 99999))


def tcp_line(rnd, frontend="tcp"):
    return syslog_line(
        f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(256)}:{rnd.randrange(1024, 65535)} "
        f"[22/Nov/2026:18:26:39.{rnd.randrange(1000):03d}] {frontend} {frontend}_servers/t{rnd.randrange(9)} "
        f"1/0/{rnd.randrange(9999)} {rnd.randrange(99999)} -- 1/1/0/0/0 0/0", pid=rnd.randrange(1000, 99999))


def belongs(line, frontend):
    """The test's own reading of 'this load balancer's line': its frontend accepted the
    connection, or the line names its frontend or its `<frontend>_servers` backend."""
    message = line.split(b"]: ", 1)[-1].split()
    if len(message) > 3 and message[1].startswith(b"["):
        return message[2].rstrip(b"~") == frontend.encode()
    words = set(message)
    backend = f"{frontend}_servers".encode()
    return (frontend.encode() in words and any(w in words for w in (b"Proxy", b"frontend", b"proxy"))) \
        or any(word.startswith(backend + b"/") or word == backend for word in words)


def stamp_between(stamp, before, after):
    when = datetime.strptime(stamp, "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)
    return before.replace(microsecond=0) <= when <= after


# --------------------------------------------------------------------------
# The whole path: traffic → HAProxy → log sink → ARCHIVE → Swift
# --------------------------------------------------------------------------

def test_http_and_tcp_archives_hold_exactly_their_lines(tmp_path, swift, container,
                                                        http_backend, tcp_backend):
    device = Device(tmp_path)
    log_socket = device.haproxy_dir / "log.sock"
    device.extra_ini["worker:haproxy"].update(worker_ini(log_target=log_socket)["worker:haproxy"])
    web, echo = http_backend(), tcp_backend()
    ports = free_port(), free_port()
    with device:
        device.must_pass(update(lb("HTTP", ports[0], [node("101", web)], id="lb-http-7"),
                                lb("TCP", ports[1], [node("t1", echo)], id=42)))
        assert f"log {log_socket} local0" in device.config_bytes().decode()
        wait_until(lambda: serves(ports[0]), what="the HTTP load balancer serving")
        paths = [f"/archive-test/{index}" for index in range(5)]
        for path in paths:
            assert http_get(ports[0], path).status == 404      # the back-end knows no such path
        payloads = [f"payload-{index}\n".encode() for index in range(3)]
        for payload in payloads:
            assert tcp_exchange(ports[1], payload) == (echo.name, payload)

        logfile = device.logfile

        def logged():
            lines = logfile.read_bytes().splitlines(keepends=True) if logfile.exists() else []
            gets = [line for line in lines if b'"GET /archive-test/' in line]
            tcps = [line for line in lines if b"] tcp tcp_servers/t1 " in line]
            return len(gets) == len(paths) and len(tcps) == len(payloads) and lines
        lines = wait_until(logged, what="HAProxy's lines reaching the log file through the sink")
        assert all(re.match(rb"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ haproxy\[\d+\]: ", line) for line in lines), lines
        size_before = logfile.stat().st_size

        assert not container_exists(swift, container)
        before = datetime.now(timezone.utc)
        must_pass(device.client, device.worker, archive_request(swift, container, "lb-http-7", "HTTP"))
        must_pass(device.client, device.worker, archive_request(swift, container, 42, "tcp"))
        after = datetime.now(timezone.utc)
        lines = logfile.read_bytes().splitlines(keepends=True)
        assert logfile.stat().st_size == size_before, "ARCHIVE must leave the log in place"

        names = objects(swift, container)
        by_id = {OBJECT_NAME.match(name)["id"]: name for name in names if OBJECT_NAME.match(name)}
        assert sorted(by_id) == ["42", "lb-http-7"] and len(names) == 2, names
        for lb_id, frontend, marker, count in (("lb-http-7", "http", b'"GET /archive-test/', 5),
                                               ("42", "tcp", b"] tcp tcp_servers/t1 ", 3)):
            name = by_id[lb_id]
            assert stamp_between(OBJECT_NAME.match(name)["stamp"], before, after), (name, before, after)
            etag, body = fetch(swift, container, name)
            assert etag == hashlib.md5(body).hexdigest()
            archived = gzip.decompress(body).splitlines(keepends=True)
            expected = [line for line in lines if belongs(line, frontend)]
            assert archived == expected, f"{frontend}: archived {archived} expected {expected}"
            assert sum(marker in line for line in archived) == count
        http_archive = gzip.decompress(fetch(swift, container, by_id["lb-http-7"])[1])
        assert b"tcp_servers" not in http_archive and all(path.encode() in http_archive for path in paths)

        # A restarted worker binds the socket again: the running HAProxy's lines still arrive.
        device.restart_worker()
        assert http_get(ports[0], "/after-restart").status == 404
        wait_until(lambda: b'"GET /after-restart ' in logfile.read_bytes(),
                   what="HAProxy's log reaching a restarted worker")


# --------------------------------------------------------------------------
# Object names
# --------------------------------------------------------------------------

@pytest.mark.no_haproxy
def test_hostile_lb_ids_become_safe_object_names(worker, gear_client, swift, container):
    process = worker(extra_ini=worker_ini())
    rnd = random.Random(6)
    haproxy_log(process).write_bytes(b"".join(http_line(rnd) for _ in range(3)))
    expected = {"../x": "___x", "a/b": "a_b", "..": "__", "/": "_", ".hidden": "_hidden",
                "x/../../etc/passwd": "x_______etc_passwd", "id with spaces": "id_with_spaces",
                "ünï": "_n_", 12345: "12345"}
    for lb_id in expected:
        must_pass(gear_client, process, archive_request(swift, container, lb_id, "HTTP",
                                                        hpcs_object_store_type="SWIFT"))
    names = objects(swift, container)
    assert len(names) == len(expected), names
    for name in names:
        segment, _, rest = name.partition("/")
        assert SAFE_SEGMENT.match(segment) and ".." not in name and "/" not in rest, name
    assert sorted(name.partition("/")[0] for name in names) == sorted(expected.values())


@pytest.mark.no_haproxy
def test_safe_id_rules():
    assert archive.safe_id("lb-1.a_B") == "lb-1.a_B"
    assert archive.safe_id("../x") == "___x"
    assert archive.safe_id("a/b") == "a_b"
    assert archive.safe_id(".") == "_"
    assert archive.safe_id(7) == "7"
    for bad in ("", True, None, 1.5, ["x"], "x" * 129):
        with pytest.raises(BadRequest, match=r"loadBalancers\[0\]\.id"):
            archive.safe_id(bad)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert archive.object_name("___x", when) == "___x/haproxy-20260102-030405.log.gz"


# --------------------------------------------------------------------------
# Swift refusing, failing, gone, silent
# --------------------------------------------------------------------------

@pytest.fixture
def logged_worker(worker):
    """A worker whose HAProxy log already holds a few HTTP and TCP lines."""
    process = worker(extra_ini=worker_ini())
    rnd = random.Random(1)
    haproxy_log(process).write_bytes(b"".join(http_line(rnd) + tcp_line(rnd) for _ in range(3)))
    return process


@pytest.mark.no_haproxy
def test_wrong_token_fails_naming_the_401(logged_worker, gear_client, swift, container):
    wrong = "AUTH_tk" + "0" * 32
    error = must_fail(gear_client, logged_worker, archive_request(swift, container, "1", token=wrong))
    assert "401" in error and "token" in error, error
    assert wrong not in error
    assert not container_exists(swift, container), "nothing may be created with a refused token"


@pytest.mark.no_haproxy
def test_swift_stopped_fails_at_once(logged_worker, gear_client, swift, container):
    message = archive_request(swift, container, "1")
    swift.stop()
    try:
        started = time.monotonic()
        error = must_fail(gear_client, logged_worker, message)
        elapsed = time.monotonic() - started
    finally:
        swift.start()
    assert elapsed < SWIFT_TIMEOUT, f"took {elapsed:.1f}s: {error}"
    assert "connection refused" in error and f"127.0.0.1:{swift.proxy_port}" in error, error
    assert not container_exists(swift, container)


@pytest.mark.no_haproxy
def test_swift_not_answering_fails_within_the_timeout(logged_worker, gear_client, swift, container):
    swift.pause("proxy")
    try:
        started = time.monotonic()
        error = must_fail(gear_client, logged_worker, archive_request(swift, container, "1"))
        elapsed = time.monotonic() - started
    finally:
        swift.resume("proxy")
    assert SWIFT_TIMEOUT - 0.5 <= elapsed < SWIFT_TIMEOUT + 3, f"took {elapsed:.1f}s: {error}"
    assert f"did not answer within {SWIFT_TIMEOUT}s" in error, error


@pytest.mark.no_haproxy
def test_swift_5xx_fails_naming_the_status(logged_worker, gear_client, swift, container):
    swift.stop_server("object")
    try:
        error = must_fail(gear_client, logged_worker, archive_request(swift, container, "1"))
    finally:
        swift.start_server("object")
    assert re.search(r"\b503\b", error) and "PUT object" in error, error
    assert objects(swift, container) == []


@pytest.mark.no_haproxy
def test_checksum_mismatch_is_caught_by_swift(tmp_path, swift, container):
    body = gzip.compress(b"a line\n")
    path = tmp_path / "object.gz"
    path.write_bytes(body)
    request = archive.parse_request(archive_request(swift, container, "1"))
    wrong = archive.Compressed(str(path), len(body), hashlib.md5(b"something else").hexdigest(), 1, 7)
    with pytest.raises(CommandFailed, match=r"^checksum mismatch: .*422"):
        archive.SwiftUpload(request, SWIFT_TIMEOUT).upload(wrong, "1/haproxy-20260101-000000.log.gz")
    assert objects(swift, container) == []
    right = archive.Compressed(str(path), len(body), hashlib.md5(body).hexdigest(), 1, 7)
    assert archive.SwiftUpload(request, SWIFT_TIMEOUT).upload(right, "1/x.log.gz") == right.md5
    assert objects(swift, container) == ["1/x.log.gz"]


# --------------------------------------------------------------------------
# No log
# --------------------------------------------------------------------------

@pytest.mark.no_haproxy
def test_no_log_fails(worker, gear_client, swift, container):
    process = worker(extra_ini=worker_ini())
    logfile = haproxy_log(process)
    assert not logfile.exists()
    error = must_fail(gear_client, process, archive_request(swift, container, "1"))
    assert error == f"no HAProxy log to archive: {logfile} does not exist"

    logfile.write_bytes(b"")
    error = must_fail(gear_client, process, archive_request(swift, container, "1"))
    assert error == f"no HAProxy log lines for load balancer '1' (HTTP) in {logfile}"

    rnd = random.Random(2)
    logfile.write_bytes(b"".join(tcp_line(rnd) for _ in range(5)))
    error = must_fail(gear_client, process, archive_request(swift, container, "lb-9", "HTTP"))
    assert error == f"no HAProxy log lines for load balancer 'lb-9' (HTTP) in {logfile}"
    assert not container_exists(swift, container)
    assert not any(Path(process.dir).rglob("archive-*")), "temp dirs left behind"


# --------------------------------------------------------------------------
# Malformed requests
# --------------------------------------------------------------------------

@pytest.mark.no_haproxy
def test_missing_fields_are_each_named(worker, gear_client, swift, container):
    process = worker(extra_ini=worker_ini())
    complete = archive_request(swift, container, "1")
    for field in archive.REQUIRED_FIELDS:
        message = {key: value for key, value in complete.items() if key != field}
        error = must_fail(gear_client, process, message, bad_request=True)
        assert error == f"Missing '{field}' element", error
    for field in ("id", "protocol"):
        message = dict(complete, loadBalancers=[{key: value for key, value in complete["loadBalancers"][0].items()
                                                 if key != field}])
        error = must_fail(gear_client, process, message, bad_request=True)
        assert error == f"Missing 'loadBalancers[0].{field}' element", error
    error = must_fail(gear_client, process, {"hpcs_action": "ARCHIVE", "loadBalancers": [{}]},
                      bad_request=True)
    for field in (*archive.REQUIRED_FIELDS[:-1], "loadBalancers[0].id", "loadBalancers[0].protocol"):
        assert f"'{field}'" in error, error
    assert error.startswith("Missing ") and error.endswith(" elements"), error
    error = must_fail(gear_client, process, dict(complete, hpcs_object_store_endpoint=None), bad_request=True)
    assert error == "Missing 'hpcs_object_store_endpoint' element"


@pytest.mark.parametrize("changes, expected", [
    ({"loadBalancers": []}, "loadBalancers: must name the load balancer"),
    ({"loadBalancers": "1"}, "loadBalancers: must be a list"),
    ({"loadBalancers": [{"id": "1", "protocol": "UDP"}]}, "loadBalancers[0].protocol: must be one of"),
    ({"loadBalancers": [{"id": {"a": 1}, "protocol": "HTTP"}]}, "loadBalancers[0].id: must be a string"),
    ({"hpcs_object_store_basepath": "a/b"}, "hpcs_object_store_basepath: a container name has no '/'"),
    ({"hpcs_object_store_endpoint": "ftp://127.0.0.1/v1/x"}, "hpcs_object_store_endpoint: must be an http"),
    ({"hpcs_object_store_endpoint": "http://127.0.0.1/v1/x y"}, "hpcs_object_store_endpoint: must be a URL"),
    ({"hpcs_object_store_token": "tok\r\nX-Evil: 1"}, "hpcs_object_store_token: must be 1-8192 visible"),
    ({"hpcs_object_store_token": 7}, "hpcs_object_store_token: must be a string"),
])
@pytest.mark.no_haproxy
def test_bad_values_are_refused_before_anything_is_read(changes, expected):
    message = dict({"hpcs_object_store_type": "swift", "hpcs_object_store_basepath": "c",
                    "hpcs_object_store_endpoint": "http://127.0.0.1:1/v1/AUTH_x",
                    "hpcs_object_store_token": "tok", "loadBalancers": [{"id": "1", "protocol": "HTTP"}]},
                   **changes)
    with pytest.raises(BadRequest) as caught:
        archive.parse_request(message)
    assert str(caught.value).startswith(expected), caught.value
    assert "Evil" not in str(caught.value)


@pytest.mark.no_haproxy
def test_store_type_other_than_swift_fails(worker, gear_client, swift, container):
    process = worker(extra_ini=worker_ini())
    rnd = random.Random(3)
    haproxy_log(process).write_bytes(http_line(rnd))
    for store_type in ("s3", "swift2", "", 5):
        error = must_fail(gear_client, process, archive_request(swift, container, "1",
                                                                hpcs_object_store_type=store_type),
                          bad_request=True)
        assert error.startswith("hpcs_object_store_type: only 'swift' is supported"), error
    assert not container_exists(swift, container)


# --------------------------------------------------------------------------
# The token
# --------------------------------------------------------------------------

@pytest.mark.no_haproxy
def test_token_never_appears_in_the_debug_log(worker, gear_client, swift, container):
    process = worker(extra_ini=worker_ini(), args=["--debug"])
    rnd = random.Random(4)
    haproxy_log(process).write_bytes(http_line(rnd) * 2)
    secret_part = swift.token[len("AUTH_tk"):]
    wrong = "AUTH_tk" + hashlib.md5(secret_part.encode()).hexdigest()
    must_pass(gear_client, process, archive_request(swift, container, "1"))
    must_fail(gear_client, process, archive_request(swift, container, "1", token=wrong))
    must_fail(gear_client, process, archive_request(swift, container, "1",
                                                    token=swift.token + "\r\nX-Leak: " + swift.token),
              bad_request=True)
    swift.stop_server("object")
    try:
        must_fail(gear_client, process, archive_request(swift, container, "2"))
    finally:
        swift.start_server("object")
    process.stop()
    logged = process.log_text() + process.stderr_text() + process.stdout_text()
    assert "ARCHIVE" in logged and "hpcs_object_store_token" in logged, "the --debug log shows the requests"
    for secret in (secret_part, wrong[len("AUTH_tk"):]):
        for piece in (secret, secret[:8], secret[-8:]):
            assert piece not in logged, f"the worker's log shows {piece!r}"


@pytest.mark.no_haproxy
def test_swiftclient_logging_never_shows_the_token(swift, container, tmp_path):
    """Even with swiftclient's logger at DEBUG (the worker keeps it at WARNING)."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    swift_logger = logging.getLogger("swiftclient")
    handler, level = Keep(), swift_logger.level
    swift_logger.addHandler(handler)
    swift_logger.setLevel(logging.DEBUG)
    body = gzip.compress(b"line\n")
    path = tmp_path / "o.gz"
    path.write_bytes(body)
    wrong = "AUTH_tk" + "5" * 32
    try:
        request = archive.parse_request(archive_request(swift, container, "1", token=wrong))
        with pytest.raises(CommandFailed, match="401"):
            archive.SwiftUpload(request, SWIFT_TIMEOUT).upload(
                archive.Compressed(str(path), len(body), hashlib.md5(body).hexdigest(), 1, 5), "1/o.gz")
    finally:
        swift_logger.removeHandler(handler)
        swift_logger.setLevel(level)
    assert any("401" in record for record in records), records
    assert not any("5555" in record for record in records), records


# --------------------------------------------------------------------------
# A big log: streaming, flat memory
# --------------------------------------------------------------------------

def _status(pid, field):
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) * 1024


def write_big_log(path, size):
    """~size bytes of HTTP (4 of 5) and TCP lines → MD5 of the HTTP lines, in order.

    4 MB of distinct lines repeated: gzip's window (32 KB) cannot see the repetition.
    """
    rnd = random.Random(200)
    block, http, block_size = [], [], 0
    while block_size < 4 * 1024 * 1024:
        for _ in range(4):
            line = http_line(rnd)
            block.append(line)
            http.append(line)
            block_size += len(line)
        block.append(tcp_line(rnd))
        block_size += len(block[-1])
    block, http = b"".join(block), b"".join(http)
    expected = hashlib.md5()
    written = 0
    with open(path, "wb") as stream:
        while written < size:
            stream.write(block)
            expected.update(http)
            written += len(block)
    return written, expected.hexdigest()


@pytest.mark.no_haproxy
def test_200mb_log_is_archived_with_flat_memory(worker, gear_client, swift, container):
    process = worker(extra_ini=worker_ini(job_timeout=60))
    try:
        _archive_big_log(process, gear_client, swift, container)
    finally:
        haproxy_log(process).unlink(missing_ok=True)    # pytest keeps tmp dirs: not 200 MB of them


def _archive_big_log(process, gear_client, swift, container):
    size, expected_md5 = write_big_log(haproxy_log(process), 200 * 1024 * 1024)
    assert size >= 200 * 1024 * 1024
    try:                     # the peak so far is forgotten: VmHWM restarts from the current RSS
        Path(f"/proc/{process.pid}/clear_refs").write_text("5")
    except OSError:
        pass                 # then VmHWM may include an earlier peak: the check only gets stricter
    rss_before = _status(process.pid, "VmRSS")
    must_pass(gear_client, process, archive_request(swift, container, "big", "HTTP"), timeout=180)
    growth = _status(process.pid, "VmHWM") - rss_before
    assert growth < 20 * 1024 * 1024, f"the worker's RSS grew by {growth / 2 ** 20:.1f} MB"

    (name,) = objects(swift, container)
    assert OBJECT_NAME.match(name)["id"] == "big"
    headers, chunks = swift.connection().get_object(container, name, resp_chunk_size=1 << 20)
    packed, unpacked = hashlib.md5(), hashlib.md5()
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    for chunk in chunks:
        packed.update(chunk)
        unpacked.update(inflate.decompress(chunk))
    unpacked.update(inflate.flush())
    assert inflate.eof
    assert headers["etag"] == packed.hexdigest()
    assert unpacked.hexdigest() == expected_md5, "the archive is not exactly the HTTP lines"
    assert not any(Path(process.dir).rglob("archive-*")), "temp dirs left behind"


# --------------------------------------------------------------------------
# Pieces: line selection and the log sink
# --------------------------------------------------------------------------

HAPROXY_LINES = [   # as HAProxy 2.6 sent them to a unix socket (after the sink)
    (b'Nov 22 18:26:37 h haproxy[19896]: Server http_servers/101 is DOWN, reason: Layer4 connection '
     b'problem, info: "Connection refused", check duration: 0ms. 0 active and 0 backup servers left.', "HTTP"),
    (b"Nov 22 18:26:37 h haproxy[19896]: backend http_servers has no server available!", "HTTP"),
    (b"Nov 22 18:26:38 h haproxy[19896]: Server tcp_servers/t1 is UP, reason: Layer4 check passed", "TCP"),
    (b"Nov 22 18:26:38 h haproxy[19896]: backend galera_servers has no server available!", "GALERA"),
    (b"Nov 22 18:26:39 h haproxy[19896]: 127.0.0.1:38016 [22/Nov/2026:18:26:39.039] http "
     b'http_servers/<NOSRV> 0/-1/-1/-1/0 503 217 - - SC-- 1/1/0/0/0 0/0 "GET /tcp tcp_servers/x HTTP/1.1"', "HTTP"),
    (b"Nov 22 18:26:39 h haproxy[19896]: ::1:40000 [22/Nov/2026:18:26:39.100] tcp tcp_servers/t1 "
     b"1/0/5 23 -- 1/1/0/0/0 0/0", "TCP"),
    (b"Nov 22 18:26:40 h haproxy[7]: Proxy http started.", "HTTP"),
    (b"Nov 22 18:26:40 h haproxy[7]: Stopping frontend galera in 0 ms.", "GALERA"),
    (b"Nov 22 18:26:40 h haproxy[7]: Proxy tcp stopped (cumulated conns: FE: 3, BE: 0).", "TCP"),
    (b"Nov 22 18:26:40 haproxy haproxy[7]: Connect from 127.0.0.1:5 to 127.0.0.1:80 (http/HTTP)", "HTTP"),
    (b"Nov 22 18:26:40 h haproxy[7]: Server httpx_servers/1 is UP", None),
    (b"Nov 22 18:26:40 h haproxy[7]: Loading success.", None),
    (b"Nov 22 18:26:40 h haproxy[7]: 127.0.0.1:1 [22/Nov/2026:18:26:39.039] stats stats/<STATS> 0/0", None),
]


@pytest.mark.parametrize("line, owner", HAPROXY_LINES)
@pytest.mark.no_haproxy
def test_line_selection(line, owner):
    for protocol in ("HTTP", "TCP", "GALERA"):
        assert archive.LineSelector(protocol)(line + b"\n") == (protocol == owner), protocol


@pytest.mark.no_haproxy
def test_log_sink_appends_reopens_and_refuses_a_live_socket(tmp_path):
    sock_path, logfile = tmp_path / "log.sock", tmp_path / "haproxy.log"
    assert logsink.for_settings(HaproxySettings(service="process", log_target="/dev/log")) is None
    assert logsink.for_settings(HaproxySettings(service="system", log_target=str(sock_path))) is None
    sink = logsink.for_settings(HaproxySettings(service="process", log_target=str(sock_path),
                                                logfile=str(logfile)))
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)   # a dead worker's socket file
    leftover.bind(str(sock_path))
    leftover.close()
    sink.start()
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with pytest.raises(OSError, match="another process receives"):
            logsink.LogSink(str(sock_path), str(logfile)).start()
        sender.sendto(b"<134>Nov 22 18:26:39 haproxy[1]: first\n", str(sock_path))
        sender.sendto(b"<134>Nov  2 08:06:09 haproxy[1]: two\nlines\0", str(sock_path))
        host = socket.gethostname()
        wait_until(lambda: logfile.exists() and logfile.read_text().count("\n") == 2, timeout=5)
        assert logfile.read_text() == (f"Nov 22 18:26:39 {host} haproxy[1]: first\n"
                                       f"Nov  2 08:06:09 {host} haproxy[1]: two lines\n")
        os.rename(logfile, tmp_path / "haproxy.log.1")                 # logrotate
        sender.sendto(b"<134>Nov 22 18:26:40 haproxy[1]: after rotation\n", str(sock_path))
        wait_until(lambda: logfile.exists() and logfile.read_text().endswith("after rotation\n"), timeout=5)
        assert logfile.read_text().count("\n") == 1
        logfile.unlink()                                               # DELETE
        sender.sendto(b"<134>Nov 22 18:26:41 haproxy[1]: after delete\n", str(sock_path))
        wait_until(lambda: logfile.exists() and logfile.read_text().endswith("after delete\n"), timeout=5)
        assert oct(logfile.stat().st_mode & 0o777) == oct(logsink.FILE_MODE)
    finally:
        sender.close()
        sink.stop()
    assert not sock_path.exists() and not sink.running
