"""The live HAProxy config file, its backup, and candidates in a private temp dir.

The live file only ever changes by rename within its own directory, so it
is the old file or the new file at every instant, never a partial one.
"""
import os
import re
import shutil
import tempfile

from libra_worker.errors import CommandFailed

CONFIG_MODE = 0o644  # HAProxy (root in system mode, the worker in process mode) reads it
_ALERT = re.compile(r"^\[(ALERT|WARNING)\]\s*\(\d+\)\s*:\s*", re.M)


def haproxy_alerts(output, candidate=None):
    """HAProxy's [ALERT] lines, without pids (the candidate named 'new configuration')."""
    lines = [_ALERT.sub(r"[\1] ", line.strip()) for line in output.splitlines()
             if line.startswith("[ALERT]")]
    if candidate:
        lines = [line.replace(candidate, "new configuration") for line in lines]
    return " | ".join(lines) or output.strip().replace("\n", " | ")


class ConfigStore:
    def __init__(self, settings, commands):
        self.settings = settings
        self.commands = commands
        self.path = settings.config
        self.backup_path = f"{settings.config}.BKUP"
        self.staging_path = f"{settings.config}.NEW"
        self.workdir = tempfile.mkdtemp(prefix="libra_worker-")  # mode 0700

    def exists(self):
        return os.path.exists(self.path)

    def holds(self, text):
        """Is `text` exactly the live configuration?"""
        try:
            with open(self.path, "rb") as stream:
                return stream.read() == text.encode("utf-8")
        except OSError:
            return False

    def stage(self, text):
        """Write a candidate config into the private temp dir; returns its path."""
        fd, candidate = tempfile.mkstemp(prefix="haproxy-", suffix=".cfg", dir=self.workdir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                os.fchmod(stream.fileno(), CONFIG_MODE)
                stream.write(text)
        except OSError as error:
            self.discard(candidate)
            raise CommandFailed(f"cannot write the new configuration: {error.strerror}") from None
        return candidate

    def discard(self, candidate):
        try:
            os.unlink(candidate)
        except FileNotFoundError:
            pass

    def start_check(self, candidate):
        """`haproxy -c` of a candidate, started: it runs while the caller gets on with the swap."""
        return ConfigCheck(self.commands.start([self.settings.haproxy, "-c", "-f", candidate]), candidate)

    def prepare(self, candidate):
        """Back up the live file and stage the candidate beside it. True if there was a live one.

        Neither changes what HAProxy reads, so both may run before the check's verdict.
        """
        had_live = self.exists()
        if had_live:
            self._copy_whole(self.path, self.backup_path)
        self._copy_whole(candidate, self.staging_path)
        return had_live

    def commit(self):
        """Rename the staged candidate into place: the one step that changes the live file."""
        self.commands.move(self.staging_path, self.path)

    def unstage(self):
        """A rejected candidate's staged copy goes."""
        self.commands.remove_quietly(self.staging_path)

    def _copy_whole(self, source, target):
        """cp, or no target at all: a cp that fails (disk full) leaves a truncated file."""
        try:
            self.commands.copy(source, target)
        except CommandFailed:
            self.commands.remove_quietly(target)
            raise

    def restore(self, had_live):
        """Put back what commit() replaced (or remove the file it created)."""
        if had_live:
            self.commands.copy(self.backup_path, self.staging_path)
            self.commands.move(self.staging_path, self.path)
        else:
            self.commands.remove(self.path)

    def remove_all(self):
        self.commands.remove(self.path, self.backup_path, self.staging_path)

    def close(self):
        shutil.rmtree(self.workdir, ignore_errors=True)


class ConfigCheck:
    """A running `haproxy -c` of one candidate."""

    def __init__(self, running, candidate):
        self.running = running
        self.candidate = candidate

    def verdict(self):
        """Wait for it; CommandFailed with HAProxy's alerts when the candidate is refused."""
        result = self.running.result(check=False)
        if result.returncode != 0:
            raise CommandFailed("haproxy rejected the configuration: "
                                + haproxy_alerts(result.stderr + result.stdout, self.candidate))

    def abandon(self):
        self.running.abandon()
