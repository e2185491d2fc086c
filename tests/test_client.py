"""bin/client.py: what it sends, what it prints, and its exit statuses.

0 for a PASS reply, 1 for a FAIL reply, 2 for usage errors, time-outs and
unreachable job servers (with a one-line reason on stderr).
"""
import json
import socket
import subprocess
import time

import pytest

from support.gearworker import RecordingWorker
from support.ports import free_port
from support.worker import CLIENT_SCRIPT, PYTHON, unique_name

# scripts/test runs these once, where HAProxy cannot run (scripts/without-haproxy).
pytestmark = pytest.mark.no_haproxy


def run_client(*args, timeout=20):
    started = time.monotonic()
    result = subprocess.run([str(PYTHON), str(CLIENT_SCRIPT), *map(str, args)], capture_output=True,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    result.elapsed = time.monotonic() - started
    return result


def assert_usage_failure(result):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"want one line on stderr, got {result.stderr!r}"
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() == ""


def printed_reply(result):
    reply = json.loads(result.stdout)
    assert result.stdout.startswith("{\n  "), f"not indented JSON: {result.stdout[:80]!r}"
    return reply


def test_pass_reply_exits_0(worker, gearmand):
    process = worker()
    result = run_client("-s", gearmand.address, "--name", process.name, "--timeout", 10, "DISCOVER")
    assert result.returncode == 0, result.stderr
    reply = printed_reply(result)
    assert reply["hpcs_action"] == "DISCOVER" and reply["hpcs_response"] == "PASS"
    assert "version" in reply and "release" in reply


def test_fail_reply_exits_1(worker, gearmand):
    process = worker()
    result = run_client("-s", gearmand.address, "--name", process.name, "--timeout", 10, "FROB")
    assert result.returncode == 1, (result.stdout, result.stderr)
    reply = printed_reply(result)
    assert reply["hpcs_response"] == "FAIL" and reply["hpcs_error"]


def test_json_and_file_are_sent_as_given(worker, gearmand, tmp_path):
    process = worker()
    request = {"hpcs_action": "DISCOVER", "trace": "t-42"}
    result = run_client("-s", gearmand.address, "--name", process.name, "--json", json.dumps(request))
    assert result.returncode == 0, result.stderr
    assert printed_reply(result)["trace"] == "t-42"

    path = tmp_path / "request.json"
    path.write_text(json.dumps(dict(request, trace="from-file")))
    result = run_client("-s", gearmand.address, "--name", process.name, "--file", path)
    assert result.returncode == 0, result.stderr
    assert printed_reply(result)["trace"] == "from-file"


def test_unreachable_job_server_exits_2():
    result = run_client("-s", f"127.0.0.1:{free_port()}", "--name", unique_name(), "--timeout", 3,
                        "DISCOVER")
    assert_usage_failure(result)
    assert result.elapsed < 10


def test_no_worker_times_out_with_2(gearmand):
    result = run_client("-s", gearmand.address, "--name", unique_name("nobody"), "--timeout", 1,
                        "DISCOVER")
    assert_usage_failure(result)
    assert result.elapsed < 6, f"--timeout 1 took {result.elapsed:.1f}s"


def test_one_dead_server_of_two_still_works(worker, gearmand):
    process = worker()
    result = run_client("-s", f"127.0.0.1:{free_port()}", "-s", gearmand.address,
                        "--name", process.name, "--timeout", 10, "DISCOVER")
    assert result.returncode == 0, result.stderr
    assert printed_reply(result)["hpcs_response"] == "PASS"


@pytest.mark.parametrize("args", [
    ["--no-such-flag"],
    ["-s", "127.0.0.1:notaport", "DISCOVER"],
    ["--timeout", "soon", "DISCOVER"],
    ["DISCOVER", "--json", '{"hpcs_action": "DISCOVER"}'],
], ids=["unknown flag", "bad port", "bad timeout", "action and --json"])
def test_usage_errors_exit_2(args):
    result = run_client(*args, timeout=15)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip(), "a usage error says why on stderr"
    assert "Traceback" not in result.stderr


def test_missing_file_exits_2(tmp_path, gearmand):
    result = run_client("-s", gearmand.address, "--file", tmp_path / "absent.json", "--timeout", 2)
    assert_usage_failure(result)


# --- what the client sends, seen by a plain gear worker --------------------

def _pass(payload):
    request = json.loads(payload)
    request["hpcs_response"] = "PASS"
    return json.dumps(request).encode()


def test_action_alone_sends_just_the_action(gearmand):
    name = unique_name("recorder")
    with RecordingWorker([gearmand], name, reply=_pass) as recorder:
        result = run_client("-s", gearmand.address, "--name", name, "--timeout", 10, "STATS")
    assert result.returncode == 0, result.stderr
    assert [json.loads(payload) for payload in recorder.payloads] == [{"hpcs_action": "STATS"}]


def test_no_arguments_send_a_sample_update(gearmand):
    name = unique_name("recorder")
    with RecordingWorker([gearmand], name, reply=_pass) as recorder:
        result = run_client("-s", gearmand.address, "--name", name, "--timeout", 10)
    assert result.returncode == 0, result.stderr
    (payload,) = recorder.payloads
    request = json.loads(payload)
    assert request["hpcs_action"] == "UPDATE"
    (balancer,) = request["loadBalancers"][:1]
    assert balancer["protocol"] in ("HTTP", "TCP", "GALERA")
    assert balancer["nodes"] and all({"id", "address", "port"} <= set(node) for node in balancer["nodes"])


def test_name_defaults_to_hostname(gearmand):
    with RecordingWorker([gearmand], socket.gethostname(), reply=_pass) as recorder:
        result = run_client("-s", gearmand.address, "--timeout", 10, "DISCOVER")
    assert result.returncode == 0, result.stderr
    assert len(recorder.payloads) == 1


def test_non_json_reply_is_not_a_pass(gearmand):
    name = unique_name("recorder")
    with RecordingWorker([gearmand], name, reply=lambda payload: b"not json"):
        result = run_client("-s", gearmand.address, "--name", name, "--timeout", 10, "DISCOVER")
    assert result.returncode != 0
    assert result.stderr.strip()
