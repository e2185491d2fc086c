"""HAProxy's stats socket, read over socat: `show info;show stat` in one call.

The CSV is parsed by its header names, never by column numbers, so HAProxy
versions that add columns keep working.
"""
import csv
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from libra_worker.errors import CommandFailed, ServiceError

QUERY = "show info;show stat\n"
# socat stops reading this long after it sent QUERY (its default, 0.5 s, cuts
# off a busy HAProxy's answer); HAProxy closes the connection once it answered.
SOCAT_LINGER = "8"
QUERY_TIMEOUT = 10
REQUIRED_COLUMNS = ("pxname", "svname", "status", "bout")
AGGREGATE_ROWS = ("FRONTEND", "BACKEND")


def node_status(haproxy_status):
    """Only a server HAProxy reports fully up is UP ('UP 1/3' is going down)."""
    return "UP" if haproxy_status.strip() == "UP" else "DOWN"


@dataclass(frozen=True)
class Snapshot:
    """One reading of one HAProxy process."""
    pid: int
    started: int  # the process's start time (epoch seconds): with pid, names a counter generation
    rows: Tuple[Dict[str, str], ...]

    @property
    def generation(self):
        return f"{self.pid}@{self.started}"

    def server_statuses(self) -> List[Tuple[str, str, str]]:
        """[(proxy, server, 'UP'|'DOWN')] for every back-end server."""
        return [(row["pxname"], row["svname"], node_status(row["status"]))
                for row in self.rows if row["svname"] not in AGGREGATE_ROWS]

    def frontend_bytes_out(self) -> Dict[str, int]:
        """{frontend name: bytes sent to clients} from the FRONTEND rows."""
        return {row["pxname"]: int(row["bout"] or 0)
                for row in self.rows if row["svname"] == "FRONTEND"}


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
    reader = csv.DictReader(stat.splitlines())
    missing = [name for name in REQUIRED_COLUMNS if name not in (reader.fieldnames or ())]
    if missing:
        raise ServiceError(f"the stats socket's CSV has no {', '.join(missing)} column")
    rows = []
    try:
        for row in reader:
            if row.get("pxname") is None or row.get("svname") is None:
                continue
            if None in row.values():
                raise ValueError(f"line {reader.line_num} has fewer fields than the header")
            int(row["bout"] or 0)
            rows.append(row)
    except (ValueError, csv.Error) as error:
        raise ServiceError(f"the stats socket's CSV is malformed: {error}") from None
    if started is None:
        # Older HAProxy has no Start_time_sec.  Uptime_sec grows with every
        # reading (and now - uptime jitters by a second), so it cannot name a
        # generation: the pid alone does.
        started = 0
    return Snapshot(pid=pid, started=started, rows=tuple(rows))


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
        try:
            if os.access(self.path, os.R_OK | os.W_OK):
                result = self.commands.run(argv, stdin=command, timeout=QUERY_TIMEOUT)
            else:
                result = self.commands.privileged(argv, stdin=command, timeout=QUERY_TIMEOUT)
        except CommandFailed as error:
            raise ServiceError(f"HAProxy is not answering on {self.path}: {error}") from None
        return result.stdout

    def snapshot(self) -> Snapshot:
        """Read the socket now; ServiceError when missing, refusing or garbled."""
        return parse(self.ask(QUERY))

    def pid(self) -> Optional[int]:
        """The pid answering the socket, or None."""
        try:
            return self.snapshot().pid
        except ServiceError:
            return None
