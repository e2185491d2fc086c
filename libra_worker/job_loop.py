"""The job loop: take one job at a time from Gearman, always send a reply."""
import ctypes
import gc
import logging
import time

from libra_worker.wire import tls
from libra_worker.wire import worker as wire_worker

LOG = logging.getLogger(__name__)

try:  # glibc keeps the pages a large job freed; malloc_trim() hands them back
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):
    _MALLOC_TRIM = None


# A job whose request and reply together are smaller than this frees too little to
# hand back; malloc_trim() walks the whole heap (~10 µs, a fifth of a DISCOVER's cost).
TRIM_AFTER_BYTES = 64 * 1024
# After a stop: how long sent replies may take to be confirmed before the sockets close.
SHUTDOWN_TIMEOUT = 3.0


def release_memory():
    """After a large job: give back what it freed (the pages of a 10,000-node UPDATE)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _printable(text, limit=80):
    """Log-safe: control, format and non-ASCII characters escaped, length capped."""
    return text.encode("unicode_escape").decode("ascii")[:limit]


class StopFlag:
    """Set by the first SIGTERM/SIGINT, at any time (even before the job loop runs)."""

    def __init__(self):
        self.requested = False
        self._listeners = []

    def set(self):
        """Safe in a signal handler: a flag and a byte on a pipe."""
        self.requested = True
        for listener in list(self._listeners):
            listener()

    def listen(self, callback):
        self._listeners.append(callback)

    def forget(self, callback):
        if callback in self._listeners:
            self._listeners.remove(callback)


class JobLoop:
    """Registers `settings.name` and feeds each job to the controller.

    A stop (StopFlag.set, safe in a signal handler) lets the job in hand
    finish and its reply go out before run() returns; a stop that came
    before run() makes it return at once.
    """

    def __init__(self, settings, controller, stop_flag=None):
        self.settings = settings
        self.controller = controller
        self.stop_flag = stop_flag or StopFlag()
        self._wire = None

    def _connect(self):
        gearman = self.settings.gearman
        keepalive = (gearman.keepidle, gearman.keepintvl, gearman.keepcnt) if gearman.keepalive else None
        return wire_worker.Worker(
            gearman.servers, self.settings.name,
            client_id=f"libra_worker-{self.settings.name}",
            tls_context=tls.settings_context(gearman),
            reconnect_cap=gearman.reconnect_sleep,
            timeout=gearman.timeout,
            probe_interval=gearman.probe_interval,
            keepalive=keepalive)

    def run(self):
        if self.stop_flag.requested:
            LOG.info("stopped before serving %r", self.settings.name)
            return
        self._wire = self._connect()
        self.stop_flag.listen(self._wire.stop)
        if self.stop_flag.requested:   # a signal between the check above and listen()
            self._wire.stop()
        servers = ", ".join(f"{host}:{port}" for host, port in self.settings.gearman.servers)
        LOG.info("serving function %r from %s", self.settings.name, servers)
        try:
            while not self.stop_flag.requested:
                job = self._wire.next_job()
                if job is None:
                    break
                self._serve(job)
        finally:
            self.stop_flag.forget(self._wire.stop)
            self._wire.close(timeout=SHUTDOWN_TIMEOUT)
            self._wire = None
            LOG.info("stopped serving %r", self.settings.name)

    def _serve(self, job):
        started = time.monotonic()
        handled = len(job.payload)
        # No cyclic garbage collection during a job: a 10,000-node UPDATE allocates
        # enough to set off several, one of them a full pass over everything alive
        # (15-20 ms measured), and a job makes next to no reference cycles.  The
        # collector runs again, by its own thresholds, once the reply is out; no
        # full pass is forced then either: the next job may be waiting.
        collecting = gc.isenabled()
        gc.disable()
        try:
            try:
                result = self.controller.handle(job.payload)
            except Exception:  # the controller never raises; if it ever does, the job still gets an answer
                LOG.exception("job %s: the controller raised; answering WORK_FAIL", _printable(job.name))
                self._wire.fail(job)
                return
            reply = result.reply_bytes
            handled += len(reply)
            # The job's line is written before its reply goes: whoever has the reply finds the line.
            reachable = self._wire.reachable(job)
            sent = "" if reachable else \
                f" (reply not delivered: job server {job.server} went away during the job)"
            reason = f": {result.error}" if result.error else ""
            note = f" ({result.note})" if result.note else ""
            LOG.info("job %s %s %s %.3fs%s%s%s", _printable(job.name), result.action, result.status,
                     time.monotonic() - started, note, reason, sent)
            if reachable:
                self._wire.complete(job, reply)   # a send that fails is logged by the wire, once
        finally:
            if collecting:
                gc.enable()
            if handled >= TRIM_AFTER_BYTES:
                release_memory()
