"""Logging set-up: file (reopened after logrotate), syslog, stderr; secrets masked."""
import logging
import logging.handlers
import os
import re
import sys

from libra_worker import safe_files

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_FORMAT = "libra_worker[%(process)d]: %(levelname)s %(name)s: %(message)s"
# Libraries that log every packet or header: warnings only, whatever --debug says.
QUIET_LOGGERS = ("gear", "swiftclient", "urllib3")
# The token as a JSON or Python-repr value: "hpcs_object_store_token": "..." or '...': '...'.
_TOKEN = re.compile(r"""(["']hpcs_object_store_token["']\s*:\s*)("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")


class SecretFilter(logging.Filter):
    """Last line of defence: masks a token that slipped into any log record."""

    def filter(self, record):
        message = record.getMessage()
        if "hpcs_object_store_token" in message:
            record.msg, record.args = _TOKEN.sub(r'\1"*****"', message), None
        return True


LOG_MODE = 0o640


class SafeFileHandler(logging.StreamHandler):
    """A log file opened symlink-safe (O_NOFOLLOW, fstat-checked, never a FIFO).

    Like logging's WatchedFileHandler it starts a new file when the path
    names another file or none (logrotate); a link or FIFO planted there is
    refused and the handler keeps writing the file it has.
    """

    def __init__(self, path, owner=None):
        self.baseFilename = os.path.abspath(path)
        self._identity = None
        super().__init__(self._open_stream(owner))

    def _open_stream(self, owner=None):
        fd = safe_files.open_append(self.baseFilename, LOG_MODE, owner)
        info = os.fstat(fd)
        self._identity = (info.st_dev, info.st_ino)
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")

    def reopenIfNeeded(self):
        try:
            info = os.lstat(self.baseFilename)
            current = (info.st_dev, info.st_ino)
        except OSError:
            current = None
        if current == self._identity:
            return
        try:
            stream = self._open_stream()
        except OSError as error:
            print(f"libra_worker: cannot reopen the log: {error}", file=sys.stderr)
            self._identity = current  # said once per change of the path, not per line
            return
        old = self.setStream(stream)
        if old is not None:
            old.close()

    def emit(self, record):
        self.reopenIfNeeded()
        super().emit(record)

    def close(self):
        with self.lock:
            try:
                if self.stream is not None:
                    self.stream.close()
            finally:
                self.stream = None
                super().close()


def setup(settings):
    """Install the handlers the settings ask for; returns the file handler or None."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if settings.debug else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)

    handlers = []
    file_handler = None
    if settings.logfile:
        # Reopens the path when logrotate moved the file; never follows a link there.
        file_handler = SafeFileHandler(settings.logfile)
        file_handler.setFormatter(logging.Formatter(FORMAT))
        handlers.append(file_handler)
    if settings.syslog:
        syslog = logging.handlers.SysLogHandler(address="/dev/log",
                                                facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        syslog.setFormatter(logging.Formatter(SYSLOG_FORMAT))
        handlers.append(syslog)
    if settings.verbose or settings.nodaemon or not handlers:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(FORMAT))
        handlers.append(console)
    secret_filter = SecretFilter()
    for handler in handlers:
        handler.addFilter(secret_filter)
        root.addHandler(handler)
    return file_handler


def reopen(file_handler):
    """SIGHUP: start a new file at the configured path (logrotate)."""
    if file_handler is not None:
        file_handler.reopenIfNeeded()
