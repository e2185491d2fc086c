"""The floors that involve HAProxy, done with the bare tools.

- socat_show_stat(): one `socat stdio unix-connect:<stats socket>` with
  `show stat`, run and timed as a subprocess;
- check_and_reload(): `haproxy -c -f <config>`, then `reload` on the master
  CLI, then `show proc` every POLL_INTERVAL until a new worker (one that has
  survived no reload) appears or the failed-reload count rises: the same
  wait libra_worker's ProcessService does;
- runtime_api(): the runtime commands of a node change over one bare unix
  socket: HAProxy's own cost of the runtime path.
"""
import socket
import subprocess
import threading
import time

from bench.procs import HAPROXY, SOCAT
from libra_worker.drivers.haproxy import apply, plan as plans
from libra_worker.drivers.haproxy.service import ProcState, unix_request  # the worker's own CLI client

PROMPT = b"\n> "

POLL_INTERVAL = 0.01      # what libra_worker.drivers.haproxy.service polls at


def show_proc(master_socket):
    """The master's `show proc`, parsed as the worker parses it, or None when it does not answer."""
    try:
        return ProcState(unix_request(master_socket, "show proc"))
    except OSError:
        return None


def current_worker(state):
    return state.current_worker if state is not None else None


def show_info(stats_socket):
    """`show info` of the process serving on the stats socket (through socat)."""
    return subprocess.run([SOCAT, "stdio", f"unix-connect:{stats_socket}"], input="show info\n",
                          capture_output=True, text=True, timeout=10, check=True).stdout


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


def runtime_api(stats_socket, commands, timeout=30.0, retry_for=1.0):
    """HAProxy's own cost of a runtime change → seconds.

    `commands`: the worker's planner's RuntimeCommands (plan.runtime_commands),
    in the worker's lines (many commands per line, apply.runtime_batches, made
    before the clock starts), all written at once over a bare unix socket by a
    thread while the answers are read: no socat, no per-line round trip.  Each
    answer is checked; a `del server` answered "still has connections" is
    sent again, as the worker does.
    """
    lines = [";".join(c.line for c in batch) for batch in apply.runtime_batches(commands)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(stats_socket))
        _exchange(sock, ["prompt"], 1)
        started = time.perf_counter()   # from the first command on
        waiting, deadline = commands, time.monotonic() + retry_for
        while waiting:
            if waiting is not commands:
                lines = [";".join(c.line for c in batch) for batch in apply.runtime_batches(waiting)]
            texts = _exchange(sock, lines, len(waiting))
            again = []
            for command, text in zip(waiting, texts):
                if command.expect.match(text):
                    continue
                if command.retry is not None and command.retry.search(text) and time.monotonic() < deadline:
                    again.extend(plans.RuntimeCommand(line, plans.NUDGE_EXPECT) for line in command.nudge)
                    again.append(command)
                    continue
                raise RuntimeError(f"HAProxy refused {command.line!r}: {text.strip()[:120]}")
            if again:
                time.sleep(0.02)
            waiting = again
        return time.perf_counter() - started


def _exchange(sock, lines, answers):
    """Write `lines` (from a thread), read until `answers` prompts came back → the answers."""
    data = "".join(line + "\n" for line in lines).encode()
    writer = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    writer.start()
    pending, seen = bytearray(), 0
    while seen < answers:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise RuntimeError("the stats socket closed during the runtime floor")
        tail = len(pending)
        pending += chunk
        seen += pending.count(PROMPT, max(0, tail - len(PROMPT) + 1))
    writer.join()
    return [part.decode() for part in bytes(pending).split(PROMPT)[:answers]]
