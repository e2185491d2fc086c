"""The job loop: take one job at a time from Gearman, always send a reply."""
import ctypes
import logging
import threading
import time

import gear

from libra_worker import gearman

LOG = logging.getLogger(__name__)

try:  # glibc keeps the pages a large job freed; malloc_trim() hands them back
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):
    _MALLOC_TRIM = None


# A job whose request and reply together are smaller than this frees too little to
# hand back; malloc_trim() walks the whole heap (~10 µs, a fifth of a DISCOVER's cost).
TRIM_AFTER_BYTES = 64 * 1024


def release_memory():
    """After a large job: give back what it freed (the pages of a 10,000-node UPDATE)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _printable(text, limit=80):
    """Log-safe: control, format and non-ASCII characters escaped, length capped."""
    return text.encode("unicode_escape").decode("ascii")[:limit]


class JobLoop:
    """Registers `settings.name` and feeds each job to the controller.

    stop() may be called from a signal handler: the job in hand finishes
    and its reply is sent before run() returns.
    """

    def __init__(self, settings, controller):
        self.settings = settings
        self.controller = controller
        self.running = False
        self.in_job = False
        self._gear = None

    def run(self):
        self._gear = gearman.Worker(f"libra_worker-{self.settings.name}",
                                    self.settings.gearman.reconnect_sleep)
        gearman.add_servers(self._gear, self.settings.gearman)
        self._gear.registerFunction(self.settings.name)
        self.running = True
        servers = ", ".join(f"{host}:{port}" for host, port in self.settings.gearman.servers)
        LOG.info("serving function %r from %s", self.settings.name, servers)
        try:
            while self.running:
                try:
                    job = self._gear.getJob()
                except gear.InterruptedError:
                    break
                self._serve(job)
        finally:
            self._close()

    def stop(self):
        """Ask run() to return after the job in hand (safe in a signal handler)."""
        self.running = False
        if self._gear is not None:
            # getJob() holds gear's job lock now and then; never take it from
            # inside a signal handler running on the same thread.
            threading.Thread(target=self._gear.stopWaitingForJobs, daemon=True).start()

    def _serve(self, job):
        started = time.monotonic()
        self.in_job = True
        link = job.connection.conn  # gear reconnects in place: a new socket is a new job server
        handled = len(job.arguments)
        try:
            result = self.controller.handle(job.arguments)
            try:
                if job.connection.conn is not link:
                    raise ConnectionError("the job server restarted during the job")
                reply = result.reply_bytes
                handled += len(reply)
                job.sendWorkComplete(reply)
                sent = ""
            except Exception as error:  # the job server went away; gearmand re-queues the job
                sent = f" (reply not delivered: {error})"
        finally:
            self.in_job = False
            if handled >= TRIM_AFTER_BYTES:
                release_memory()
        handle = _printable((job.unique or job.handle or b"?").decode("utf-8", "replace"))
        reason = f": {result.error}" if result.error else ""
        note = f" ({result.note})" if result.note else ""
        LOG.info("job %s %s %s %.3fs%s%s%s", handle, result.action, result.status,
                 time.monotonic() - started, note, reason, sent)

    def _close(self):
        gear_worker, self._gear = self._gear, None
        try:
            gear_worker.unRegisterFunction(self.settings.name)
        except Exception as error:  # no job server to tell: nothing to undo
            LOG.debug("could not unregister %s: %s", self.settings.name, error)
        gear_worker.shutdown()
        LOG.info("stopped serving %r", self.settings.name)
