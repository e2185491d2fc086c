"""`libra_worker --check`: one line per device check, exit 0 only when all pass (issue 9)."""
from support.ports import free_port
from support.worker import run_worker, sudo_ini, write_config


def check(tmp_path, servers, **extra_ini):
    config = tmp_path / "worker.ini"
    write_config(config, tmp_path, servers, name="preflight-test", extra_ini=extra_ini)
    return run_worker(["--check", "--nodaemon", "--config", config])


def lines(result):
    return [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]


def test_a_ready_device_passes_every_check(tmp_path, gearmand):
    result = check(tmp_path, [gearmand], **sudo_ini())
    assert result.returncode == 0, result.stdout + result.stderr
    checks = lines(result)
    assert checks and all(line.startswith("PASS") for line in checks), checks
    named = "\n".join(checks)
    for what in (f"job server {gearmand.address}", "haproxy: HAProxy version", "socat: socat",
                 "worker files", "statsfile", "bind_address",
                 "function name: 'preflight-test'"):
        assert what in named, (what, named)
    assert not (tmp_path / "worker.log").exists(), "--check started logging"
    # process mode runs nothing as root: sudo = true has nothing to check.
    assert "sudo" not in named, named


def test_each_problem_is_one_fail_line_with_its_fix(tmp_path, gearmand):
    dead = f"127.0.0.1:{free_port()}"
    missing = tmp_path / "no-such-socat"
    result = check(tmp_path, [gearmand, dead],
                   **{"worker:haproxy": {"socat": missing, "bind_address": "192.0.2.77"}})
    assert result.returncode == 1
    failed = [line for line in lines(result) if line.startswith("FAIL")]
    assert len(failed) == 3, failed
    assert any(dead in line and "fix:" in line for line in failed), failed
    assert any(str(missing) in line and "fix:" in line for line in failed), failed
    assert any("192.0.2.77" in line for line in failed), failed
    assert "3 of" in result.stdout and "checks failed" in result.stdout


def test_check_changes_nothing_even_with_a_corrupt_statsfile(tmp_path, gearmand):
    statsfile = tmp_path / "haproxy" / "haproxy.stats"
    statsfile.parent.mkdir(parents=True)
    statsfile.write_bytes(b"not a ledger")
    result = check(tmp_path, [gearmand])
    assert result.returncode == 1
    assert any(line.startswith("FAIL  statsfile:") for line in lines(result)), result.stdout
    assert statsfile.read_bytes() == b"not a ledger"
    assert not list(statsfile.parent.glob("*.corrupt-*"))
