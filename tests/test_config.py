"""The configuration contract: INI file + flags, bad values exit 2 with one line.

A bad value exits with status 2 and one line on stderr that names the
option and the value; `--help` documents every flag, `--version` prints
the version, and flags override the file.
"""
import re

import pytest

import libra_worker
from support.ports import free_port
from support.worker import WorkerProcess, run_worker, unique_name, write_config

# scripts/test runs these once, where HAProxy cannot run (scripts/without-haproxy).
pytestmark = pytest.mark.no_haproxy

# (ini overrides, extra command-line args, words the error line must contain)
INVALID = {
    "servers port not a number": ({"gearman": {"servers": "127.0.0.1:notaport"}}, [],
                                  ["servers", "notaport"]),
    "servers port out of range": ({"gearman": {"servers": "127.0.0.1:70000"}}, [],
                                  ["servers", "70000"]),
    "--server port not a number": ({}, ["-s", "127.0.0.1:abc"], ["server", "abc"]),
    "service bogus": ({"worker:haproxy": {"service": "bogus"}}, [], ["service", "bogus"]),
    "only ssl_key": ({"gearman": {"ssl_key": "{tmp}/key.pem"}}, [], ["ssl_"]),
    "ssl files missing": ({"gearman": {"ssl_key": "{tmp}/no-key.pem", "ssl_cert": "{tmp}/no-cert.pem",
                                       "ssl_ca": "{tmp}/no-ca.pem"}}, [], ["ssl_"]),
    "reconnect_sleep abc": ({"gearman": {"reconnect_sleep": "abc"}}, [], ["reconnect_sleep", "abc"]),
    "keepalive maybe": ({"gearman": {"keepalive": "maybe"}}, [], ["keepalive", "maybe"]),
    "bind_address nope": ({"worker:haproxy": {"bind_address": "nope"}}, [], ["bind_address", "nope"]),
    "sudo perhaps": ({"worker:haproxy": {"sudo": "perhaps"}}, [], ["sudo", "perhaps"]),
    "--driver nginx": ({}, ["--driver", "nginx"], ["driver", "nginx"]),
    "[worker] driver nginx": ({"worker": {"driver": "nginx"}}, [], ["driver", "nginx"]),
    "network_check without port": ({"worker": {"network_check": "example"}}, [],
                                   ["network_check", "example"]),
    "relative haproxy config path": ({"worker:haproxy": {"config": "haproxy.cfg"}}, [],
                                     ["config", "haproxy.cfg"]),
}


def assert_one_line_naming(result, words):
    assert result.returncode == 2, (result.returncode, result.stdout[-500:], result.stderr[-500:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"want exactly one line on stderr, got: {result.stderr!r}"
    for word in words:
        assert word in lines[0], f"{word!r} not named in {lines[0]!r}"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("overrides, args, words", INVALID.values(), ids=INVALID.keys())
def test_invalid_configuration_exits_2_naming_the_option(tmp_path, overrides, args, words):
    (tmp_path / "key.pem").write_text("not really a key\n")
    overrides = {section: {key: value.replace("{tmp}", str(tmp_path)) for key, value in values.items()}
                 for section, values in overrides.items()}
    config = tmp_path / "worker.ini"
    write_config(config, tmp_path, [f"127.0.0.1:{free_port()}"], unique_name(), overrides)
    result = run_worker(["--nodaemon", "--config", config, *args], timeout=15)
    assert_one_line_naming(result, words)


def test_missing_config_file_exits_2(tmp_path):
    missing = tmp_path / "nowhere" / "libra.cfg"
    result = run_worker(["--nodaemon", "--config", missing])
    assert_one_line_naming(result, ["config", str(missing)])


def test_unreadable_ini_syntax_exits_2(tmp_path):
    config = tmp_path / "broken.ini"
    config.write_text("this is not an ini file\n[gearman\n")
    result = run_worker(["--nodaemon", "--config", config])
    assert_one_line_naming(result, ["config"])


def test_unknown_keys_and_sections_are_ignored(worker):
    """Unknown keys are fine: the worker starts and serves."""
    process = worker(extra_ini={"gearman": {"colour": "blue"}, "somewhere_else": {"x": "1"}})
    assert process.alive()


def test_version_prints_the_version():
    result = run_worker(["--version"])
    assert result.returncode == 0, result.stderr
    assert libra_worker.__version__ in result.stdout + result.stderr


FLAGS = ["-c", "--config", "-n", "--nodaemon", "-d", "--debug", "-v", "--verbose",
         "-l", "--logfile", "-p", "--pid", "--user", "--group", "-s", "--server",
         "--name", "--driver", "--syslog", "-h", "--help", "--version"]


def test_help_lists_every_flag():
    result = run_worker(["--help"])
    assert result.returncode == 0, result.stderr
    for flag in FLAGS:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout), f"{flag} not in --help"


def test_command_line_overrides_the_file(tmp_path, gearmand, gear_client):
    """-s, --name and --logfile win over [gearman] servers, [worker] name and logfile."""
    name = unique_name("flag")
    logfile = tmp_path / "from-flag.log"
    process = WorkerProcess(tmp_path / "w", [f"127.0.0.1:{free_port()}"], name=unique_name("ini"),
                            args=["-s", gearmand.address, "--name", name, "--logfile", logfile])
    process.start()
    try:
        reply = gear_client.submit(name, {"hpcs_action": "DISCOVER"}, 15, alive=process.alive)
        assert reply["hpcs_response"] == "PASS"
        assert logfile.exists() and logfile.stat().st_size > 0, "--logfile was not used"
        assert gearmand.status().get(process.name, (0, 0, 0))[2] == 0, "[worker] name was registered"
    finally:
        process.stop()
