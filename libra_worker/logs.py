"""Logging set-up: file (reopened after logrotate), syslog, stderr; secrets masked."""
import logging
import logging.handlers
import re
import sys

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
        # WatchedFileHandler reopens the path when logrotate moved the file.
        file_handler = logging.handlers.WatchedFileHandler(settings.logfile)
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
