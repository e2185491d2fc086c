"""ARCHIVE: one load balancer's HAProxy log lines, gzipped, uploaded to Swift.

    parse_request(message)   the JSON → ArchiveRequest, or BadRequest naming every missing field
    LineSelector(protocol)   does a log line belong to that load balancer's frontend or backend?
    compress(...)            log file → selected lines → gzip in a private temp dir, streaming
    SwiftUpload(...)         container (created if missing) and object PUT with the MD5 as ETag
    archive(...)             the whole action, temp files removed on every path

The log is read in pieces of at most MAX_LINE bytes and compressed straight
into a temp file while its MD5 is computed, and the upload streams that
file: memory stays flat whatever the log's size.  Only what the log held
when ARCHIVE started is archived; the log itself is left in place.

The token goes into one request header and nowhere else: never into a log
line, an exception text or `hpcs_error` (swiftclient's own logger is kept
from printing even a prefix of it, and every text from the HTTP stack is
scrubbed before use).
"""
import gzip
import hashlib
import logging
import os
import re
import shutil
import socket
import ssl
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit

from libra_worker.drivers.haproxy import render
from libra_worker.errors import BadRequest, CommandFailed
from libra_worker.models import PROTOCOLS, describe

LOG = logging.getLogger(__name__)

STORE_TYPES = ("swift",)
REQUIRED_FIELDS = ("hpcs_object_store_type", "hpcs_object_store_basepath",
                   "hpcs_object_store_endpoint", "hpcs_object_store_token", "loadBalancers")
REQUIRED_LB_FIELDS = ("id", "protocol")

MAX_LINE = 64 * 1024          # a longer line is read (and kept or dropped) in pieces
READ_BUFFER = 1024 * 1024
COMPRESS_LEVEL = 6
UPLOAD_CHUNK = 64 * 1024
CONTENT_TYPE = "application/gzip"
MAX_SAFE_ID = 128
MAX_CONTAINER_BYTES = 256     # Swift's max_container_name_length
MAX_TOKEN = 8192
MAX_ENDPOINT = 2048
MASK = "*****"

_TOKEN = re.compile(r"[\x21-\x7e]+")            # one visible-ASCII word: safe as a header value
_UNSAFE_ID_CHAR = re.compile(r"[^A-Za-z0-9_.-]")
_DOTS = re.compile(r"\.{2,}")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_CONTAINER_BAD = re.compile(r"[\x00-\x1f\x7f/]")


# --------------------------------------------------------------------------
# The request
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchiveRequest:
    endpoint: str                      # Swift storage URL, http(s)://host[:port]/v1/AUTH_...
    container: str                     # hpcs_object_store_basepath
    token: str = field(repr=False)     # never printed
    lb_id: str = ""                    # as the request gave it (str)
    safe_id: str = ""                  # lb_id reduced to [A-Za-z0-9_.-], no '..'
    protocol: str = "HTTP"

    @property
    def frontend(self):
        return render.frontend_name(self.protocol)

    @property
    def backend(self):
        return render.backend_name(self.protocol)

    @property
    def host(self):
        return urlsplit(self.endpoint).netloc.rpartition("@")[2]


def _missing(value):
    return value is None


def _names(names):
    quoted = [f"'{name}'" for name in names]
    if len(quoted) == 1:
        return quoted[0] + " element"
    return ", ".join(quoted[:-1]) + " and " + quoted[-1] + " elements"


def parse_request(message):
    """The ARCHIVE message → ArchiveRequest; BadRequest otherwise.

    Every missing field (absent or null) is named in one error; after that
    the first bad value is.  The token's value is never quoted back.
    """
    missing = [name for name in REQUIRED_FIELDS if _missing(message.get(name))]
    load_balancers = message.get("loadBalancers")
    first = None
    if isinstance(load_balancers, list) and load_balancers and isinstance(load_balancers[0], dict):
        first = load_balancers[0]
        missing += [f"loadBalancers[0].{name}" for name in REQUIRED_LB_FIELDS
                    if _missing(first.get(name))]
    if missing:
        raise BadRequest("Missing " + _names(missing))

    store_type = message["hpcs_object_store_type"]
    if not (isinstance(store_type, str) and store_type.strip().lower() in STORE_TYPES):
        raise BadRequest(f"hpcs_object_store_type: only 'swift' is supported (got {describe(store_type)})")
    if first is None:
        if not isinstance(load_balancers, list):
            raise BadRequest(f"loadBalancers: must be a list (got {describe(load_balancers)})")
        if not load_balancers:
            raise BadRequest("loadBalancers: must name the load balancer whose log to archive "
                             "(got an empty list)")
        raise BadRequest(f"loadBalancers[0]: must be an object (got {describe(load_balancers[0])})")

    protocol = first["protocol"]
    if not (isinstance(protocol, str) and protocol.strip().upper() in PROTOCOLS):
        raise BadRequest(f"loadBalancers[0].protocol: must be one of {', '.join(PROTOCOLS)} "
                         f"(got {describe(protocol)})")
    safe = safe_id(first["id"])
    return ArchiveRequest(
        endpoint=_endpoint(message["hpcs_object_store_endpoint"]),
        container=_container(message["hpcs_object_store_basepath"]),
        token=_token(message["hpcs_object_store_token"]),
        lb_id=str(first["id"]),
        safe_id=safe,
        protocol=protocol.strip().upper())


def _endpoint(value):
    path = "hpcs_object_store_endpoint"
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{path}: must be the Swift storage URL (got {describe(value)})")
    url = value.strip()
    if len(url) > MAX_ENDPOINT or _CONTROL.search(url):
        raise BadRequest(f"{path}: must be a URL without spaces or control characters "
                         f"(got {describe(value)})")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"{path}: must be an http:// or https:// URL with a host "
                         f"(got {describe(value)})")
    if "@" in parts.netloc:
        # Not quoted back: the URL holds a secret.  The token is the only credential sent.
        raise BadRequest(f"{path}: must not carry credentials (user:password@host); "
                         "the token is the only credential the worker sends")
    if parts.query or parts.fragment:
        raise BadRequest(f"{path}: a storage URL has no query or fragment (got {describe(value)})")
    return url.rstrip("/")


def _container(value):
    path = "hpcs_object_store_basepath"
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{path}: must be a Swift container name (got {describe(value)})")
    if _CONTAINER_BAD.search(value):
        raise BadRequest(f"{path}: a container name has no '/' or control characters "
                         f"(got {describe(value)})")
    if value in (".", "..") or len(value.encode("utf-8", "surrogatepass")) > MAX_CONTAINER_BYTES:
        raise BadRequest(f"{path}: must be 1-{MAX_CONTAINER_BYTES} bytes and not '.' or '..' "
                         f"(got {describe(value)})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{path}: must be valid Unicode") from None
    return value


def _token(value):
    # The value is a secret: errors describe it, never quote it.
    if not isinstance(value, str):
        raise BadRequest(f"hpcs_object_store_token: must be a string (got {type(value).__name__})")
    if not value or len(value) > MAX_TOKEN or not _TOKEN.fullmatch(value):
        raise BadRequest(f"hpcs_object_store_token: must be 1-{MAX_TOKEN} visible ASCII "
                         "characters without spaces")
    return value


def safe_id(value):
    """A load balancer id → a safe first segment of an object name.

    Letters, digits, '_', '-' and '.' are kept; every other character
    becomes '_', and so does each dot of a run of dots and a leading dot:
    "../x" → "___x", "a/b" → "a_b".  Lossy on purpose: the id is only a
    prefix that groups one load balancer's archives.
    """
    path = "loadBalancers[0].id"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRequest(f"{path}: must be a string or an integer (got {describe(value)})")
    if isinstance(value, int) and value.bit_length() > 256:
        raise BadRequest(f"{path}: must be at most {MAX_SAFE_ID} characters")
    text = str(value)
    if not text or len(text) > MAX_SAFE_ID:
        raise BadRequest(f"{path}: must be 1-{MAX_SAFE_ID} characters (got {describe(value)})")
    safe = _UNSAFE_ID_CHAR.sub("_", text)
    safe = _DOTS.sub(lambda match: "_" * len(match.group(0)), safe)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    return safe


def object_name(safe_lb_id, when):
    """'<safe lb id>/haproxy-<YYYYMMDD-HHMMSS>.log.gz' for a UTC datetime."""
    return f"{safe_lb_id}/haproxy-{when.strftime('%Y%m%d-%H%M%S')}.log.gz"


# --------------------------------------------------------------------------
# Which lines belong to a load balancer
# --------------------------------------------------------------------------

# "Nov 22 18:26:39 host haproxy[19896]: <message>" (rsyslog or our sink) or
# HAProxy's own "<134>Nov 22 18:26:39 haproxy[19896]: <message>".
_SYSLOG_HEADER = re.compile(rb"haproxy(?:\[\d+\])?: ")
# option httplog / tcplog: "<client>:<port> [<accept date>] <frontend>[~] <backend>/<server> ..."
_TRAFFIC = re.compile(rb"\S+ \[[^\]\s]+\] ([^\s~]+)~? ([^\s/]+)/\S+ ")
# Events: "Server http_servers/101 is DOWN", "backend http_servers has no server available!",
# "Proxy http started.", "Stopping frontend http in 0 ms.", "(http/HTTP)" connect lines.
_EVENT = re.compile(rb"(?:^|[\s(])(?:[Pp]roxy|[Ff]rontend|[Bb]ackend|[Ll]istener|[Ss]erver) "
                    rb"([^\s/]+?)(?=/|[\s.,:;!)]|$)"
                    rb"|\(([^\s/()]+)/(?:HTTP|TCP)\)")


class LineSelector:
    """True for the log lines of one load balancer: its frontend and its backend.

    A traffic line (httplog / tcplog) belongs to the load balancer whose
    frontend accepted the connection; any other HAProxy line belongs to it
    when it names its frontend or backend as a proxy or a server's proxy.
    """

    def __init__(self, protocol):
        self.frontend = render.frontend_name(protocol).encode()
        self.backend = render.backend_name(protocol).encode()
        self.names = {self.frontend, self.backend}

    @staticmethod
    def message(line):
        header = _SYSLOG_HEADER.search(line)
        return line[header.end():] if header else line

    def __call__(self, line):
        message = self.message(line)
        traffic = _TRAFFIC.match(message)
        if traffic:
            return traffic.group(1) == self.frontend or traffic.group(2) == self.backend
        for match in _EVENT.finditer(message):
            if (match.group(1) or match.group(2)) in self.names:
                return True
        return False


# --------------------------------------------------------------------------
# Streaming compression
# --------------------------------------------------------------------------

class _WriteFailed(Exception):
    """Writing the temp file failed (as opposed to reading the log)."""


class _HashingWriter:
    """A binary file that also computes the MD5 and size of what is written to it."""

    def __init__(self, stream):
        self.stream = stream
        self.md5 = hashlib.md5()
        self.size = 0

    def write(self, data):
        try:
            written = self.stream.write(data)
        except OSError as error:
            raise _WriteFailed(error.strerror) from None
        self.md5.update(data)
        self.size += len(data)
        return written

    def flush(self):
        try:
            self.stream.flush()
            os.fsync(self.stream.fileno())
        except OSError as error:
            raise _WriteFailed(error.strerror) from None


@dataclass(frozen=True)
class Compressed:
    path: str
    size: int        # bytes of gzip
    md5: str         # hex MD5 of those bytes: the object's ETag
    lines: int       # log lines selected
    log_bytes: int   # bytes of log lines selected


def _copy_selected(log, size, selector, out):
    """Write the lines among the first `size` bytes of `log` that `selector` keeps → (lines, bytes)."""
    lines = log_bytes = 0
    remaining, keep, piece = size, None, b""
    while remaining > 0:
        piece = log.readline(min(MAX_LINE, remaining))
        if not piece:
            break                      # the log was truncated under us
        remaining -= len(piece)
        if keep is None:               # the start of a line decides for all of it
            keep = selector(piece)
            lines += keep
        if keep:
            out.write(piece)
            log_bytes += len(piece)
        if piece.endswith(b"\n"):
            keep = None
    if keep and not piece.endswith(b"\n"):
        out.write(b"\n")              # the log's last line had no newline yet
        log_bytes += 1
    return lines, log_bytes


def compress(logfile, selector, target, gzip_name, when):
    """Write the gzip of the lines of `logfile` that `selector` keeps into the new file `target`.

    Only the bytes the log held when it was opened are read.  The gzip
    header names `gzip_name` and carries `when` as its time stamp.
    """
    try:
        log = open(logfile, "rb", buffering=READ_BUFFER)
    except FileNotFoundError:
        raise CommandFailed(f"no HAProxy log to archive: {logfile} does not exist") from None
    except OSError as error:
        raise CommandFailed(f"cannot read the HAProxy log {logfile}: {error.strerror}") from None
    with log:
        try:
            raw = open(target, "xb")
        except OSError as error:
            raise CommandFailed(f"cannot create a temp file for the compressed log: "
                                f"{error.strerror}") from None
        try:
            with raw:
                writer = _HashingWriter(raw)
                with gzip.GzipFile(filename=gzip_name, mode="wb", fileobj=writer,
                                   compresslevel=COMPRESS_LEVEL, mtime=int(when.timestamp())) as gz:
                    lines, log_bytes = _copy_selected(log, os.fstat(log.fileno()).st_size, selector, gz)
                writer.flush()
        except _WriteFailed as error:
            raise CommandFailed(f"cannot write the compressed log to a temp file: {error}") from None
        except OSError as error:        # only reads of the log are left to fail
            raise CommandFailed(f"cannot read the HAProxy log {logfile}: {error.strerror}") from None
    return Compressed(target, writer.size, writer.md5.hexdigest(), lines, log_bytes)


# --------------------------------------------------------------------------
# Swift
# --------------------------------------------------------------------------

class _RedactToken(logging.Filter):
    """Replaces the token in any record of swiftclient's logger (whatever the level)."""

    def __init__(self, token):
        super().__init__()
        self.token = token

    def filter(self, record):
        try:
            text = record.getMessage()
        except Exception:  # a malformed record must not leak through its args either
            text = str(record.msg)
        if self.token in text:
            record.msg, record.args = text.replace(self.token, MASK), None
        return True


def _exception_chain(error):
    """error, its causes, contexts, `.reason`s and exception args, each once."""
    seen, pending = set(), [error]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen or not isinstance(current, BaseException):
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__, getattr(current, "reason", None),
                    *[arg for arg in current.args if isinstance(arg, BaseException)]]


def _no_redirects(connection_class):
    """swiftclient's Connection whose HTTP connections never follow a redirect.

    requests follows 3xx by default, repeating the request (and its
    X-Auth-Token) to wherever the answer points; with allow_redirects off
    the 3xx comes back to swiftclient as a failed request.
    """
    class Connection(connection_class):
        def http_connection(self, url=None):
            parsed, conn = super().http_connection(url)
            conn.requests_args["allow_redirects"] = False
            return parsed, conn
    return Connection


class SwiftUpload:
    """One archive's requests to Swift, with swiftclient, no retries, `timeout` per request."""

    def __init__(self, request, timeout):
        self.request = request
        self.timeout = timeout

    def scrub(self, text):
        text = " ".join(str(text).split())
        return text.replace(self.request.token, MASK) if self.request.token else text

    # -- error texts ------------------------------------------------------------
    def _http_error(self, error, what):
        status = error.http_status
        reason = self.scrub(error.http_reason or "")
        answer = f"{status} {reason}".strip()
        if status == 401:
            return CommandFailed(f"Swift refused the token: {answer} ({what})")
        if status == 403:
            return CommandFailed(f"Swift denied access to container '{self.request.container}': "
                                 f"{answer} ({what})")
        if status == 422:
            return CommandFailed(f"checksum mismatch: Swift answered {answer} to {what}: the data it "
                                 "received does not have the MD5 sent as its ETag")
        if status is not None and 300 <= status < 400:
            return CommandFailed(f"Swift answered {answer} ({what}): the worker does not follow "
                                 "redirects, the token would travel to another address")
        if status is not None and status >= 500:
            return CommandFailed(f"Swift failed: {answer} ({what})")
        if status is None:
            return CommandFailed(f"Swift request failed ({what}): {self.scrub(error.msg)[:200]}")
        return CommandFailed(f"Swift answered {answer} ({what})")

    def _network_error(self, error, what):
        host = self.request.host
        for cause in _exception_chain(error):
            if isinstance(cause, ConnectionRefusedError):
                return CommandFailed(f"cannot reach Swift at {host}: connection refused ({what})")
            if isinstance(cause, (socket.timeout, TimeoutError)) or "Timeout" in type(cause).__name__:
                return CommandFailed(f"Swift at {host} did not answer within {self.timeout:g}s ({what})")
            if isinstance(cause, socket.gaierror):
                return CommandFailed(f"cannot resolve Swift's host {host}: {cause.strerror} ({what})")
            if isinstance(cause, ssl.SSLError):
                return CommandFailed(f"TLS with Swift at {host} failed: "
                                     f"{self.scrub(cause.reason or cause)[:160]} ({what})")
            if isinstance(cause, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
                return CommandFailed(f"Swift at {host} closed the connection ({what})")
        return CommandFailed(f"cannot reach Swift at {host}: "
                             f"{self.scrub(error)[:200] or type(error).__name__} ({what})")

    def _call(self, what, function, *args, missing_ok=False, **kwargs):
        """function(*args, **kwargs); every failure → CommandFailed (404 → None when missing_ok)."""
        from requests.exceptions import RequestException
        from swiftclient.exceptions import ClientException
        try:
            return function(*args, **kwargs)
        except ClientException as error:
            if missing_ok and error.http_status == 404:
                return None
            if error.http_status is None:
                raise self._network_error(error, what) from None
            raise self._http_error(error, what) from None
        except (RequestException, OSError, ValueError) as error:
            raise self._network_error(error, what) from None
        except Exception as error:  # noqa: BLE001 - a library surprise: its text, scrubbed, no traceback
            raise CommandFailed(f"Swift request failed ({what}): {type(error).__name__}: "
                                f"{self.scrub(error)[:200]}") from None

    # -- the requests -----------------------------------------------------------
    def upload(self, compressed, name):
        """HEAD (and when missing PUT) the container, then PUT the object; checks the ETag."""
        import swiftclient.client as swift
        # swiftclient logs a prefix of X-Auth-Token with failed requests: not even that.
        swift.logger_settings["reveal_sensitive_prefix"] = 0
        redact = _RedactToken(self.request.token)
        swift.logger.addFilter(redact)
        connection = _no_redirects(swift.Connection)(
            preauthurl=self.request.endpoint, preauthtoken=self.request.token,
            retries=0, timeout=self.timeout)
        container = self.request.container
        try:
            if self._call(f"HEAD container '{container}'", connection.head_container, container,
                          missing_ok=True) is None:
                self._call(f"PUT container '{container}'", connection.put_container, container)
                LOG.info("ARCHIVE: created Swift container %r", container)
            with open(compressed.path, "rb") as contents:
                etag = self._call(f"PUT object '{container}/{name}'", connection.put_object,
                                  container, name, contents, content_length=compressed.size,
                                  etag=compressed.md5, content_type=CONTENT_TYPE,
                                  chunk_size=UPLOAD_CHUNK)
        finally:
            swift.logger.removeFilter(redact)
            connection.close()
        etag = (etag or "").strip('"').lower()
        if etag != compressed.md5:
            raise CommandFailed(f"checksum mismatch: uploaded '{container}/{name}' with MD5 "
                                f"{compressed.md5}, Swift stored ETag {etag or 'none'}")
        return etag


# --------------------------------------------------------------------------
# The action
# --------------------------------------------------------------------------

def archive(message, settings, workdir=None, now=None):
    """ARCHIVE `message` (the job's JSON object) with HaproxySettings `settings`.

    Returns (container, object name, Compressed).  Temp files live in a
    private directory under `workdir` (or the system's) that is removed
    on every path.
    """
    request = parse_request(message)
    when = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    name = object_name(request.safe_id, when)
    tmpdir = tempfile.mkdtemp(prefix="archive-", dir=workdir)   # mode 0700
    try:
        target = os.path.join(tmpdir, "haproxy.log.gz")
        compressed = compress(settings.logfile, LineSelector(request.protocol), target,
                              gzip_name=name.rpartition("/")[2][:-len(".gz")], when=when)
        if compressed.lines == 0:
            raise CommandFailed(f"no HAProxy log lines for load balancer {request.lb_id[:64]!r} "
                                f"({request.protocol}) in {settings.logfile}")
        LOG.info("ARCHIVE: %d lines (%d bytes, %d gzipped) of %s %r to Swift %s/%s",
                 compressed.lines, compressed.log_bytes, compressed.size, request.protocol,
                 request.lb_id[:64], request.container, name)
        SwiftUpload(request, settings.job_timeout).upload(compressed, name)
        return request.container, name, compressed
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
