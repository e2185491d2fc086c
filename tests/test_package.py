"""The Python distributions (sdist, wheel) and the Debian package.

The sdist and wheel tests build with Debian's python3 (python3-build,
python3-wheel: scripts/bootstrap installs them) and always run.

The .deb tests run only when LIBRA_PACKAGE_TESTS=1: they need the .deb
built beforehand (`.ci/build-deb OUTDIR` prints its path; pass it in
LIBRA_DEB), and they install, upgrade, remove, purge and reinstall it on
this machine with apt-get, run its init script and build the source again
with the network cut off: run them as root on a machine you are willing to
install libra-worker on.  scripts/test sets both variables.  Without them
every .deb test is skipped, and a warning says so at collection.
"""
import configparser
import hashlib
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tomllib
import tempfile
import threading
import time
import warnings
import zipfile
from pathlib import Path

import pytest

import libra_worker
from support.client import GearClient
from support.ports import free_port
from support.traffic import haproxy_masters, http_get, lb, node, stop_haproxy, update, wait_until
from support.worker import HAPROXY, unique_name, write_config

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = "libra-worker"
PY_VERSION = libra_worker.__version__
ENABLED = os.environ.get("LIBRA_PACKAGE_TESTS") == "1"
DEB = os.environ.get("LIBRA_DEB", "")
SKIP_REASON = ("PACKAGE TESTS SKIPPED: set LIBRA_PACKAGE_TESTS=1 and LIBRA_DEB=<path of "
               f"{PACKAGE}_<version>_all.deb> (.ci/build-deb OUTDIR builds it and prints the path); "
               "they install the package on this machine, as root. scripts/test sets both.")

if not ENABLED:
    warnings.warn(SKIP_REASON, stacklevel=1)

needs_package = pytest.mark.skipif(not ENABLED, reason=SKIP_REASON)

# debhelper puts units in /lib on Debian 12 and in /usr/lib on Debian 13 (merged /usr).
UNIT = next((path for path in ("/usr/lib/systemd/system/libra-worker.service",
                               "/lib/systemd/system/libra-worker.service") if os.path.exists(path)),
            "/lib/systemd/system/libra-worker.service")
UNIT_IN_DEB = ("/lib/systemd/system/libra-worker.service", "/usr/lib/systemd/system/libra-worker.service")
INIT_SCRIPT = "/etc/init.d/libra-worker"
SHARE = "/usr/share/libra-worker"
PACKAGED_CONFIG = f"{SHARE}/libra.cfg"
PACKAGED_SUDOERS = f"{SHARE}/sudoers.d"
CONFIG = "/etc/libra/libra.cfg"
SUDOERS_DIR = Path("/etc/sudoers.d")
LOGROTATE = "/etc/logrotate.d/libra-worker"
RSYSLOG = "/etc/rsyslog.d/48-libra-haproxy.conf"
TMPFILES = "/usr/lib/tmpfiles.d/libra-worker.conf"
DEFAULTS = "/etc/default/libra-worker"
PIDFILE = "/run/libra/libra_worker.pid"
LOG_DIR = Path("/var/log/libra")
PACKAGED_LOG = LOG_DIR / "libra_worker.log"
PURGED = ("/etc/libra", "/var/lib/libra", "/var/log/libra")
SYSTEM_PYTHON = "/usr/bin/python3"
COMMANDS = {"libra_worker": "man8/libra_worker.8.gz", "libra_client": "man1/libra_client.1.gz"}

# What each of pyproject.toml's dependencies is on a Debian device.
DEBIAN_NAMES = {
    "python-daemon": "python3-daemon",
    "lockfile": "python3-lockfile",
    "jinja2": "python3-jinja2",
    "python-swiftclient": "python3-swiftclient",
}

UPGRADE_LOAD_RATE = 50          # requests per second through HAProxy during the upgrade
LOAD_TIMEOUT = 5.0


def run(argv, check=True, timeout=900, **kwargs):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {result.returncode}: "
                             f"{(result.stderr + result.stdout).strip()[-3000:]}")
    return result


def outside_the_repo_env():
    """An environment in which nothing of the checkout or the venv is importable."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def apt_env():
    """What an operator's shell has: no DEBIAN_FRONTEND, nothing of the venv."""
    env = outside_the_repo_env()
    env.pop("DEBIAN_FRONTEND", None)
    return env


def copy_tree(destination):
    """The working tree (what .ci/build-deb builds), without VCS, venv and build output."""
    ignore = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", "build", "dist", ".pybuild")
    shutil.copytree(PROJECT, destination, ignore=ignore)
    return destination


# --------------------------------------------------------------------------
# The sdist and the wheel (always)
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def distributions(tmp_path_factory):
    """(sdist, wheel, build output) built from a copy of the tree by Debian's python3 -m build."""
    if run([SYSTEM_PYTHON, "-c", "import build, wheel, setuptools"], check=False).returncode != 0:
        pytest.fail("python3-build / python3-wheel missing: scripts/bootstrap installs them")
    root = tmp_path_factory.mktemp("dist")
    tree = copy_tree(root / "tree")
    shutil.rmtree(tree / "debian")
    result = run([SYSTEM_PYTHON, "-m", "build", "--no-isolation", "--outdir", str(root / "out"), str(tree)],
                 env=outside_the_repo_env())
    (sdist,) = (root / "out").glob("*.tar.gz")
    (wheel,) = (root / "out").glob("*.whl")
    return sdist, wheel, result.stdout + result.stderr


def test_sdist_ships_the_package_templates_licence_and_the_tests(distributions):
    sdist = distributions[0]
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wanted = [path.relative_to(PROJECT).as_posix()
              for folder in ("etc", "bin", "libra_worker", "tests")
              for path in (PROJECT / folder).rglob("*")
              if path.is_file() and "__pycache__" not in path.parts]
    assert any(name.endswith(".j2") for name in wanted) and "tests/conftest.py" in wanted
    assert any(name.startswith("tests/data/") for name in wanted)
    missing = sorted(set(wanted) - names)
    assert not missing, f"MANIFEST.in leaves these out of the sdist: {missing}"
    for name in ("README.rst", "LICENSE", "pyproject.toml", "pytest.ini"):
        assert name in names, name
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_the_tests_run_from_the_unpacked_sdist(distributions, tmp_path):
    """conftest.py, tests/support and tests/data are enough: pure-logic tests pass there."""
    with tarfile.open(distributions[0]) as archive:
        archive.extractall(tmp_path)
    (unpacked,) = tmp_path.glob("libra_worker-*")
    env = dict(os.environ, PYTHONPATH=str(unpacked))
    where = run([sys.executable, "-c", "import libra_worker; print(libra_worker.__file__)"],
                cwd=unpacked, env=env).stdout.strip()
    assert where == str(unpacked / "libra_worker" / "__init__.py"), where
    result = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                  "tests/test_models.py", "tests/test_render.py"], cwd=unpacked, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", result.stdout) and "skipped" not in result.stdout, result.stdout[-500:]


def test_wheel_has_the_templates_the_licence_and_both_commands(distributions):
    _, wheel, output = distributions
    assert "libra_worker.drivers.haproxy.templates" not in output, (
        "setuptools warns about the templates package:\n" + output[-3000:])
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"libra_worker-{PY_VERSION}.dist-info"
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    templates = {path.name for path in (PROJECT / "libra_worker/drivers/haproxy/templates").glob("*.j2")}
    assert templates and {f"libra_worker/drivers/haproxy/templates/{name}" for name in templates} <= names
    assert f"{info}/LICENSE" in names
    assert (PROJECT / "LICENSE").read_text().startswith("\n                                 Apache License")
    assert "libra_worker = libra_worker.main:main" in entry_points
    assert "libra_client = libra_worker.client:main" in entry_points
    assert f"libra_worker-{PY_VERSION}.data/scripts/client.py" in names
    assert "License: Apache-2.0" in metadata
    assert not [name for name in names if name.startswith(("tests/", "bench/"))]


# --------------------------------------------------------------------------
# The .deb as built
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deb():
    path = Path(DEB)
    assert DEB and path.is_file(), f"LIBRA_DEB={DEB!r} is not a file (build it with .ci/build-deb)"
    return path.resolve()


@pytest.fixture(scope="module")
def deb_version(deb):
    return run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()


@pytest.fixture(scope="module")
def deb_listing(deb):
    """{path without leading '.': (mode string, owner/group)} from dpkg-deb -c."""
    entries = {}
    for line in run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines():
        fields = line.split(None, 5)
        entries[fields[5].split(" -> ")[0].lstrip(".").rstrip("/") or "/"] = (fields[0], fields[1])
    return entries


@needs_package
def test_deb_is_named_for_the_changelog_version(deb, deb_version):
    changelog = run(["dpkg-parsechangelog", "-l", str(PROJECT / "debian/changelog"), "-S", "Version"])
    assert deb_version == changelog.stdout.strip()
    assert deb.name == f"{PACKAGE}_{deb_version.split(':')[-1]}_all.deb"
    fields = run(["dpkg-deb", "-f", str(deb), "Package", "Architecture", "Maintainer"]).stdout
    assert f"Package: {PACKAGE}" in fields and "Architecture: all" in fields
    maintainer = re.search(r"Maintainer: .*<([^>]+)>", fields).group(1)
    assert re.fullmatch(r"[^@\s]+@[a-z0-9-]+(\.[a-z0-9-]+)+", maintainer) and "localhost" not in maintainer


@needs_package
def test_deb_lists_the_files_a_device_needs(deb_listing):
    expected = {
        "/usr/bin/libra_worker": "-rwxr-xr-x",
        "/usr/bin/libra_client": "-rwxr-xr-x",
        PACKAGED_CONFIG: "-rw-r--r--",
        f"{PACKAGED_SUDOERS}/libra-worker": "-rw-r--r--",
        INIT_SCRIPT: "-rwxr-xr-x",
        LOGROTATE: "-rw-r--r--",
        RSYSLOG: "-rw-r--r--",
        TMPFILES: "-rw-r--r--",
        "/var/log/libra": "drwxr-xr-x",
        "/var/lib/libra": "drwxr-xr-x",
        "/usr/share/doc/libra-worker/copyright": "-rw-r--r--",
    }
    for command, page in COMMANDS.items():
        expected[f"/usr/share/man/{page}"] = "-rw-r--r--"
    units = [path for path in UNIT_IN_DEB if path in deb_listing]
    assert len(units) == 1 and deb_listing[units[0]][0] == "-rw-r--r--", units
    for template in (PROJECT / "libra_worker/drivers/haproxy/templates").glob("*.j2"):
        expected[f"/usr/lib/python3/dist-packages/libra_worker/drivers/haproxy/templates/{template.name}"] = None
    for path, mode in expected.items():
        assert path in deb_listing, f"{path} is not in the .deb"
        if mode:
            assert deb_listing[path][0] == mode, f"{path}: {deb_listing[path][0]}, expected {mode}"
    # ucf and the postinst own these: never dpkg conffiles, never prompted for.
    assert CONFIG not in deb_listing and not [path for path in deb_listing if path.startswith("/etc/sudoers.d")]
    # Only the worker's own package in dist-packages; no tests, no bench, no second licence.
    top = {path.split("/")[5] for path in deb_listing
           if path.startswith("/usr/lib/python3/dist-packages/") and path.count("/") >= 5}
    assert top == {"libra_worker", f"libra_worker-{PY_VERSION}.dist-info"}, top
    assert not [path for path in deb_listing
                if "/tests/" in path or path.endswith(".pyc") or path.startswith("/usr/lib/python3/dist-packages/")
                and path.endswith("LICENSE")]
    assert "/usr/bin/client.py" not in deb_listing


@needs_package
def test_every_command_has_a_man_page_made_from_its_help(deb, deb_listing, tmp_path):
    commands = {path.rsplit("/", 1)[1] for path in deb_listing
                if path.startswith(("/usr/bin/", "/usr/sbin/")) and deb_listing[path][0].startswith("-")}
    assert commands == set(COMMANDS), commands
    run(["dpkg-deb", "-x", str(deb), str(tmp_path)])
    for command, page in COMMANDS.items():
        text = run(["zcat", str(tmp_path / "usr/share/man" / page)]).stdout
        assert f".TH {command.upper()}" in text and "Traceback" not in text
        for flag in ("--help", "--server", "--name"):
            assert flag.replace("-", r"\-") in text, f"{page} does not document {flag}"
    assert r"\-\-nodaemon" in run(["zcat", str(tmp_path / "usr/share/man" / COMMANDS["libra_worker"])]).stdout


@needs_package
def test_deb_conffiles_and_depends(deb, tmp_path):
    run(["dpkg-deb", "-e", str(deb), str(tmp_path / "control")])
    conffiles = set((tmp_path / "control" / "conffiles").read_text().split())
    assert conffiles == {LOGROTATE, INIT_SCRIPT, RSYSLOG}, conffiles
    depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    names = {re.split(r"[\s(]", item.strip())[0] for item in depends.split(",")}
    for needed in ("haproxy", "socat", "python3-jinja2", "python3-daemon", "python3-lockfile", "ucf"):
        assert needed in names, f"Depends lacks {needed}: {depends}"


@needs_package
def test_every_dependency_is_a_debian_package_and_nothing_is_bundled(deb, deb_listing):
    depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    with open(PROJECT / "pyproject.toml", "rb") as file:
        requirements = tomllib.load(file)["project"]["dependencies"]
    for requirement in requirements:
        name = re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower()
        assert name in DEBIAN_NAMES, (
            f"pyproject.toml requires {name!r}: add its Debian package to debian/control's Depends "
            f"and to DEBIAN_NAMES here")
        assert DEBIAN_NAMES[name] in depends, f"{name} → {DEBIAN_NAMES[name]} missing from Depends"
    python_files = [path for path in deb_listing if path.endswith(".py")]
    assert python_files and all(path.startswith("/usr/lib/python3/dist-packages/libra_worker/")
                                for path in python_files), python_files


@needs_package
def test_lintian_pedantic_finds_no_error_and_no_warning(deb):
    if shutil.which("lintian") is None:
        pytest.fail("LINTIAN NOT FOUND: apt-get install lintian (scripts/test installs it)")
    result = run(["lintian", "--pedantic", "--show-overrides", str(deb)], check=False)
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EWIPXO]: ", line)]
    bad = [line for line in tags if line.startswith(("E:", "W:"))]
    assert not bad, "\n".join(tags)
    # Every override says why, in a comment right above it.
    for overrides in (PROJECT / "debian").glob("*lintian-overrides"):
        lines = overrides.read_text().splitlines()
        for number, line in enumerate(lines):
            if line.strip() and not line.startswith("#"):
                assert number and lines[number - 1].startswith("#"), f"{overrides}:{number + 1} has no reason"


# --------------------------------------------------------------------------
# The source builds offline
# --------------------------------------------------------------------------

def git_archive_head(destination):
    if not (PROJECT / ".git").exists():
        pytest.fail(f"{PROJECT} is not a git checkout: the build from `git archive HEAD` needs one")
    destination.mkdir()
    archive = subprocess.run(["git", "-C", str(PROJECT), "archive", "--format=tar", "HEAD"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-C", str(destination), "-xf", "-"], input=archive, check=True)
    return destination


def prepend_changelog(tree, version, text):
    changelog = tree / "debian" / "changelog"
    entry = (f"{PACKAGE} ({version}) bookworm; urgency=medium\n\n  * {text}\n\n"
             f" -- libra_worker maintainers <maintainers@libra-worker.org>  "
             f"{time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\n\n")
    changelog.write_text(entry + changelog.read_text())


def build_offline(tree):
    """dpkg-buildpackage -us -uc -b in `tree` with no network at all → the .deb's path."""
    if run(["unshare", "--net", "true"], check=False).returncode != 0:
        pytest.fail("unshare --net is refused here: the offline build cannot be proven")
    result = run(["unshare", "--net", "dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree,
                 env=outside_the_repo_env(), check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    version = run(["dpkg-parsechangelog", "-S", "Version"], cwd=tree).stdout.strip()
    deb = tree.parent / f"{PACKAGE}_{version.split(':')[-1]}_all.deb"
    assert deb.is_file(), f"no {deb.name} after the build"
    return deb


@needs_package
@pytest.mark.parametrize("revision", ["", "-1", "+b1"])
def test_git_archive_of_head_builds_offline_whatever_the_debian_revision(tmp_path, revision):
    """The changelog's revision is the packager's: only the upstream part must be __version__."""
    tree = git_archive_head(tmp_path / "src")
    version = run(["dpkg-parsechangelog", "-S", "Version"], cwd=tree).stdout.strip()
    if revision:
        version = version.rsplit("-", 1)[0] + revision
        prepend_changelog(tree, version, "A rebuild with a Debian revision.")
    deb = build_offline(tree)
    assert run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip() == version
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    assert "./usr/share/man/man8/libra_worker.8.gz" in listing


# --------------------------------------------------------------------------
# The package installed on this machine
# --------------------------------------------------------------------------

def installed_version():
    result = run(["dpkg-query", "-W", "-f", "${Status} ${Version}", PACKAGE], check=False)
    if result.returncode == 0 and result.stdout.startswith("install ok installed"):
        return result.stdout.split()[-1]
    return None


def package_state():
    result = run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", PACKAGE], check=False)
    return result.stdout.strip() if result.returncode == 0 else "not known"


def _md5sums(text):
    return sorted(line.split(None, 1)[1].strip() + " " + line.split()[0]
                  for line in text.splitlines() if line.strip())


def installed_is(deb, tmp):
    """Is exactly this .deb installed (same version, same files byte for byte)?"""
    version = run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()
    if installed_version() != version:
        return False
    run(["dpkg-deb", "-e", str(deb), str(tmp)])
    listed = Path(f"/var/lib/dpkg/info/{PACKAGE}.md5sums")
    return listed.exists() and _md5sums(listed.read_text()) == _md5sums((tmp / "md5sums").read_text())


def install(deb):
    """apt-get install ./deb the way an unattended run does it: -y, stdin /dev/null."""
    same = installed_version() == run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()
    return run(["apt-get", "install", "-y", "--allow-downgrades", "--no-install-recommends",
                "-o", "DPkg::Lock::Timeout=600", *(["--reinstall"] if same else []), str(deb)],
               env=apt_env())


POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


@pytest.fixture
def invoke_rc_d_may_run_libra_worker(tmp_path):
    """A policy-rc.d that lets invoke-rc.d run libra-worker's actions, as on a device.

    Container images (this machine's kind) deny every action in policy-rc.d,
    and the maintainer scripts honour it, as they must; every other service
    keeps the machine's own policy.  The original is put back afterwards.
    """
    saved = tmp_path / "policy-rc.d.saved"
    existed = POLICY_RC_D.exists()
    if existed:
        shutil.copy2(POLICY_RC_D, saved)
    otherwise = f'exec {saved} "$@"' if existed else "exit 0"
    POLICY_RC_D.write_text("#!/bin/sh\n# tests/test_package.py: libra-worker may run; the rest as before.\n"
                           'for arg; do [ "$arg" = libra-worker ] && exit 0; done\n' + otherwise + "\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        if existed:
            shutil.copy2(saved, POLICY_RC_D)
        else:
            POLICY_RC_D.unlink()


@pytest.fixture(scope="module")
def installed(deb, tmp_path_factory):
    """This .deb installed (scripts/test installs it before pytest; otherwise it is installed here)."""
    if os.geteuid() != 0:
        pytest.fail("the package tests install the .deb: run them as root")
    if not installed_is(deb, tmp_path_factory.mktemp("installed-control")):
        install(deb)
    assert installed_is(deb, tmp_path_factory.mktemp("control")), f"{deb} is not what is installed"
    return deb


@needs_package
def test_libra_worker_runs_from_the_package(installed):
    env = outside_the_repo_env()
    result = run(["/usr/bin/libra_worker", "--version"], cwd="/", env=env)
    assert result.stdout.strip() == f"libra_worker {PY_VERSION}"
    assert run(["dpkg", "-S", "/usr/bin/libra_worker"]).stdout.startswith(f"{PACKAGE}:")
    where = run([SYSTEM_PYTHON, "-c", "import libra_worker; print(libra_worker.__file__)"],
                cwd="/", env=env).stdout.strip()
    assert where.startswith("/usr/lib/python3/dist-packages/libra_worker/")
    help_text = run(["/usr/bin/libra_client", "--help"], cwd="/", env=env).stdout
    assert help_text.startswith("usage: libra_client") and "--timeout" in help_text


@needs_package
def test_config_is_registered_with_ucf_and_names_the_packaged_paths(installed):
    """ucf, not dpkg, keeps /etc/libra/libra.cfg (an operator's edits survive, unprompted)."""
    file, package, exists = run(["ucfq", "-w", CONFIG]).stdout.strip().split(":")[:3]
    assert (file, package, exists) == (CONFIG, PACKAGE, "Yes")
    code = ("from libra_worker import settings; s = settings.load(['--config', %r]); "
            "print(s.pid, s.logfile, s.haproxy.statsfile)")
    for config in (CONFIG, PACKAGED_CONFIG):
        pid, logfile, statsfile = run([SYSTEM_PYTHON, "-c", code % config], cwd="/",
                                      env=outside_the_repo_env()).stdout.split()
        assert pid.startswith("/run/libra/") and logfile.startswith("/var/log/libra/"), config
        assert statsfile.startswith("/var/lib/libra/"), config


def installed_sudo_rules():
    return sorted(path.name for path in Path(PACKAGED_SUDOERS).iterdir()) if Path(PACKAGED_SUDOERS).is_dir() else []


@needs_package
def test_sudo_rules_are_installed_checked_and_grant_nothing_else(installed):
    rules = installed_sudo_rules()
    assert rules, f"{PACKAGED_SUDOERS} ships no rule"
    for name in rules:
        path = SUDOERS_DIR / name
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o440 and info.st_uid == 0 and info.st_gid == 0, path
        assert path.read_bytes() == (Path(PACKAGED_SUDOERS) / name).read_bytes()
        run(["visudo", "-cf", str(path)])

    def allowed(*argv):
        return run(["sudo", "-n", "-l", "-U", "haproxy", *argv], check=False).returncode == 0

    from libra_worker.drivers.haproxy import driver
    from libra_worker.settings import load
    for command in driver.privileged_commands(load(["--config", CONFIG]).haproxy):
        if command.endswith("/service"):
            for action in ("start", "stop", "reload"):
                assert allowed(command, "haproxy", action), f"sudo {command} haproxy {action}"
        else:
            assert allowed(command), f"sudo {command} is not allowed for haproxy"
    for not_granted in (["/bin/sh"], ["/usr/bin/chown"], ["/usr/sbin/service", "ssh", "stop"]):
        assert not allowed(*not_granted), f"sudoers grants {not_granted} to haproxy"


@needs_package
def test_log_state_and_run_directories_belong_to_haproxy(installed):
    haproxy = pwd.getpwnam("haproxy")
    for directory in ("/var/log/libra", "/var/lib/libra", "/run/libra"):
        info = os.stat(directory)
        assert (info.st_uid, info.st_gid) == (haproxy.pw_uid, haproxy.pw_gid), directory
        assert stat.S_IMODE(info.st_mode) == 0o755
    assert "/run/libra 0755 haproxy haproxy" in Path(TMPFILES).read_text()


@needs_package
def test_check_on_a_fresh_install_finds_the_package_directories(installed, gearmand):
    """`libra_worker --check` with the packaged config: /run/libra, /var/log/libra, /var/lib/libra are there."""
    result = run(["/usr/bin/libra_worker", "--check", "--config", CONFIG, "--server", gearmand.address],
                 cwd="/", env=outside_the_repo_env(), check=False)
    lines = result.stdout.splitlines()
    for check in ("pid file", "log file", "statsfile directory", f"job server {gearmand.address}"):
        assert [line for line in lines if line.startswith(f"PASS  {check}")], (check, result.stdout)
    assert not [line for line in lines if line.startswith("FAIL") and "/libra" in line], result.stdout


@needs_package
def test_systemd_unit(installed):
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read(UNIT)
    service = unit["Service"]
    assert service["User"] == "haproxy"
    assert service["ExecStart"].split()[0] == "/usr/bin/libra_worker"
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


@needs_package
def test_rsyslog_accepts_the_haproxy_log_rule(installed):
    """ARCHIVE reads /var/log/haproxy.log as haproxy: the rule makes it group haproxy."""
    text = Path(RSYSLOG).read_text()
    assert 'fileGroup="haproxy"' in text and "/var/log/haproxy.log" in text
    if shutil.which("rsyslogd") is None:
        pytest.skip("RSYSLOGD NOT FOUND: the rule was not validated (apt-get install rsyslog)")
    result = run(["rsyslogd", "-N1"], check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------
# The SysV init script, the packaged code and python3-daemon, end to end
# --------------------------------------------------------------------------

def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def worker_pid():
    try:
        pid = int(Path(PIDFILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


class InitScriptWorker:
    """/etc/default/libra-worker pointing the init script at a test config in a temp dir."""

    def __init__(self, gearmand):
        self.gearmand = gearmand
        self.root = Path(tempfile.mkdtemp(prefix="libra-package-", dir="/tmp"))
        self.root.chmod(0o755)
        self.name = unique_name("package")
        self.config = self.root / "worker.ini"
        self.haproxy_config = self.root / "haproxy" / "haproxy.cfg"
        self.saved_defaults = Path(DEFAULTS).read_bytes() if os.path.exists(DEFAULTS) else None

    def __enter__(self):
        haproxy = pwd.getpwnam("haproxy")
        write_config(self.config, self.root, [self.gearmand], self.name, {
            "worker": {"logfile": PACKAGED_LOG},
            "worker:haproxy": {"sudo": "false"},
        })
        os.chown(self.root / "haproxy", haproxy.pw_uid, haproxy.pw_gid)
        self.logs_before = set(LOG_DIR.iterdir()) if LOG_DIR.is_dir() else set()
        Path(DEFAULTS).write_text(f"CONFIG={self.config}\n")
        return self

    def discover(self, timeout=15):
        with GearClient([self.gearmand]) as client:
            return client.submit(self.name, {"hpcs_action": "DISCOVER"}, timeout=timeout)

    def submit(self, payload, timeout=30):
        with GearClient([self.gearmand]) as client:
            return client.submit(self.name, payload, timeout=timeout)

    def __exit__(self, *exc):
        if os.access(INIT_SCRIPT, os.X_OK):
            run([INIT_SCRIPT, "stop"], check=False)
        stop_haproxy(self.haproxy_config)
        if self.saved_defaults is None:
            if os.path.exists(DEFAULTS):
                os.unlink(DEFAULTS)
        else:
            Path(DEFAULTS).write_bytes(self.saved_defaults)
        if LOG_DIR.is_dir():
            for path in set(LOG_DIR.iterdir()) - self.logs_before:
                path.unlink()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def init_script_worker(installed, gearmand):
    with InitScriptWorker(gearmand) as worker:
        yield worker


@needs_package
def test_init_script_starts_serves_rotates_and_stops(init_script_worker):
    worker = init_script_worker
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
    assert worker.discover()["hpcs_response"] == "PASS"
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
def test_init_script_reports_why_the_worker_cannot_start(init_script_worker):
    worker = init_script_worker
    worker.config.write_text(worker.config.read_text().replace(
        f"haproxy = {HAPROXY}", f"haproxy = {worker.root / 'no-haproxy'}"))
    result = run([INIT_SCRIPT, "start"], check=False)
    assert result.returncode != 0
    assert str(worker.root / "no-haproxy") in result.stdout + result.stderr
    assert not os.path.exists(PIDFILE)


# --------------------------------------------------------------------------
# A fleet's life: upgrade under load, remove, purge, reinstall
# --------------------------------------------------------------------------

class Load:
    """UPGRADE_LOAD_RATE GETs per second through HAProxy, each on a new connection."""

    def __init__(self, port):
        self.port = port
        self.ok = 0
        self.failures = []     # (seconds into the load, what went wrong)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="upgrade-load", daemon=True)

    def _one(self):
        try:
            response = http_get(self.port, timeout=LOAD_TIMEOUT)
        except (OSError, ValueError) as error:
            return f"{type(error).__name__}: {error}"
        return None if response.status == 200 else f"status {response.status}"

    def _run(self):
        self.started = time.monotonic()
        slot = 0
        while not self.stop_event.is_set():
            delay = self.started + slot / UPGRADE_LOAD_RATE - time.monotonic()
            if delay > 0 and self.stop_event.wait(delay):
                break
            slot += 1
            failure = self._one()
            if failure is None:
                self.ok += 1
            else:
                self.failures.append((round(time.monotonic() - self.started, 2), failure))
        self.ended = time.monotonic()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(LOAD_TIMEOUT + 5)

    @property
    def rate(self):
        return (self.ok + len(self.failures)) / (self.ended - self.started)


def build_next_version(tmp_path):
    """The tree with __version__ one step on, a Debian revision, and a changed packaged default."""
    tree = copy_tree(tmp_path / "next" / "src")
    init = tree / "libra_worker" / "__init__.py"
    next_version = f"{PY_VERSION}.1"
    init.write_text(init.read_text().replace(f'__version__ = "{PY_VERSION}"', f'__version__ = "{next_version}"'))
    prepend_changelog(tree, f"{next_version}-1", "The next release (tests/test_package.py).")
    defaults = tree / "debian" / "libra.cfg"
    defaults.write_text(defaults.read_text() + "\n# A default the next release changed.\n")
    return build_offline(tree), next_version


def other_packages_files():
    """sha256 of every file of other packages that the worker's package sits beside."""
    digests = {}
    for folder in ("/etc/haproxy", "/etc/sudoers.d", "/etc/rsyslog.d", "/etc/logrotate.d", "/etc/default",
                   "/usr/share/haproxy", "/etc/init.d"):
        for path in Path(folder).rglob("*") if Path(folder).is_dir() else ():
            if path.is_file() and "libra" not in path.name:
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    for path in ("/etc/sudoers", "/etc/passwd", "/etc/group", "/usr/sbin/haproxy"):
        digests[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digests


def dpkg_verify(*packages):
    return run(["dpkg", "--verify", *packages], check=False).stdout


@needs_package
def test_upgrade_under_load_then_remove_purge_and_reinstall(installed, gearmand, http_backend, tmp_path,
                                                             invoke_rc_d_may_run_libra_worker):
    """What an operator rolling a release out to a fleet does, on this machine (SysV init script).

    Ends with the .deb under test installed again, as the other tests expect.
    """
    first_version = run(["dpkg-deb", "-f", str(installed), "Version"]).stdout.strip()
    next_deb, next_version = build_next_version(tmp_path)
    backends = [http_backend("upgrade-a"), http_backend("upgrade-b")]
    port = free_port()
    try:
        with InitScriptWorker(gearmand) as worker:
            # The operator edited the packaged config (a real edit, kept by every upgrade).
            Path(CONFIG).write_text(Path(CONFIG).read_text() + "\n# edited by the operator\n")
            run([INIT_SCRIPT, "start"])
            old_pid = worker_pid()
            reply = worker.submit(update(lb("HTTP", port, [node(str(i + 1), b) for i, b in enumerate(backends)])))
            assert reply["hpcs_response"] == "PASS", reply
            wait_until(lambda: http_get(port).status == 200, 10, what="HAProxy serving the load balancer")
            (haproxy_master,) = haproxy_masters(worker.haproxy_config)

            # 1. Upgrade under load, unattended: no prompt, the new code runs, HAProxy serves throughout.
            with Load(port) as load:
                time.sleep(2)
                apt_started = time.monotonic()
                result = install(next_deb)
                apt_seconds = time.monotonic() - apt_started
                wait_until(lambda: worker.discover(timeout=5).get("release") == next_version, 30,
                           what=f"DISCOVER answering release {next_version}")
                time.sleep(2)
            print(f"upgrade {first_version} -> {next_version}-1 under load: {load.ok} ok, "
                  f"{len(load.failures)} failed, {load.rate:.1f} requests/s, apt-get took {apt_seconds:.1f} s")
            assert load.failures == [], f"requests failed through the upgrade: {load.failures[:10]}"
            assert load.rate >= 0.8 * UPGRADE_LOAD_RATE and load.ok >= 4 * UPGRADE_LOAD_RATE * 0.8, (load.ok, load.rate)
            assert installed_version() == f"{next_version}-1"
            assert "Configuration file" not in result.stdout and "conffile" not in result.stdout.lower()
            new_pid = worker_pid()
            assert new_pid and new_pid != old_pid and not _alive(old_pid)
            assert haproxy_masters(worker.haproxy_config) == [haproxy_master], "HAProxy was restarted"
            assert Path(CONFIG).read_text().endswith("# edited by the operator\n")
            assert Path(CONFIG + ".ucf-dist").read_text().endswith("# A default the next release changed.\n")

            # 2. A reinstall of the same version; a worker the operator stopped stays stopped.
            run([INIT_SCRIPT, "stop"])
            run(["apt-get", "install", "-y", "--reinstall", "-o", "DPkg::Lock::Timeout=600", str(next_deb)],
                env=apt_env())
            assert installed_version() == f"{next_version}-1"
            assert worker_pid() is None, "the reinstall started a worker that was stopped"
            run([INIT_SCRIPT, "start"])
            assert worker.discover()["release"] == next_version

            # 3. remove: the worker stops, its sudo rules go; HAProxy goes on serving.
            rules = installed_sudo_rules()
            assert rules and all((SUDOERS_DIR / name).exists() for name in rules)
            running = worker_pid()
            run(["apt-get", "remove", "-y", "-o", "DPkg::Lock::Timeout=600", PACKAGE], env=apt_env())
            assert package_state() == "rc"
            wait_until(lambda: not _alive(running), 15, what="the worker stopping on remove")
            assert not [name for name in rules if (SUDOERS_DIR / name).exists()], "a sudo rule survived remove"
            assert http_get(port).status == 200

            # 4. purge: the worker's directories go, nothing of any other package changes.
            before = other_packages_files()
            verify_before = dpkg_verify("haproxy", "sudo", "ucf")
            run(["apt-get", "purge", "-y", "-o", "DPkg::Lock::Timeout=600", PACKAGE], env=apt_env())
            assert package_state() in ("un", "not known", "pn")
            for path in PURGED:
                assert not os.path.exists(path), f"{path} survived purge"
            assert not os.path.exists(INIT_SCRIPT) and not os.path.exists(RSYSLOG)
            assert other_packages_files() == before
            assert dpkg_verify("haproxy", "sudo", "ucf") == verify_before
            assert run(["ucfq", "-w", PACKAGE]).stdout.strip() == ""

            # 5. Install again after the purge: a fresh device, and it starts.
            install(installed)
            assert installed_is(installed, tmp_path / "control-again")
            assert Path(CONFIG).read_bytes() == Path(PACKAGED_CONFIG).read_bytes()
            assert all((SUDOERS_DIR / name).exists() for name in installed_sudo_rules())
            run([INIT_SCRIPT, "start"])
            assert worker.discover()["release"] == PY_VERSION
    finally:
        if not installed_is(installed, tmp_path / "control-final"):
            install(installed)
    assert installed_version() == first_version
