"""Fixtures over the real components in tests/support/.

Every fixture starts its servers on 127.0.0.1, on free ports, in the
test's tmp_path, and stops them at teardown.
"""
import collections
import itertools
import os

import pytest

from support import swift as swift_support
from support.backends import HttpBackend, TcpEchoBackend
from support.client import GearClient
from support.gearmand import Gearmand
from support.traffic import stop_haproxy
from support.worker import WorkerProcess


def pytest_configure(config):
    # gear 0.16 still calls Condition.notifyAll(); not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:notifyAll:DeprecationWarning:gear")


def pytest_terminal_summary(terminalreporter):
    """Which tests ran, file by file, on which HAProxy: scripts/test's stages split the suite."""
    where = os.environ.get("LIBRA_TEST_STAGE") or f"HAProxy {os.environ.get('LIBRA_TEST_HAPROXY', '/usr/sbin/haproxy')}"
    counts = collections.defaultdict(collections.Counter)
    for outcome in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "when", "call") == "call" or outcome in ("error", "skipped"):
                counts[report.nodeid.split("::")[0]][outcome] += 1
    terminalreporter.section(f"ran on: {where}")
    for path in sorted(counts):
        terminalreporter.write_line(f"{path}: " + ", ".join(f"{n} {o}" for o, n in sorted(counts[path].items())))


@pytest.fixture
def gearmand(tmp_path):
    """A started gearmand: `.address` is "127.0.0.1:<port>"."""
    server = Gearmand(tmp_path / "gearmand").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def swift(tmp_path_factory):
    """A one-replica Swift on 127.0.0.1 for a module's ARCHIVE tests; removed with its files."""
    missing = swift_support.missing_programs()
    if missing:
        pytest.fail(f"Swift is not installed ({', '.join(missing)} missing): run .ci/install-swift")
    server = swift_support.Swift(tmp_path_factory.mktemp("swift")).start()
    yield server
    server.remove()


@pytest.fixture
def gear_client(gearmand):
    """A GearClient connected to the `gearmand` fixture."""
    client = GearClient([gearmand.address])
    yield client
    client.close()


@pytest.fixture
def worker(tmp_path, gearmand):
    """Factory: worker(servers=None, name=None, extra_ini=None, args=(), wait=True).

    Starts libra_worker against `servers` (default: the `gearmand` fixture)
    and, with wait=True, returns once it has answered a DISCOVER.  Every
    worker started is stopped at teardown.
    """
    started = []
    numbers = itertools.count(1)

    def start(servers=None, name=None, extra_ini=None, args=(), wait=True, timeout=15.0):
        process = WorkerProcess(tmp_path / f"worker{next(numbers)}", servers or [gearmand],
                                name=name, extra_ini=extra_ini, args=args)
        started.append(process)
        process.start()
        if wait:
            process.wait_registered(timeout)
        return process

    yield start
    for process in started:
        process.stop()
        # The worker leaves the HAProxy it started serving when it stops (on purpose): stop it here.
        stop_haproxy(process.sections["worker:haproxy"]["config"])


def _backend_factory(kind, prefix):
    """A factory fixture body: start(name=None, port=None) → a started back-end of `kind`."""
    started = []
    numbers = itertools.count(1)

    def start(name=None, port=None):
        backend = kind(name or f"{prefix}-{next(numbers)}", port).start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def http_backend():
    """Factory: http_backend(name="backend-N", port=None) → a started HttpBackend."""
    yield from _backend_factory(HttpBackend, "backend")


@pytest.fixture
def tcp_backend():
    """Factory: tcp_backend(name="tcp-N", port=None) → a started TcpEchoBackend."""
    yield from _backend_factory(TcpEchoBackend, "tcp")


@pytest.fixture
def device(tmp_path):
    """A gearmand + libra_worker (sudo = true) + client in tmp_path; HAProxy stopped after."""
    from support.device import Device
    with Device(tmp_path) as dev:
        yield dev


@pytest.fixture
def backends():
    """Factory: backends(kind, *names) → started back-ends of `kind`, stopped at teardown."""
    started = []

    def start(kind, *names):
        made = [kind(name).start() for name in names]
        started.extend(made)
        return made

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture(scope="module")
def shared_device(tmp_path_factory):
    """One Device for a whole module whose tests each bring their own back-ends and ports."""
    from support.device import Device
    with Device(tmp_path_factory.mktemp("device")) as dev:
        yield dev


@pytest.fixture
def station(tmp_path, gearmand, gear_client):
    """A Device on the shared gearmand, laid out, not started: its statsfile and HAProxy outlive a worker."""
    from support.device import Device
    device = Device(tmp_path / "device", gearmand=gearmand, client=gear_client)
    try:
        yield device
    finally:
        device.stop()
