"""README's commands on a machine where root has no usable sudo (a container, a minimal image).

scripts/demo runs in a private mount namespace in which /usr/bin/sudo is
/dev/null: nothing it does may need sudo.  (scripts/test cannot be run
from inside the suite; it needs no sudo as root for the same reason: it
calls apt-get and the tests directly, and uses sudo only to become root.)
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]


def test_demo_runs_as_root_without_sudo():
    if os.geteuid() != 0:
        pytest.fail("this test masks sudo in a mount namespace: run it as root")
    if shutil.which("unshare") is None:
        pytest.fail("UNSHARE NOT FOUND (util-linux): the demo without sudo was not run")
    script = ("mount --bind /dev/null \"$(command -v sudo || echo /usr/bin/sudo)\" 2>/dev/null || true; "
              "if sudo true 2>/dev/null; then echo 'sudo still works'; exit 99; fi; exec scripts/demo")
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            cwd=PROJECT, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    replies = re.findall(r'"hpcs_response": "(PASS|FAIL)"', output)
    # DISCOVER, DIAGNOSTICS, UPDATE, STATS, METRICS pass; the bad UPDATE fails.
    assert replies == ["PASS"] * 5 + ["FAIL"], replies
    assert len(re.findall(r"hello from the back-end on port \d+", output)) == 6
