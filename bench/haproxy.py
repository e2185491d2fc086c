"""The floors that involve HAProxy, done with the bare tools.

- socat_show_stat(): one `socat stdio unix-connect:<stats socket>` with
  `show stat`, run and timed as a subprocess;
- check_and_reload(): `haproxy -c -f <config>`, then `reload` on the master
  CLI, then `show proc` every POLL_INTERVAL until a new worker (one that has
  survived no reload) appears or the failed-reload count rises: the same
  wait libra_worker's ProcessService does.
"""
import subprocess
import time

from bench.procs import HAPROXY, SOCAT
from libra_worker.drivers.haproxy.service import ProcState, unix_request  # the worker's own CLI client

POLL_INTERVAL = 0.01      # what libra_worker.drivers.haproxy.service polls at


def show_proc(master_socket):
    """The master's `show proc`, parsed as the worker parses it, or None when it does not answer."""
    try:
        return ProcState(unix_request(master_socket, "show proc"))
    except OSError:
        return None


def current_worker(state):
    return state.current_worker if state is not None else None


def socat_show_stat(stats_socket):
    """One `socat ... show stat` as a subprocess → (seconds, bytes of CSV)."""
    started = time.perf_counter()
    result = subprocess.run([SOCAT, "stdio", f"unix-connect:{stats_socket}"], input="show stat\n",
                            capture_output=True, text=True, timeout=10, check=True)
    elapsed = time.perf_counter() - started
    if not result.stdout.startswith("# pxname"):
        raise RuntimeError(f"socat show stat answered {result.stdout[:80]!r}")
    return elapsed, len(result.stdout)


def check_and_reload(config, master_socket, timeout=30.0, poll=POLL_INTERVAL):
    """`haproxy -c -f config` + master-CLI reload + wait for the new worker → seconds."""
    started = time.perf_counter()
    check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True,
                           timeout=timeout)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy -c rejected {config}: {check.stderr.strip()[-200:]}")
    before = show_proc(master_socket)
    if before is None or current_worker(before) is None:
        raise RuntimeError("no HAProxy master/worker answering on the master socket")
    unix_request(master_socket, "reload")
    deadline = time.monotonic() + timeout
    while True:
        state = show_proc(master_socket)
        if state is not None:
            if state.failed_reloads > before.failed_reloads:
                raise RuntimeError("HAProxy reported a failed reload")
            if current_worker(state) not in (None, current_worker(before)):
                return time.perf_counter() - started
        if time.monotonic() > deadline:
            raise RuntimeError(f"no new HAProxy worker within {timeout:g}s of the reload")
        time.sleep(poll)
