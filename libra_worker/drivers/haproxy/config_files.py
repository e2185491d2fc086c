"""The live HAProxy config file, its backup, and candidates in a private temp dir.

The live file only ever changes by rename within its own directory, so it
is the old file or the new file at every instant, never a partial one.
Every file here is written by the worker itself (it owns the directory, in
both service modes: no cp/mv/rm through sudo), symlink-safe: see
libra_worker.safe_files.  A link, FIFO or directory planted at the config,
its `.NEW` or its `.BKUP` is refused with one line naming it.
"""
import logging
import os
import re
import shutil
import tempfile

from libra_worker import safe_files
from libra_worker.errors import CommandFailed

LOG = logging.getLogger(__name__)

CONFIG_MODE = 0o644  # HAProxy (root in system mode, the worker in process mode) reads it
CONFIG_DIR_MODE = 0o750
_ALERT = re.compile(r"^\[(ALERT|WARNING)\]\s*\(\d+\)\s*:\s*", re.M)


def haproxy_alerts(output, candidate=None):
    """HAProxy's [ALERT] lines, without pids (the candidate named 'new configuration')."""
    lines = [_ALERT.sub(r"[\1] ", line.strip()) for line in output.splitlines()
             if line.startswith("[ALERT]")]
    if candidate:
        lines = [line.replace(candidate, "new configuration") for line in lines]
    return " | ".join(lines) or output.strip().replace("\n", " | ")


def _failed(what, error):
    """An OSError of a file step → the job's CommandFailed, naming the file."""
    if isinstance(error, safe_files.OddFile):
        return CommandFailed(str(error))
    where = f" {error.filename}" if error.filename else " the configuration"
    return CommandFailed(f"cannot {what}{where}: {error.strerror or error}")


class ConfigStore:
    def __init__(self, settings, commands):
        self.settings = settings
        self.commands = commands
        self.path = settings.config
        self.backup_path = f"{settings.config}.BKUP"
        self.staging_path = f"{settings.config}.NEW"
        self.paths = (self.path, self.backup_path, self.staging_path)
        self.workdir = tempfile.mkdtemp(prefix="libra_worker-")  # mode 0700

    def check_paths(self):
        """OddFile for the first of the worker's config paths that holds something odd (lstat only)."""
        for path in self.paths:
            safe_files.check(path)

    def exists(self):
        """Is there a live file?  OddFile (a JobError's cause) when something odd is there."""
        try:
            return safe_files.check(self.path)
        except safe_files.OddFile as error:
            raise CommandFailed(str(error)) from None

    def holds(self, text):
        """Is `text` exactly the live configuration?"""
        try:
            return safe_files.read_bytes(self.path) == text.encode("utf-8")
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
        """Remove a candidate from the private temp dir; a failure is only logged (it must
        not cut short the swap it follows: a reload pending, node health saved)."""
        try:
            os.unlink(candidate)
        except FileNotFoundError:
            pass
        except OSError as error:
            LOG.warning("cannot remove the candidate %s: %s", candidate, error.strerror)

    def start_check(self, candidate):
        """`haproxy -c` of a candidate, started: it runs while the caller gets on with the swap."""
        return ConfigCheck(self.commands.start([self.settings.haproxy, "-c", "-f", candidate]), candidate)

    def prepare(self, candidate):
        """Back up the live file and stage the candidate beside it. True if there was a live one.

        Neither changes what HAProxy reads, so both may run before the check's verdict.
        A write that fails (disk full) leaves the old file of that name, never a truncated one.
        """
        try:
            had_live = safe_files.copy_atomic(self.path, self.backup_path, CONFIG_MODE, durable=False)
            # The directory is the worker's own: made on first use (SysV hosts have no StateDirectory=).
            safe_files.copy_atomic(candidate, self.staging_path, CONFIG_MODE, make_dir=CONFIG_DIR_MODE)
        except OSError as error:
            raise _failed("write", error) from None
        return had_live

    def commit(self):
        """Rename the staged candidate into place: the one step that changes the live file."""
        try:
            safe_files.rename(self.staging_path, self.path)
            safe_files.sync_directory(os.path.dirname(self.path) or ".")
        except OSError as error:
            raise _failed("install", error) from None

    def unstage(self):
        """A rejected candidate's staged copy goes (quietly: its failure would hide the first one)."""
        try:
            safe_files.unlink(self.staging_path)
        except OSError:
            pass

    def restore(self, had_live):
        """Put back what commit() replaced (or remove the file it created)."""
        try:
            if had_live:
                if not safe_files.copy_atomic(self.backup_path, self.path, CONFIG_MODE):
                    raise CommandFailed(f"the backup {self.backup_path} is gone")
            else:
                safe_files.unlink(self.path)
        except OSError as error:
            raise _failed("restore", error) from None

    def remove_all(self):
        try:
            for path in self.paths:
                safe_files.unlink(path)
        except OSError as error:
            raise _failed("remove", error) from None

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
