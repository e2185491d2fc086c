"""TLS to a job server through a real TLS front: socat OPENSSL-LISTEN before gearmand (issue 14).

- good certificates: the worker serves through the front;
- a server certificate for another name, from the same CA: it does not, and the log says why;
- an unreadable key, or one that does not match the certificate: --check and the start
  fail naming ssl_key (as the run user, who is the one that will read it).
"""
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from support.client import GearClient
from support.tls import TlsFront, make_ca, make_cert
from support.worker import LIBRA_WORKER, run_worker, unique_name, write_config

RUN_USER = "haproxy"


@pytest.fixture(scope="module")
def pki():
    where = Path(tempfile.mkdtemp(prefix="libra-tls-", dir="/tmp"))
    where.chmod(0o755)
    ca = make_ca(where, "ca")
    material = {
        "ca": ca,
        "client": make_cert(where, ca, "client", "libra-worker"),
        "server": make_cert(where, ca, "server", "gearman", san="IP:127.0.0.1,DNS:localhost"),
        "other": make_cert(where, ca, "other", "gearman-elsewhere", san="DNS:gearman.elsewhere.example"),
        "dir": where,
    }
    for path in where.iterdir():
        path.chmod(0o644)
    yield material
    shutil.rmtree(where, ignore_errors=True)


def tls_ini(pki, key=None):
    return {"gearman": {"ssl_key": key or pki["client"].key, "ssl_cert": pki["client"].cert,
                        "ssl_ca": pki["ca"].cert, "reconnect_sleep": 2, "timeout": 3}}


@pytest.mark.no_haproxy
def test_good_certificates_serve_through_the_tls_front(tmp_path, gearmand, worker, pki):
    with TlsFront(tmp_path, gearmand.address, pki["server"], pki["ca"]) as front:
        process = worker(servers=[front.address], extra_ini=tls_ini(pki), wait=False)
        with GearClient([gearmand]) as client:   # the client talks plain Gearman to gearmand itself
            reply = client.submit(process.name, {"hpcs_action": "DISCOVER"}, 15, alive=process.alive)
        assert reply["hpcs_response"] == "PASS"
        assert "certificate" not in process.log_text()
        assert process.stop() == 0


@pytest.mark.no_haproxy
def test_a_server_certificate_for_another_name_is_refused_and_says_why(tmp_path, gearmand, worker, pki):
    with TlsFront(tmp_path, gearmand.address, pki["other"], pki["ca"]) as front:
        process = worker(servers=[front.address], extra_ini=tls_ini(pki), wait=False)
        deadline = time.monotonic() + 10
        while "certificate" not in process.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        assert process.alive(), process.diagnosis()
        lines = [line for line in process.log_text().splitlines() if front.address in line]
        assert any("certificate was refused" in line and "mismatch" in line for line in lines), lines
        assert gearmand.status().get(process.name, (0, 0, 0))[2] == 0, "it registered through a bad certificate"
        assert process.stop() == 0


@pytest.mark.no_haproxy
def test_a_key_that_does_not_match_fails_check_and_start_naming_ssl_key(tmp_path, gearmand, pki):
    config = tmp_path / "worker.ini"
    write_config(config, tmp_path, [gearmand], unique_name(), tls_ini(pki, key=pki["other"].key))
    for args in (["--check", "--nodaemon"], ["--nodaemon"]):
        result = run_worker([*args, "--config", config])
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "[gearman] ssl_key" in result.stderr and "does not match" in result.stderr, result.stderr


@pytest.fixture
def unreadable_key(pki):
    """A copy of the client key that the run user cannot read (root's, mode 0600)."""
    try:
        pwd.getpwnam(RUN_USER), grp.getgrnam(RUN_USER)
    except KeyError:
        pytest.fail(f"no user {RUN_USER!r}: apt-get install haproxy creates it")
    key = pki["dir"] / f"unreadable-{unique_name()}.key"
    shutil.copy(pki["client"].key, key)
    key.chmod(0o600)
    yield str(key)
    key.unlink()


def _device_dir():
    root = Path(tempfile.mkdtemp(prefix="libra-tls-dev-", dir="/tmp"))
    root.chmod(0o755)
    for sub in ("haproxy",):
        (root / sub).mkdir()
    return root


@pytest.mark.skipif(os.geteuid() != 0, reason="TLS RUN-USER TESTS SKIPPED: they need root to drop to haproxy")
def test_an_unreadable_key_fails_check_and_start_naming_ssl_key(gearmand, pki, unreadable_key):
    root = _device_dir()
    try:
        config = root / "worker.ini"
        ini = tls_ini(pki, key=unreadable_key)
        ini["worker"] = {"pid": str(root / "worker.pid"), "logfile": str(root / "worker.log")}
        write_config(config, root, [gearmand], unique_name(), ini)
        uid, gid = pwd.getpwnam(RUN_USER).pw_uid, grp.getgrnam(RUN_USER).gr_gid
        for path in (root, root / "haproxy"):
            os.chown(path, uid, gid)
        config.chmod(0o644)
        as_user = ["--user", RUN_USER, "--group", RUN_USER]

        check = run_worker(["--check", "--config", config, *as_user], timeout=30)
        assert check.returncode == 1, check.stdout + check.stderr
        failed = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
        assert any("TLS material" in line and "[gearman] ssl_key" in line and "Permission denied" in line
                   for line in failed), check.stdout

        start = run_worker(["--config", config, *as_user], timeout=30)
        assert start.returncode == 1, start.stdout + start.stderr
        assert "[gearman] ssl_key" in start.stderr and RUN_USER in start.stderr, start.stderr
        assert not (root / "worker.pid").exists(), "a daemon started with a key it cannot read"

        # --nodaemon runs as whoever starts it: started as the run user, the settings refuse the key.
        as_run_user = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", str(LIBRA_WORKER),
             "--check", "--nodaemon", "--config", str(config)],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert as_run_user.returncode == 2, as_run_user.stdout + as_run_user.stderr
        assert "[gearman] ssl_key" in as_run_user.stderr and "Permission denied" in as_run_user.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)
