"""The HAProxy the tests run (env LIBRA_TEST_HAPROXY) and what its version can do."""
import functools
import os
import re
import subprocess

HAPROXY = os.environ.get("LIBRA_TEST_HAPROXY", "/usr/sbin/haproxy")


def version(binary=HAPROXY):
    """(major, minor) of `binary -v`; AssertionError when it does not say."""
    output = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"version (\d+)\.(\d+)", output)
    assert match, f"{binary} -v gave no version: {output[:200]!r}"
    return int(match.group(1)), int(match.group(2))


@functools.lru_cache(maxsize=None)
def dynamic_cookie():
    """HAProxy 3.0 accepts `cookie` on `add server` (an HTTP node added at run time); 2.6 refuses it.

    Asked when a test needs it, not at import: collecting the suite runs no HAProxy
    (scripts/test collects every module where HAProxy is a poison).
    """
    return version() >= (3, 0)
