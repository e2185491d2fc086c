"""HAProxy's stats socket, read over socat: `show info;show stat` in one call.

The CSV is parsed by its header names, never by column numbers, so HAProxy
versions that add columns keep working.
"""
import contextlib
import csv
import logging
import os
import select
import time
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

from libra_worker.errors import CommandFailed, ServiceError

LOG = logging.getLogger(__name__)

QUERY = "show info;show stat\n"
# `show stat <iid> <type> <sid>`: type 1 = frontends, 4 = servers.  Reading only
# the rows a caller needs keeps a 10,000-server answer out of the ledger's way.
FRONTENDS_QUERY = "show info;show stat -1 1 -1\n"
SERVERS_QUERY = "show info;show stat -1 4 -1\n"
# socat stops reading this long after it sent QUERY (its default, 0.5 s, cuts
# off a busy HAProxy's answer); HAProxy closes the connection once it answered.
SOCAT_LINGER = "8"
QUERY_TIMEOUT = 10
AGGREGATE_ROWS = ("FRONTEND", "BACKEND")


def node_status(haproxy_status):
    """'UP' when HAProxy routes traffic to the server, else 'DOWN'.

    'UP 1/3' is up with failed checks counting toward down: it still takes
    traffic, and Libra's admin API would mark it ERROR on a 'DOWN'.
    'DOWN 1/2' (going up), MAINT, NOLB, DRAIN and 'no check' are DOWN.
    """
    status = haproxy_status.strip()
    return "UP" if status == "UP" or status.startswith("UP ") else "DOWN"


class StatRow(NamedTuple):
    """The columns of one `show stat` row the worker reads (a tuple: 10,000 servers, 10,000 rows)."""
    pxname: str
    svname: str
    status: str
    bout: str


REQUIRED_COLUMNS = StatRow._fields


@dataclass(frozen=True)
class Snapshot:
    """One reading of one HAProxy process."""
    pid: int
    started: int  # the process's start time (epoch seconds): with pid, names a counter generation
    rows: Tuple[StatRow, ...]
    connections: int = 0  # client connections the process still serves (CurrConns)

    @property
    def generation(self):
        return f"{self.pid}@{self.started}"

    def server_statuses(self) -> List[Tuple[str, str, str]]:
        """[(proxy, server, 'UP'|'DOWN')] for every back-end server."""
        return [(row.pxname, row.svname, node_status(row.status))
                for row in self.rows if row.svname not in AGGREGATE_ROWS]

    def frontend_bytes_out(self) -> Dict[str, int]:
        """{frontend name: bytes sent to clients} from the FRONTEND rows."""
        return {row.pxname: int(row.bout or 0)
                for row in self.rows if row.svname == "FRONTEND"}


def parse(text) -> Snapshot:
    """The answer to QUERY → Snapshot, or ServiceError saying what was wrong.

    HAProxy ends the answer to each command with an empty line: an answer
    without one was cut short, and a partial reading must never be counted.
    """
    info, _, stat = text.partition("\n# ")
    fields = {}
    for line in info.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        pid = int(fields["Pid"])
        started = (int(fields["Start_time_sec"]) if "Start_time_sec" in fields
                   else None)
    except (KeyError, ValueError):
        raise ServiceError(f"the stats socket gave no process info: {_excerpt(text)}") from None
    if not stat:
        raise ServiceError(f"the stats socket gave no statistics: {_excerpt(text)}")
    if not stat.endswith("\n\n"):
        raise ServiceError("the stats socket's answer was cut short")
    reader = csv.reader(stat.splitlines())
    header = next(reader, [])
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise ServiceError(f"the stats socket's CSV has no {', '.join(missing)} column")
    columns = [header.index(name) for name in REQUIRED_COLUMNS]
    rows = []
    try:
        for values in reader:
            if not values:
                continue
            if len(values) < len(header):
                raise ValueError(f"line {reader.line_num} has fewer fields than the header")
            # Only the columns read later: ~100 per server is most of a 10,000-server peak.
            row = StatRow(*[values[column] for column in columns])
            int(row.bout or 0)
            rows.append(row)
    except (ValueError, csv.Error) as error:
        raise ServiceError(f"the stats socket's CSV is malformed: {error}") from None
    if started is None:
        # Older HAProxy has no Start_time_sec.  Uptime_sec grows with every
        # reading (and now - uptime jitters by a second), so it cannot name a
        # generation: the pid alone does.
        started = 0
    try:
        connections = int(fields.get("CurrConns", "0") or 0)
    except ValueError:
        connections = 0
    return Snapshot(pid=pid, started=started, rows=tuple(rows), connections=connections)


def _excerpt(text):
    return repr(text.strip()[:80])


class StatsSocket:
    def __init__(self, socat, path, commands):
        self.socat = socat
        self.path = path
        self.commands = commands

    def exists(self):
        return os.path.exists(self.path)

    def ask(self, command) -> str:
        """Send one or more `;`-separated commands; the raw answer, or ServiceError."""
        if not self.exists():
            raise ServiceError(f"HAProxy is not running (no stats socket at {self.path})")
        argv = [self.socat, "-t", SOCAT_LINGER, "stdio", f"unix-connect:{self.path}"]
        command = command.rstrip("\n") + "\n"
        # Never through sudo: the socket is the worker's (process mode) or
        # group haproxy's (system mode); socat as root would run anything.
        try:
            result = self.commands.run(argv, stdin=command, timeout=QUERY_TIMEOUT)
        except CommandFailed as error:
            raise ServiceError(f"HAProxy is not answering on {self.path}: {error}") from None
        return result.stdout

    def snapshot(self, query=QUERY) -> Snapshot:
        """Read the socket now; ServiceError when missing, refusing or garbled."""
        return parse(self.ask(query))

    def session(self):
        """An interactive HeldSession on the process serving now; ServiceError when none opens."""
        argv = [self.socat, "stdio", f"unix-connect:{self.path}"]
        try:
            session = HeldSession(self.commands.open_pipe(argv))
        except CommandFailed as error:
            raise ServiceError(str(error)) from None
        try:
            session.ask("prompt")
        except ServiceError:
            session.close()
            raise
        return session

    def hold(self):
        """A HeldSession on the process serving now, or None when none can be opened."""
        try:
            return self.session()
        except ServiceError as error:
            LOG.info("cannot hold a stats session across the reload: %s", error)
            return None

    def pid(self) -> Optional[int]:
        """The pid answering the socket, or None."""
        try:
            return self.snapshot(FRONTENDS_QUERY).pid
        except ServiceError:
            return None


PROMPT = b"\n> "


class HeldSession:
    """An interactive session on the stats socket, kept open across a reload.

    An old HAProxy process stays alive while a CLI session to it is open, so
    its counters can still be read after its last client connection ended;
    closing the session lets it exit.
    """

    def __init__(self, process):
        self.process = process
        self.pending = bytearray()  # read and not yet handed out (an answer can be megabytes)
        self.generation = None  # of the process it is attached to, once read
        # Set by the first failure: an answer that came too late would be taken for the
        # next command's, so the session is never asked anything again.
        self.broken = None

    def ask(self, command, timeout=5.0):
        """One command → its answer (without the prompt); ServiceError when the session is gone."""
        # Joined as the non-interactive CLI separates answers: by an empty line.
        return "\n".join(self.answers(command, timeout))

    def answers(self, command, timeout=5.0):
        """One line of `;`-separated commands → [the answer to each]; ServiceError when gone."""
        with self._failing_for_good():
            # Interactive mode prompts after each command; `timeout` bounds the whole answer.
            return self._exchange([command], command.count(";") + 1, timeout, patient=False)

    @contextlib.contextmanager
    def _failing_for_good(self):
        if self.broken is not None:
            raise ServiceError(f"the held stats session failed before: {self.broken}")
        try:
            yield
        except ServiceError as error:
            self.broken = str(error)
            raise

    def exchange(self, lines, count, timeout=10.0):
        """Lines of `;`-separated commands, all written at once → the `count` answers, in order.

        Writing and reading go on together (the lines can be megabytes, more
        than a pipe holds), so HAProxy works through them without waiting for
        this process between lines; ServiceError when the session is gone or
        the answers stop coming for `timeout` seconds.
        """
        with self._failing_for_good():
            return self._exchange(lines, count, timeout, patient=True)

    def _exchange(self, lines, count, timeout, patient):
        """`patient`: the timeout starts again whenever answers arrive (else it bounds them all)."""
        data = memoryview(b"".join(line.encode() + b"\n" for line in lines))
        try:
            sink, source = self.process.stdin.fileno(), self.process.stdout.fileno()
        except ValueError:  # closed by close()
            raise ServiceError("the held stats session is closed") from None
        written, answers, searched = 0, [], 0  # the prompt is looked for in what arrived since
        os.set_blocking(sink, False)
        try:
            deadline = time.monotonic() + timeout
            while len(answers) < count:
                left = deadline - time.monotonic()
                writable = [sink] if written < len(data) else []
                readable, ready, _ = select.select([source], writable, [], max(left, 0))
                if not readable and not ready:
                    raise ServiceError(f"the held stats session did not answer "
                                       f"(after {len(answers)} of {count} answers)")
                if ready:
                    try:
                        written += os.write(sink, data[written:written + 65536])
                    except BlockingIOError:
                        pass
                    except OSError as error:
                        raise ServiceError(f"the held stats session is closed: {error} "
                                           f"(after {len(answers)} of {count} answers)") from None
                if readable:
                    chunk = os.read(source, 1 << 20)
                    if not chunk:
                        raise ServiceError(f"the held stats session was closed by HAProxy "
                                           f"(after {len(answers)} of {count} answers)")
                    self.pending += chunk
                    if patient:
                        deadline = time.monotonic() + timeout   # answers keep coming
                    while len(answers) < count and (end := self.pending.find(PROMPT, searched)) >= 0:
                        answers.append(self.pending[:end].decode("utf-8", "replace"))
                        del self.pending[:end + len(PROMPT)]
                        searched = 0
                    searched = max(0, len(self.pending) - len(PROMPT) + 1)
        finally:
            try:
                os.set_blocking(sink, True)
            except OSError:
                pass
        return answers

    def snapshot(self):
        """A reading of the process this session is attached to."""
        reading = parse(self.ask(FRONTENDS_QUERY.strip()) + "\n")
        self.generation = reading.generation
        return reading

    def close(self):
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=2)
        except Exception:  # socat ignores a closed stdin only if stuck: make sure it goes
            self.process.kill()
            self.process.wait()
