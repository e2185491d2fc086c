"""Facts about other processes, as the kernel tells them."""
import os


def pid_alive(pid):
    """Does process `pid` exist (even one we may not signal)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
