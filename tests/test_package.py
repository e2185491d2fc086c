"""The Debian package and the sdist.

Issue 5.  The .deb tests run only when LIBRA_PACKAGE_TESTS=1: they need the
.deb built beforehand (`.ci/build-deb OUTDIR` prints its path; pass it in
LIBRA_DEB) and they install it on this machine with apt-get, start and
stop its init script and rotate its logs: CI sets both variables.  Without
them every .deb test is skipped, and a warning says so at collection.

The sdist test needs nothing and always runs.
"""
import configparser
import importlib.metadata
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import pytest

import libra_worker
from support.client import GearClient
from support.traffic import wait_until
from support.worker import unique_name, write_config

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = "libra-worker"
VERSION = libra_worker.__version__
ENABLED = os.environ.get("LIBRA_PACKAGE_TESTS") == "1"
DEB = os.environ.get("LIBRA_DEB", "")
SKIP_REASON = ("PACKAGE TESTS SKIPPED: set LIBRA_PACKAGE_TESTS=1 and LIBRA_DEB=<path of "
               f"{PACKAGE}_{VERSION}_all.deb> (.ci/build-deb OUTDIR builds it and prints the path); "
               "they install the package on this machine, as root. CI sets both.")

if not ENABLED:
    warnings.warn(SKIP_REASON, stacklevel=1)

needs_package = pytest.mark.skipif(not ENABLED, reason=SKIP_REASON)

UNIT = "/lib/systemd/system/libra-worker.service"
INIT_SCRIPT = "/etc/init.d/libra-worker"
SUDOERS = "/etc/sudoers.d/libra-worker"
CONFIG = "/etc/libra/libra.cfg"
LOGROTATE = "/etc/logrotate.d/libra-worker"
RSYSLOG = "/etc/rsyslog.d/48-libra-haproxy.conf"
DEFAULTS = "/etc/default/libra-worker"
VENDOR = "/usr/share/libra-worker/vendor"
PIDFILE = "/run/libra/libra_worker.pid"
LOG_DIR = Path("/var/log/libra")
PACKAGED_LOG = LOG_DIR / "libra_worker.log"
SYSTEM_PYTHON = "/usr/bin/python3"

# What each of setup.py's install_requires is on a Debian device.
DEBIAN_NAMES = {
    "python-daemon": "python3-daemon",
    "lockfile": "python3-lockfile",
    "jinja2": "python3-jinja2",
    "python-swiftclient": "python3-swiftclient",
    "gear": None,  # not in Debian: bundled in VENDOR
}


def run(argv, check=True, **kwargs):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {result.returncode}: "
                             f"{(result.stderr or result.stdout).strip()[-2000:]}")
    return result


def outside_the_repo_env():
    """An environment in which nothing of the checkout or the venv is importable."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


# --------------------------------------------------------------------------
# The sdist (always)
# --------------------------------------------------------------------------

def test_sdist_ships_etc_templates_and_bin(tmp_path):
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", "build", "dist", "debian")
    shutil.copytree(PROJECT, tree, ignore=ignore)
    run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree)
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}

    wanted = [path.relative_to(PROJECT).as_posix()
              for folder in ("etc", "bin", "libra_worker/drivers/haproxy/templates")
              for path in (PROJECT / folder).rglob("*") if path.is_file()
              and "__pycache__" not in path.parts]
    assert any(name.endswith(".j2") for name in wanted) and "bin/client.py" in wanted
    missing = sorted(set(wanted) - names)
    assert not missing, f"MANIFEST.in leaves these out of the sdist: {missing}"
    assert "README.rst" in names and "setup.py" in names


# --------------------------------------------------------------------------
# The .deb as built
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deb():
    path = Path(DEB)
    assert DEB and path.is_file(), f"LIBRA_DEB={DEB!r} is not a file (build it with .ci/build-deb)"
    return path.resolve()


@pytest.fixture(scope="module")
def deb_listing(deb):
    """{path without leading '.': (mode string, owner/group)} from dpkg-deb -c."""
    entries = {}
    for line in run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines():
        fields = line.split(None, 5)
        entries[fields[5].split(" -> ")[0].lstrip(".").rstrip("/") or "/"] = (fields[0], fields[1])
    return entries


@needs_package
def test_deb_is_named_for_the_version(deb):
    assert deb.name == f"{PACKAGE}_{VERSION}_all.deb"
    fields = run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture"]).stdout
    assert f"Package: {PACKAGE}" in fields and f"Version: {VERSION}" in fields
    assert "Architecture: all" in fields


@needs_package
def test_deb_lists_the_files_a_device_needs(deb_listing):
    expected = {
        "/usr/bin/libra_worker": "-rwxr-xr-x",
        "/usr/bin/libra_client": "-rwxr-xr-x",
        "/usr/share/libra-worker/client.py": None,
        CONFIG: "-rw-r--r--",
        UNIT: "-rw-r--r--",
        INIT_SCRIPT: "-rwxr-xr-x",
        SUDOERS: "-r--r-----",
        LOGROTATE: "-rw-r--r--",
        RSYSLOG: "-rw-r--r--",
        "/var/log/libra": "drwxr-xr-x",
        "/var/lib/libra": "drwxr-xr-x",
        f"{VENDOR}/gear/__init__.py": None,
        f"{VENDOR}/gear-0.16.0.dist-info/LICENSE": None,
    }
    for template in (PROJECT / "libra_worker/drivers/haproxy/templates").glob("*.j2"):
        expected[f"/usr/lib/python3/dist-packages/libra_worker/drivers/haproxy/templates/{template.name}"] = None
    for path, mode in expected.items():
        assert path in deb_listing, f"{path} is not in the .deb"
        if mode:
            assert deb_listing[path][0] == mode, f"{path}: {deb_listing[path][0]}, expected {mode}"
    assert deb_listing[SUDOERS][1] == "root/root"
    # Only the worker's own package in dist-packages; no tests, no bench.
    top = {path.split("/")[5] for path in deb_listing
           if path.startswith("/usr/lib/python3/dist-packages/") and path.count("/") >= 5}
    assert top == {"libra_worker", f"libra_worker-{VERSION}.egg-info"}, top
    assert not [path for path in deb_listing if "/tests/" in path or path.endswith(".pyc")]


@needs_package
def test_deb_conffiles_and_depends(deb, tmp_path):
    run(["dpkg-deb", "-e", str(deb), str(tmp_path / "control")])
    conffiles = (tmp_path / "control" / "conffiles").read_text().split()
    for path in (CONFIG, SUDOERS, LOGROTATE, INIT_SCRIPT, RSYSLOG):
        assert path in conffiles
    depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    names = {re.split(r"[\s(]", item.strip())[0] for item in depends.split(",")}
    for needed in ("haproxy", "socat", "sudo", "python3-jinja2", "python3-daemon", "python3-lockfile",
                   "python3-six"):
        assert needed in names, f"Depends lacks {needed}: {depends}"


@needs_package
def test_every_install_requirement_is_a_dependency_or_bundled(deb, deb_listing):
    depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    for requirement in importlib.metadata.requires("libra_worker"):
        if "extra ==" in requirement:
            continue
        name = re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower()
        assert name in DEBIAN_NAMES, (
            f"setup.py requires {name!r}: add its Debian package to debian/control's Depends "
            f"(or bundle it) and to DEBIAN_NAMES here")
        debian_name = DEBIAN_NAMES[name]
        if debian_name is None:
            assert f"{VENDOR}/{name}/__init__.py" in deb_listing, f"{name} is not bundled"
        else:
            assert debian_name in depends, f"{name} → {debian_name} missing from Depends"


# --------------------------------------------------------------------------
# The package installed on this machine
# --------------------------------------------------------------------------

def installed_version():
    result = run(["dpkg-query", "-W", "-f", "${Status} ${Version}", PACKAGE], check=False)
    if result.returncode == 0 and result.stdout.startswith("install ok installed"):
        return result.stdout.split()[-1]
    return None


def _md5sums(text):
    return sorted(line.split(None, 1)[1].strip() + " " + line.split()[0]
                  for line in text.splitlines() if line.strip())


def installed_is(deb, tmp):
    """Is exactly this .deb installed (same files, byte for byte)?"""
    if installed_version() != VERSION:
        return False
    run(["dpkg-deb", "-e", str(deb), str(tmp)])
    listed = Path(f"/var/lib/dpkg/info/{PACKAGE}.md5sums")
    return listed.exists() and _md5sums(listed.read_text()) == _md5sums((tmp / "md5sums").read_text())


@pytest.fixture(scope="module")
def installed(deb, tmp_path_factory):
    """This .deb installed (CI installs it before pytest; otherwise it is installed here)."""
    if os.geteuid() != 0:
        pytest.fail("the package tests install the .deb: run them as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if installed_version() is None:
        run(["apt-get", "install", "-y", "--no-install-recommends", str(deb), "logrotate"], env=env)
    elif not installed_is(deb, tmp_path_factory.mktemp("installed-control")):
        run(["dpkg", "-i", str(deb)], env=env)  # a rebuild of the same version: replace it
    assert installed_is(deb, tmp_path_factory.mktemp("control")), f"{deb} is not what is installed"
    return VERSION


@needs_package
def test_libra_worker_runs_from_the_package(installed):
    env = outside_the_repo_env()
    result = run(["/usr/bin/libra_worker", "--version"], cwd="/", env=env)
    assert result.stdout.strip() == f"libra_worker {VERSION}"
    assert run(["dpkg", "-S", "/usr/bin/libra_worker"]).stdout.startswith(f"{PACKAGE}:")
    where = run([SYSTEM_PYTHON, "-c", "import sys; sys.path.insert(0, %r); import libra_worker, gear; "
                 "print(libra_worker.__file__); print(gear.__file__)" % VENDOR], cwd="/", env=env)
    worker_file, gear_file = where.stdout.split()
    assert worker_file.startswith("/usr/lib/python3/dist-packages/libra_worker/")
    assert gear_file == f"{VENDOR}/gear/__init__.py"
    # The client imports gear at the top: it runs only if the bundled gear is found.
    assert "--timeout" in run(["/usr/bin/libra_client", "--help"], cwd="/", env=env).stdout


@needs_package
def test_sudoers_file_passes_visudo_and_grants_exactly_the_worker_commands(installed):
    info = os.stat(SUDOERS)
    assert stat.S_IMODE(info.st_mode) == 0o440 and info.st_uid == 0 and info.st_gid == 0
    run(["visudo", "-cf", SUDOERS])

    def allowed(*argv):
        return run(["sudo", "-n", "-l", "-U", "haproxy", *argv], check=False).returncode == 0

    from libra_worker.drivers.haproxy import driver
    from libra_worker.drivers.haproxy.commands import SERVICE
    from libra_worker.settings import load
    commands = driver.privileged_commands(load(["--config", CONFIG]).haproxy)
    assert SERVICE in commands  # the packaged config is service = system
    for command in commands:
        if command == SERVICE:
            for action in ("start", "stop", "reload"):
                assert allowed(command, "haproxy", action), f"sudo {command} haproxy {action}"
        else:
            assert allowed(command), f"sudo {command} is not allowed for haproxy"
    for not_granted in (["/bin/sh"], ["/usr/bin/chown"], [SERVICE, "ssh", "stop"]):
        assert not allowed(*not_granted), f"sudoers grants {not_granted} to haproxy"


@needs_package
def test_log_and_state_directories_belong_to_haproxy(installed):
    haproxy = pwd.getpwnam("haproxy")
    for directory in ("/var/log/libra", "/var/lib/libra"):
        info = os.stat(directory)
        assert (info.st_uid, info.st_gid) == (haproxy.pw_uid, haproxy.pw_gid), directory
        assert stat.S_IMODE(info.st_mode) == 0o755


@needs_package
def test_packaged_config_has_the_packaged_paths(installed):
    code = ("from libra_worker import settings; s = settings.load(['--config', %r]); "
            "h = s.haproxy; print(s.pid, s.logfile, s.user, s.group, h.service, h.config, "
            "h.pidfile, h.stats_socket, h.statsfile, h.sudo)" % CONFIG)
    values = run([SYSTEM_PYTHON, "-c", code], cwd="/", env=outside_the_repo_env()).stdout.split()
    assert values == ["/run/libra/libra_worker.pid", "/var/log/libra/libra_worker.log", "haproxy",
                      "haproxy", "system", "/etc/haproxy/haproxy.cfg", "/run/haproxy.pid",
                      "/run/haproxy/admin.sock", "/var/lib/libra/haproxy.stats", "True"]


@needs_package
def test_packaged_config_passes_the_driver_start_checks(installed):
    """With the package's sudoers, the packaged config must not be refused at start."""
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from libra_worker import preflight, settings\n"
            "loaded = settings.load(['--config', %r])\n"
            "print('\\n'.join(preflight.start_problems(loaded, 'haproxy')))\n" % (VENDOR, CONFIG))
    problems = run([SYSTEM_PYTHON, "-c", code], cwd="/", env=outside_the_repo_env()).stdout.strip()
    assert problems == "", problems


@needs_package
def test_systemd_unit(installed):
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read(UNIT)
    service = unit["Service"]
    assert (service["User"], service["Group"]) == ("haproxy", "haproxy")
    assert service["Restart"] == "on-failure"
    assert service["RuntimeDirectory"] == "libra"
    assert service["ExecStart"].split() == ["/usr/bin/libra_worker", "--nodaemon", "--config", CONFIG]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("SYSTEMD-ANALYZE NOT FOUND: the unit was not verified (apt-get install systemd)")
    result = run(["systemd-analyze", "verify", UNIT], check=False)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "libra-worker" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


@needs_package
def test_logrotate_file_parses(installed):
    if shutil.which("logrotate") is None:
        pytest.skip("LOGROTATE NOT FOUND: its file was not checked (apt-get install logrotate)")
    with tempfile.TemporaryDirectory() as state:
        result = run(["logrotate", "-d", "-s", f"{state}/status", LOGROTATE], check=False)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr


# --------------------------------------------------------------------------
# The SysV init script, the packaged code and python3-daemon, end to end
# --------------------------------------------------------------------------

def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.fixture
def init_script_config(installed, gearmand):
    """/etc/default/libra-worker pointing the init script at a test config; undone after."""
    haproxy = pwd.getpwnam("haproxy")
    root = Path(tempfile.mkdtemp(prefix="libra-package-", dir="/tmp"))
    root.chmod(0o755)
    name = unique_name("package")
    config = root / "worker.ini"
    write_config(config, root, [gearmand], name, {
        "worker": {"logfile": PACKAGED_LOG},
        "worker:haproxy": {"sudo": "false"},
    })
    os.chown(root / "haproxy", haproxy.pw_uid, haproxy.pw_gid)
    saved_defaults = Path(DEFAULTS).read_bytes() if os.path.exists(DEFAULTS) else None
    logs_before = set(LOG_DIR.iterdir())
    Path(DEFAULTS).write_text(f"CONFIG={config}\n")
    yield name, root
    run([INIT_SCRIPT, "stop"], check=False)
    if saved_defaults is None:
        os.unlink(DEFAULTS)
    else:
        Path(DEFAULTS).write_bytes(saved_defaults)
    for path in set(LOG_DIR.iterdir()) - logs_before:
        path.unlink()
    shutil.rmtree(root, ignore_errors=True)


@needs_package
def test_init_script_starts_serves_rotates_and_stops(init_script_config, gearmand):
    name, root = init_script_config
    assert run([INIT_SCRIPT, "status"], check=False).returncode != 0, "a worker is already running"

    run([INIT_SCRIPT, "start"])
    pid = int(Path(PIDFILE).read_text())
    assert _alive(pid)
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    haproxy = pwd.getpwnam("haproxy")
    assert status["Uid"].split()[0] == str(haproxy.pw_uid)
    assert status["Gid"].split()[0] == str(haproxy.pw_gid)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1] == b"/usr/bin/libra_worker"  # the package's, run by /usr/bin/python3
    with GearClient([gearmand]) as client:
        assert client.submit(name, {"hpcs_action": "DISCOVER"}, timeout=15)["hpcs_response"] == "PASS"
    assert run([INIT_SCRIPT, "status"], check=False).returncode == 0
    run([INIT_SCRIPT, "start"])  # already running: fine, and the same process
    assert int(Path(PIDFILE).read_text()) == pid

    # logrotate moves the log away and its postrotate sends SIGHUP: the
    # worker opens a new file at the configured path.
    if shutil.which("logrotate"):
        with tempfile.TemporaryDirectory() as state:
            run(["logrotate", "-f", "-s", f"{state}/status", LOGROTATE])
        assert (LOG_DIR / "libra_worker.log.1").exists()
        wait_until(PACKAGED_LOG.exists, 5, what="the worker reopening its log after logrotate")
        assert _alive(pid)
    else:
        warnings.warn("LOGROTATE NOT FOUND: the rotation through the package's logrotate file was not run")

    run([INIT_SCRIPT, "stop"])
    wait_until(lambda: not _alive(pid), 15, what="the worker stopping")
    assert not os.path.exists(PIDFILE)
    assert run([INIT_SCRIPT, "status"], check=False).returncode != 0
    assert "stopped serving" in (LOG_DIR / "libra_worker.log").read_text()


@needs_package
def test_init_script_reports_why_the_worker_cannot_start(init_script_config):
    name, root = init_script_config
    config = root / "worker.ini"
    config.write_text(config.read_text().replace("/usr/sbin/haproxy", str(root / "no-haproxy")))
    result = run([INIT_SCRIPT, "start"], check=False)
    assert result.returncode != 0
    assert str(root / "no-haproxy") in result.stdout + result.stderr
    assert not os.path.exists(PIDFILE)



@needs_package
def test_rsyslog_accepts_the_haproxy_log_rule(installed):
    """ARCHIVE reads /var/log/haproxy.log as haproxy: the rule makes it group haproxy."""
    text = Path(RSYSLOG).read_text()
    assert 'fileGroup="haproxy"' in text and "/var/log/haproxy.log" in text
    if shutil.which("rsyslogd") is None:
        pytest.skip("RSYSLOGD NOT FOUND: the rule was not validated (apt-get install rsyslog)")
    result = run(["rsyslogd", "-N1"], check=False)
    assert result.returncode == 0, result.stdout + result.stderr
