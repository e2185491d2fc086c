"""hpcs_action → handler; every failure becomes a FAIL reply, here and only here.

handle() never raises: whatever bytes arrive, a JSON object goes back.
"""
import json
import logging
import math
from dataclasses import dataclass
from typing import Optional

from libra_worker import __version__, diagnostics, models
from libra_worker.errors import BadRequest, Deleted, JobError

LOG = logging.getLogger(__name__)
# What a reply says of the job; never echoed from the request (Libra reads badRequest first).
REPLY_STATUS_FIELDS = ("hpcs_response", "hpcs_error", "badRequest")

MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
SECRET_FIELDS = ("hpcs_object_store_token",)
MASK = "*****"


@dataclass
class JobResult:
    reply: dict
    action: str
    error: Optional[str] = None
    note: Optional[str] = None  # how the job was done, for the log line

    @property
    def status(self):
        return self.reply.get("hpcs_response", "FAIL")

    @property
    def reply_bytes(self):
        return json.dumps(self.reply).encode("utf-8")


def masked(message):
    """A shallow copy of the message with every secret replaced by MASK."""
    return {key: (MASK if key in SECRET_FIELDS else value) for key, value in message.items()}


def one_line(text):
    return " ".join(str(text).split()) or "unknown error"


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed in JSON")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def decode(payload):
    """bytes → dict, or BadRequest saying why not."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise BadRequest(f"payload too large: {len(payload)} bytes (limit {MAX_PAYLOAD_BYTES})")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest(f"payload is not valid UTF-8: {error.reason} at byte {error.start}") from None
    try:
        message = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadRequest("payload is not valid JSON: nested too deeply") from None
    except ValueError as error:
        raise BadRequest(f"payload is not valid JSON: {error}") from None
    if not isinstance(message, dict):
        raise BadRequest(f"payload must be a JSON object, not {type(message).__name__}")
    return message


class Controller:
    def __init__(self, settings, driver):
        self.settings = settings
        self.driver = driver
        self.handlers = {
            "UPDATE": self.do_update,
            "SUSPEND": lambda message, reply: driver.suspend(),
            "ENABLE": lambda message, reply: driver.enable(),
            "DELETE": lambda message, reply: driver.delete(),
            "STATS": self.do_stats,
            "METRICS": self.do_metrics,
            "ARCHIVE": lambda message, reply: driver.archive(message),
            "DISCOVER": self.do_discover,
            "DIAGNOSTICS": self.do_diagnostics,
        }

    def handle(self, payload):
        """Gearman payload bytes → JobResult (never raises)."""
        reply, action = {}, "?"
        try:
            message = decode(payload)
            reply = masked(message)
            for field in REPLY_STATUS_FIELDS:  # the worker's to write: a request's own would mislead callers
                reply.pop(field, None)
            if LOG.isEnabledFor(logging.DEBUG):
                LOG.debug("request: %s", json.dumps(reply))
            requested = self._action(message)
            self._known(requested)
            action = requested
            note = self.handlers[action](message, reply)
            reply["hpcs_response"] = "PASS"
            result = JobResult(reply, action, note=note)
        except BadRequest as error:
            result = self._fail(reply, action, error, bad_request=True)
        except Deleted as error:
            reply["status"] = "DELETED"
            result = self._fail(reply, action, error)
        except JobError as error:
            result = self._fail(reply, action, error)
        except Exception as error:  # a bug must cost one FAIL, never the worker
            LOG.exception("%s crashed", action)
            result = self._fail(reply, action, f"internal error: {type(error).__name__}: {error}")
        if LOG.isEnabledFor(logging.DEBUG):
            LOG.debug("reply: %s", json.dumps(result.reply))
        return result

    @staticmethod
    def _action(message):
        if "hpcs_action" not in message:
            raise BadRequest("Missing 'hpcs_action' element")
        action = message["hpcs_action"]
        if not isinstance(action, str):
            raise BadRequest(f"'hpcs_action' must be a string, not {type(action).__name__}")
        return action.upper()

    def _known(self, action):
        if action not in self.handlers:
            raise BadRequest(f"Unknown hpcs_action {action[:40]!r}")

    def _fail(self, reply, action, error, bad_request=False):
        text = one_line(error)
        reply["hpcs_response"] = "FAIL"
        reply["hpcs_error"] = text
        if bad_request:
            reply["badRequest"] = {
                "code": "400", "message": "Validation fault", "details": "The object is not valid",
                "validationErrors": {"message": text}}
        return JobResult(reply, action, text)

    # -- actions -----------------------------------------------------------
    def do_update(self, message, reply):
        load_balancers = models.parse_update(message)
        how = self.driver.update(load_balancers)
        for lb_reply, lb in zip(reply["loadBalancers"], load_balancers):
            for node_reply, node in zip(lb_reply["nodes"], lb.nodes):
                node_reply["condition"] = "ENABLED" if node.enabled else "DISABLED"
        return how

    def do_stats(self, message, reply):
        reply["nodes"] = [{"id": node_id, "status": status} for node_id, status in self.driver.stats()]

    def do_metrics(self, message, reply):
        report = self.driver.metrics()
        reply["utc_start"] = report.utc_start
        reply["utc_end"] = report.utc_end
        reply["loadBalancers"] = [{"protocol": protocol, "bytes_out": count}
                                  for protocol, count in report.bytes_out]

    def do_discover(self, message, reply):
        major, minor = __version__.split(".")[:2]
        reply["version"] = f"{major}.{minor}"
        reply["release"] = __version__

    def do_diagnostics(self, message, reply):
        servers = list(self.settings.gearman.servers)
        target = self.settings.network_check
        statuses = diagnostics.tcp_checks(servers + ([target] if target else []))
        # `host` alone, as Libra's worker gave it; `port` beside it.
        reply["gearman"] = [{"host": host, "port": port, "status": status}
                            for (host, port), status in zip(servers, statuses)]
        reply["network"] = statuses[-1] if target else "FAIL"
        reply["release"] = __version__
