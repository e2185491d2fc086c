"""The wire against independent Gearman implementations (issue 14).

- libgearman's `gearman` CLI (client and worker mode) and `gearadmin` (Debian gearman-tools);
- Perl's Gearman::Client and Gearman::Worker (Debian libgearman-client-perl);
- gear (Python), which the rest of the suite uses as its client.
Covered: unique ids, several job servers, a job server restart, and a reply
to a job server that restarted in the middle of the job.
"""
import json
import shutil
import subprocess
import textwrap
import threading
import time

import pytest

from support.client import GearClient
from support.faults import SlowHaproxy
from support.gearmand import Gearmand
from support.ports import free_port
from support.worker import CLIENT_SCRIPT, PYTHON, unique_name

GEARMAN = shutil.which("gearman") or "/usr/bin/gearman"
GEARADMIN = shutil.which("gearadmin") or "/usr/bin/gearadmin"


def _need(path, package):
    if not shutil.which(path):
        pytest.fail(f"{path} is missing: apt-get install {package} (scripts/bootstrap installs it)")


@pytest.fixture(autouse=True)
def tools():
    _need(GEARMAN, "gearman-tools")
    _need(GEARADMIN, "gearman-tools")
    if subprocess.run(["perl", "-MGearman::Client", "-MGearman::Worker", "-e", "1"],
                      capture_output=True).returncode != 0:
        pytest.fail("Perl Gearman::Client is missing: apt-get install libgearman-client-perl")


def gearman_cli(server, name, payload, unique=None, timeout=20):
    host, _, port = server.address.rpartition(":")
    command = [GEARMAN, "-h", host, "-p", port, "-f", name, "-t", str(int(timeout * 1000))]
    if unique:
        command += ["-u", unique]
    result = subprocess.run(command + [json.dumps(payload)], capture_output=True, text=True,
                            timeout=timeout + 5, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (command, result.stdout, result.stderr)
    return json.loads(result.stdout)


PERL_CLIENT = textwrap.dedent("""\
    use strict; use warnings; use Gearman::Client;
    my ($server, $name, $payload, $uniq) = @ARGV;
    my $client = Gearman::Client->new(job_servers => [$server]);
    my $reply = $client->do_task($name, $payload, {uniq => $uniq, timeout => 20});
    die "no reply\\n" unless defined $reply;
    print $$reply;
""")


def perl_client(tmp_path, server, name, payload, unique):
    script = tmp_path / "client.pl"
    script.write_text(PERL_CLIENT)
    result = subprocess.run(["perl", str(script), server.address, name, json.dumps(payload), unique],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def job_line(process, unique, timeout=5):
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in process.log_text().splitlines() if f"job {unique} " in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# --- independent clients → the worker -----------------------------------------------

@pytest.mark.no_haproxy
def test_libgearman_client_with_a_unique_id(worker, gearmand):
    process = worker()
    unique = unique_name("cli")
    reply = gearman_cli(gearmand, process.name, {"hpcs_action": "DISCOVER", "via": "libgearman"}, unique)
    assert reply["hpcs_response"] == "PASS" and reply["via"] == "libgearman"
    lines = job_line(process, unique)
    assert len(lines) == 1 and "DISCOVER PASS" in lines[0], lines


@pytest.mark.no_haproxy
def test_perl_client_with_a_unique_id(worker, gearmand, tmp_path):
    process = worker()
    unique = unique_name("perl")
    reply = perl_client(tmp_path, gearmand, process.name, {"hpcs_action": "DISCOVER", "via": "perl"}, unique)
    assert reply["hpcs_response"] == "PASS" and reply["via"] == "perl"
    assert len(job_line(process, unique)) == 1


@pytest.mark.no_haproxy
def test_gearadmin_sees_the_worker_registered_with_its_client_id(worker, gearmand):
    process = worker()
    host, _, port = gearmand.address.rpartition(":")
    workers = subprocess.run([GEARADMIN, "-h", host, "-p", port, "--workers"], capture_output=True,
                             text=True, timeout=10).stdout
    ours = [line for line in workers.splitlines() if line.rstrip().endswith(process.name)]
    assert len(ours) == 1 and f"libra_worker-{process.name}" in ours[0], workers
    status = subprocess.run([GEARADMIN, "-h", host, "-p", port, "--status"], capture_output=True,
                            text=True, timeout=10).stdout
    assert any(line.split("\t")[:1] == [process.name] and line.split("\t")[3].strip() == "1"
               for line in status.splitlines() if "\t" in line), status


@pytest.mark.no_haproxy
def test_several_job_servers_each_serve_through_every_implementation(worker, gearmand, tmp_path):
    with Gearmand(tmp_path / "second") as second:
        process = worker(servers=[gearmand, second])
        for server in (gearmand, second):
            assert gearman_cli(server, process.name, {"hpcs_action": "DISCOVER"})["hpcs_response"] == "PASS"
            assert perl_client(tmp_path, server, process.name, {"hpcs_action": "DISCOVER"},
                               unique_name("p"))["hpcs_response"] == "PASS"
            with GearClient([server]) as client:
                assert client.submit(process.name, {"hpcs_action": "DISCOVER"}, 10)["hpcs_response"] == "PASS"


@pytest.mark.no_haproxy
def test_a_job_server_restart(worker, gearmand):
    process = worker(extra_ini={"gearman": {"reconnect_sleep": 2}})
    gearmand.restart()
    started = time.monotonic()
    reply = gearman_cli(gearmand, process.name, {"hpcs_action": "DISCOVER"}, unique_name("after"), timeout=15)
    assert reply["hpcs_response"] == "PASS"
    assert time.monotonic() - started < 2 + 5
    assert process.alive()


def test_reply_to_a_job_server_that_restarted_mid_job(worker, gearmand, tmp_path):
    slow = SlowHaproxy(tmp_path / "slow")
    process = worker(extra_ini={"gearman": {"reconnect_sleep": 2},
                                "worker:haproxy": {"haproxy": str(slow.path)}})
    update = {"hpcs_action": "UPDATE", "loadBalancers": [{
        "protocol": "HTTP", "port": free_port(), "nodes": [{"id": "n1", "address": "127.0.0.1", "port": free_port()}]}]}
    slow.set_delay(2)
    unique = unique_name("midjob")
    client = subprocess.Popen([GEARMAN, "-h", "127.0.0.1", "-p", str(gearmand.port), "-f", process.name,
                               "-u", unique, json.dumps(update)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        slow.wait_checking()
        gearmand.kill()           # SIGKILL in the middle of the job
        gearmand.start()
        slow.set_delay(0)
        lines = job_line(process, unique, timeout=30)
        assert len(lines) == 1 and "reply not delivered" in lines[0], lines
    finally:
        client.kill()
        client.wait(5)
    assert process.alive(), process.diagnosis()
    reply = gearman_cli(gearmand, process.name, {"hpcs_action": "DISCOVER"}, unique_name("next"), timeout=15)
    assert reply["hpcs_response"] == "PASS"
    text = process.log_text()
    assert text.count(unique) == 1, "the undelivered reply is logged once"
    assert "Traceback" not in text


# --- bin/client.py → independent workers ------------------------------------------------

PERL_WORKER = textwrap.dedent("""\
    use strict; use warnings; use Gearman::Worker;
    my ($server, $name) = @ARGV;
    my $worker = Gearman::Worker->new(job_servers => [$server]);
    $worker->register_function($name => sub { my $job = shift; $job->set_status(1, 2); return $job->arg; });
    $worker->register_function("$name-fail" => sub { die "refused\\n"; });
    $| = 1; print "ready\\n";
    $worker->work while 1;
""")


@pytest.fixture
def perl_worker(gearmand, tmp_path):
    name = unique_name("perlw")
    script = tmp_path / "worker.pl"
    script.write_text(PERL_WORKER)
    proc = subprocess.Popen(["perl", str(script), gearmand.address, name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 10
    while gearmand.status().get(name, (0, 0, 0))[2] < 1:
        assert time.monotonic() < deadline, "the Perl worker never registered"
        time.sleep(0.05)
    yield name
    proc.kill()
    proc.wait(5)


def run_client(*args):
    return subprocess.run([str(PYTHON), str(CLIENT_SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


@pytest.mark.no_haproxy
def test_client_against_a_perl_worker_with_work_status(gearmand, perl_worker):
    request = {"hpcs_action": "DISCOVER", "hpcs_response": "PASS", "from": "perl"}
    result = run_client("-s", gearmand.address, "--name", perl_worker, "--timeout", 10, "--json",
                        json.dumps(request))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == request


@pytest.mark.no_haproxy
def test_client_reports_work_fail_from_a_perl_worker(gearmand, perl_worker):
    result = run_client("-s", gearmand.address, "--name", f"{perl_worker}-fail", "--timeout", 10, "DISCOVER")
    assert result.returncode == 2 and "WORK_FAIL" in result.stderr, (result.stdout, result.stderr)


@pytest.mark.no_haproxy
def test_client_against_a_libgearman_worker(gearmand):
    name = unique_name("cliw")
    worker = subprocess.Popen([GEARMAN, "-w", "-h", "127.0.0.1", "-p", str(gearmand.port),
                               "-f", name, "--", "cat"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while gearmand.status().get(name, (0, 0, 0))[2] < 1:
            assert time.monotonic() < deadline, "gearman -w never registered"
            time.sleep(0.05)
        text = '{"hpcs_action": "DISCOVER",\n "hpcs_response": "PASS",\n "lines": 3}\n'
        result = run_client("-s", gearmand.address, "--name", name, "--timeout", 10, "--json", text)
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert json.loads(result.stdout) == json.loads(text)
    finally:
        worker.kill()
        worker.wait(5)


@pytest.mark.no_haproxy
def test_client_gathers_work_data_from_a_gear_worker(gearmand):
    """WORK_DATA partial results and an empty WORK_COMPLETE: the reply is the data."""
    from support.gearworker import _Worker
    name = unique_name("gdata")
    worker = _Worker(client_id="data-worker")
    worker.addServer("127.0.0.1", gearmand.port)
    worker.waitForServer(timeout=10)
    worker.registerFunction(name)
    parts = [b'{"hpcs_action": "DISCOVER", ', b'"hpcs_response": "PASS", ', b'"parts": 3}']

    def serve():
        job = worker.getJob()
        for part in parts:
            job.sendWorkData(part)
        job.sendWorkStatus(1, 1)
        job.sendWorkComplete(b"")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = run_client("-s", gearmand.address, "--name", name, "--timeout", 10, "DISCOVER")
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert json.loads(result.stdout) == json.loads(b"".join(parts))
    finally:
        thread.join(5)
        worker.shutdown()


@pytest.mark.no_haproxy
def test_echo_probes_on_an_idle_connection_leave_it_awake_for_new_jobs(worker, gearmand):
    """ECHO_REQ probes on a sleeping connection: gearmand still wakes the worker (NOOP) for a job."""
    process = worker(extra_ini={"gearman": {"probe_interval": 1}})
    time.sleep(3.5)                      # three probes answered while asleep
    started = time.monotonic()
    reply = gearman_cli(gearmand, process.name, {"hpcs_action": "DISCOVER"}, unique_name("idle"))
    assert reply["hpcs_response"] == "PASS"
    assert time.monotonic() - started < 1.5
    assert "ECHO" not in process.log_text(), "a probe was not answered"


@pytest.mark.no_haproxy
def test_back_to_back_jobs_do_not_wait_on_nagle(worker, gearmand):
    """TCP_NODELAY: without it each reply + next grab waits ~40 ms on Nagle and delayed ACK."""
    process = worker()
    with GearClient([gearmand]) as client:
        times = []
        for number in range(30):
            started = time.monotonic()
            client.submit(process.name, {"hpcs_action": "DISCOVER", "n": number}, 10)
            times.append(time.monotonic() - started)
    times.sort()
    assert times[len(times) // 2] < 0.02, f"median round trip {times[len(times) // 2] * 1e3:.1f} ms"


@pytest.mark.no_haproxy
def test_tcp_keepalive_when_configured(worker, gearmand):
    process = worker(extra_ini={"gearman": {"keepalive": "true", "keepidle": 600}})
    deadline = time.monotonic() + 10
    while True:   # ss shows the keepalive timer once nothing waits for an ACK (timer:(on,...))
        shown = subprocess.run(["ss", "-tnpo", "state", "established", f"( dport = :{gearmand.port} )"],
                               capture_output=True, text=True, timeout=10).stdout
        ours = [line for line in shown.splitlines() if f"pid={process.pid}," in line]
        if ours and all("timer:(keepalive" in line for line in ours):
            break
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)
