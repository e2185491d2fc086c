"""TCP connect tests behind DIAGNOSTICS."""
import socket
from concurrent.futures import ThreadPoolExecutor

CONNECT_TIMEOUT = 2.0


def tcp_check(host, port, timeout=CONNECT_TIMEOUT):
    """'PASS' when a TCP connection to host:port opens within the timeout."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "PASS"
    except OSError:
        return "FAIL"


def tcp_checks(targets, timeout=CONNECT_TIMEOUT):
    """[(host, port)] → ['PASS'|'FAIL'], all probed at once so N dead hosts cost one timeout."""
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(len(targets), 16)) as pool:
        return list(pool.map(lambda target: tcp_check(*target, timeout), targets))
