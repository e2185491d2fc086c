"""The installed package, as a security review would try it (issue 15).

Runs only with LIBRA_PACKAGE_TESTS=1 and LIBRA_DEB (see tests/test_package.py,
whose `installed` fixture installs that .deb): wrap the run in
`flock /tmp/libra-package.lock`, the package is shared machine state.

* /etc/sudoers.d/libra-worker as installed grants nothing; the escalation
  probes of tests/test_sudo_probes.py, run against the machine's real sudo
  configuration, are all refused, for haproxy and for a member of its group.
* The installed unit rates <= 2.0 in `systemd-analyze security --offline=yes`.
* /etc/libra/libra.cfg is service = process with the worker's own paths.
* The installed /usr/bin/libra_worker, under the installed unit's
  credentials (setpriv, from the installed unit file) with the packaged
  paths (/var/lib/libra/haproxy, /run/libra, /var/log/libra, made as the
  unit's StateDirectory=/RuntimeDirectory=/LogsDirectory= would), serves an
  HTTP load balancer on a port below 1024 with every HAProxy process at uid
  haproxy, and DELETE stops it.
"""
import configparser
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from support.client import GearClient
from support.traffic import backend_counts, haproxy_processes, lb, node, refuses, stop_haproxy, update, wait_until
from test_package import deb, installed, needs_package  # noqa: F401 - fixtures
from test_sudo_probes import IDENTITIES, _failures, run_battery
from test_unit_sandbox import (MAX_EXPOSURE, _assert_unprivileged, low_free_port, proc_status,
                               read_unit, setpriv_argv)

UNIT = Path("/lib/systemd/system/libra-worker.service")
CONFIG = Path("/etc/libra/libra.cfg")
RUN_USER = "haproxy"


@needs_package
def test_installed_sudoers_grants_nothing_and_every_probe_fails(installed, tmp_path):
    listed = subprocess.run(["sudo", "-n", "-l", "-U", RUN_USER], capture_output=True, text=True, timeout=30)
    assert "may run the following" not in listed.stdout, listed.stdout
    results, granted = run_battery(tmp_path, "installed", None)
    assert granted == {who: [] for who in IDENTITIES}, granted
    assert not _failures(results), "\n".join(_failures(results))


@needs_package
def test_installed_unit_exposure(installed):
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    line = [entry for entry in (result.stdout + result.stderr).splitlines() if "Overall exposure" in entry]
    assert line, result.stdout + result.stderr
    assert float(line[-1].split(":")[1].split()[0]) <= MAX_EXPOSURE, line[-1]


@needs_package
def test_installed_config_is_process_mode_in_the_workers_own_paths(installed):
    ini = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    ini.read(CONFIG)
    haproxy = ini["worker:haproxy"]
    assert haproxy["service"] == "process" and haproxy["sudo"] == "false"
    assert haproxy["config"] == "/var/lib/libra/haproxy/haproxy.cfg"
    for key in ("pidfile", "stats_socket", "master_socket", "log_target"):
        assert haproxy[key].startswith("/run/libra/"), (key, haproxy[key])


@pytest.fixture
def packaged_dirs():
    """/run/libra and /var/lib/libra/haproxy as the unit's directives would make them; undone after."""
    user = pwd.getpwnam(RUN_USER)
    made = []
    for path in (Path("/run/libra"), Path("/var/lib/libra"), Path("/var/lib/libra/haproxy"),
                 Path("/var/log/libra")):
        if not path.exists():
            path.mkdir(mode=0o750)
            made.append(path)
        os.chown(path, user.pw_uid, user.pw_gid)
    before = {path: set(os.listdir(path)) for path in (Path("/run/libra"), Path("/var/lib/libra"),
                                                          Path("/var/lib/libra/haproxy"), Path("/var/log/libra"))}
    yield
    for path, names in before.items():
        for name in set(os.listdir(path)) - names:
            target = path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink()
    for path in reversed(made):
        shutil.rmtree(path, ignore_errors=True)


@needs_package
def test_installed_worker_as_the_installed_unit_runs_it(installed, packaged_dirs, gearmand, tmp_path,
                                                        http_backend):
    # The packaged config, with this test's job server and name (the paths stay the package's).
    ini = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    ini.read(CONFIG)
    name = f"package-unit-{os.getpid()}"
    ini["gearman"]["servers"] = gearmand.address
    ini["worker"]["name"] = name
    config = tmp_path / "libra.cfg"
    with open(config, "w") as stream:
        ini.write(stream)
    tmp_path.chmod(0o755)
    config.chmod(0o644)
    for parent in tmp_path.parents:
        if str(parent).startswith("/tmp/pytest-of-"):
            parent.chmod(parent.stat().st_mode | 0o005)  # the unit's user reads its config
    haproxy_config = ini["worker:haproxy"]["config"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    command = [*setpriv_argv(read_unit(UNIT)), "/usr/bin/libra_worker", "--nodaemon", "--config", str(config)]
    stderr = open(tmp_path / "stderr.txt", "wb")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env, cwd="/")
    web = http_backend("package-web")
    port = low_free_port()
    try:
        with GearClient([gearmand]) as client:
            def must_pass(message):
                reply = client.submit(name, message, timeout=30, alive=lambda: process.poll() is None)
                assert reply.get("hpcs_response") == "PASS", (reply, (tmp_path / "stderr.txt").read_text()[-2000:])
                return reply

            must_pass({"hpcs_action": "DISCOVER"})
            must_pass(update(lb("HTTP", port, [node("a", web)])))
            assert backend_counts(port, 3) == {"package-web": 3}
            pids = haproxy_processes(haproxy_config)
            assert pids
            for pid in pids:
                _assert_unprivileged(proc_status(pid), f"HAProxy {pid}")
            _assert_unprivileged(proc_status(process.pid), "the worker")
            must_pass({"hpcs_action": "STATS"})
            must_pass({"hpcs_action": "DELETE"})
            wait_until(lambda: refuses(port), 10, what="DELETE")
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        stderr.close()
        stop_haproxy(haproxy_config)
        time.sleep(0.1)
