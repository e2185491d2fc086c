"""Free loopback ports and waiting for a port to open or close."""
import socket
import time

LOOPBACK = "127.0.0.1"


def free_port(host=LOOPBACK):
    """A TCP port on `host` that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host, port, timeout=0.5):
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host, port, timeout=10.0):
    """Block until host:port accepts connections; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing accepts connections on {host}:{port} after {timeout}s")
        time.sleep(0.02)


def wait_port_closed(host, port, timeout=10.0):
    """Block until host:port refuses connections; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while port_open(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{host}:{port} still accepts connections after {timeout}s")
        time.sleep(0.02)
