"""Gearman clients that are not `gear`, each sending one job the way a test asks.

- `GearmanCli`: libgearman's `gearman` command (Debian gearman-tools);
- `PerlClient`: Perl's Gearman::Client (Debian libgearman-client-perl),
  through perl_gearman_client.pl.

Both `submit(function, message)` → the reply decoded as a JSON object, like
`support.client.GearClient.submit`.  A missing tool fails the test loudly:
scripts/bootstrap installs both.
"""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .client import GearClient

PERL_SCRIPT = Path(__file__).with_name("perl_gearman_client.pl")


def _decode(data, who):
    try:
        reply = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise AssertionError(f"{who}: the reply is not UTF-8 JSON ({error}): {data[:300]!r}") from None
    assert isinstance(reply, dict), f"{who}: the reply is not a JSON object: {data[:300]!r}"
    return reply


def _run_client(argv, message, timeout, who):
    """Run a client program with the message on stdin → its reply (it must exit 0)."""
    result = subprocess.run(argv, input=json.dumps(message).encode(), capture_output=True, timeout=timeout)
    assert result.returncode == 0, f"{who} exited {result.returncode}: {result.stderr[-300:]!r}"
    return _decode(result.stdout, who)


def _host_port(server):
    host, _, port = str(getattr(server, "address", server)).rpartition(":")
    return host, port


class GearmanCli:
    name = "gearman-cli"

    def __init__(self, server):
        self.program = shutil.which("gearman")
        if self.program is None:
            pytest.fail("libgearman's `gearman` command is missing: apt-get install gearman-tools "
                        "(scripts/bootstrap)")
        self.host, self.port = _host_port(server)

    def submit(self, function, message, timeout=60.0):
        return _run_client([self.program, "-h", self.host, "-p", self.port, "-f", function],
                           message, timeout, "gearman")

    def close(self):
        pass


class PerlClient:
    name = "perl-gearman-client"

    def __init__(self, server):
        self.perl = shutil.which("perl")
        probe = subprocess.run([self.perl or "perl", "-MGearman::Client", "-e", "1"],
                               capture_output=True, timeout=30) if self.perl else None
        if probe is None or probe.returncode != 0:
            pytest.fail("Perl's Gearman::Client is missing: apt-get install libgearman-client-perl "
                        "(scripts/bootstrap)")
        self.server = "%s:%s" % _host_port(server)

    def submit(self, function, message, timeout=60.0):
        # The script has its own time-out: the process gets a little longer.
        return _run_client([self.perl, str(PERL_SCRIPT), self.server, function, str(int(timeout))],
                           message, timeout + 10, "Gearman::Client")

    def close(self):
        pass


class Gear:
    name = "gear"

    def __init__(self, server):
        self.client = GearClient([server])

    def submit(self, function, message, timeout=60.0):
        return self.client.submit(function, message, timeout=timeout)

    def close(self):
        self.client.close()


CLIENTS = {kind.name: kind for kind in (Gear, GearmanCli, PerlClient)}
