"""commands.Commands, the one place that starts processes, with real processes."""
import pytest

from libra_worker.drivers.haproxy.commands import Commands
from libra_worker.errors import CommandFailed

# scripts/test runs these once, where HAProxy cannot run (scripts/without-haproxy).
pytestmark = pytest.mark.no_haproxy


def test_run_passes_stdin_and_returns_the_output():
    result = Commands(sudo=False).run(["/bin/sh", "-c", "tr a-z A-Z; echo oops >&2"], stdin="quiet\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "QUIET\n", "oops\n")


def test_run_names_the_command_and_its_last_words_when_it_fails():
    with pytest.raises(CommandFailed, match=r"^sh failed: first \| second$"):
        Commands(sudo=False).run(["/bin/sh", "-c", "echo first >&2; echo second >&2; exit 3"])
    result = Commands(sudo=False).run(["/bin/sh", "-c", "exit 3"], check=False)
    assert result.returncode == 3


def test_a_missing_program_is_a_clear_error():
    with pytest.raises(CommandFailed, match="/nonexistent/haproxy not found"):
        Commands(sudo=False).start(["/nonexistent/haproxy", "-c"])


def test_start_returns_while_the_command_runs(tmp_path):
    """The caller works on while it runs: here the command waits for what the caller does next."""
    flag = tmp_path / "go"
    running = Commands(sudo=False, timeout=10).start(
        ["/bin/sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.01; done; echo went"])
    assert running.process.poll() is None
    flag.touch()
    assert running.result().stdout == "went\n"


def test_a_command_past_its_timeout_is_killed(tmp_path):
    running = Commands(sudo=False).start(["/bin/sleep", "30"], timeout=0.2)
    with pytest.raises(CommandFailed, match=r"sleep timed out after 0.2s"):
        running.result()
    assert running.process.returncode is not None  # killed and reaped, not left behind


def test_abandon_kills_and_reaps_a_running_command():
    running = Commands(sudo=False).start(["/bin/sleep", "30"])
    running.abandon()
    assert running.process.returncode == -9
    running.abandon()  # and again, harmlessly
