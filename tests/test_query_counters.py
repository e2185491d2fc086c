"""stats_socket.parse and the Ledger, without a worker.

parse() reads real `show info;show stat` text captured from a live HAProxy
started here (then rearranged: columns reordered, unknown columns added, cut
short).  The Ledger's arithmetic is driven with Snapshots and a statsfile in
tmp_path.
"""
import csv
import io
import json
import logging
import os
import socket
import stat
import subprocess

import pytest

from libra_worker.drivers.haproxy.commands import Commands
from libra_worker.drivers.haproxy.ledger import Ledger, billing_rows
from libra_worker.drivers.haproxy.lifecycle import Lifecycle
from libra_worker.drivers.haproxy.statsfile import Statsfile, valid_state
from libra_worker.drivers.haproxy.stats_socket import QUERY, Snapshot, StatRow, StatsSocket, node_status, parse
from libra_worker.errors import CommandFailed, ServiceError
from support.backends import HttpBackend
from support.metrics_helpers import FakeStatsSocket
from support.ports import free_port
from support.traffic import http_get, stop_haproxy, wait_until
from support.worker import HAPROXY, SOCAT

HAPROXY_CFG = """\
global
    stats socket {sock} mode 600 level admin
    pidfile {pidfile}
defaults
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend http
    mode http
    bind 127.0.0.1:{http_port}
    default_backend http_servers
backend http_servers
    mode http
    option httpchk GET /
    server web-1 127.0.0.1:{web_port} check inter 200ms rise 1 fall 1
    server 102 127.0.0.1:{dead_port} check inter 200ms rise 1 fall 1
    server off 127.0.0.1:{web_port} disabled
frontend tcp
    mode tcp
    bind 127.0.0.1:{tcp_port}
    default_backend tcp_servers
backend tcp_servers
    mode tcp
    server node.a 127.0.0.1:{dead_port} check inter 200ms rise 1 fall 1
"""


def _socat(sock):
    """The worker's query, the worker's way: socat stdio, QUERY on stdin."""
    return subprocess.run([SOCAT, "stdio", f"unix-connect:{sock}"], input=QUERY,
                          capture_output=True, text=True, timeout=10, check=True).stdout


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A live HAProxy: (stats socket path, answer text after 2000 bytes were served)."""
    directory = tmp_path_factory.mktemp("live-haproxy")
    web = HttpBackend("web").start()
    config = directory / "haproxy.cfg"
    sock = directory / "stats.sock"
    http_port = free_port()
    config.write_text(HAPROXY_CFG.format(sock=sock, pidfile=directory / "haproxy.pid",
                                         http_port=http_port, web_port=web.port,
                                         dead_port=free_port(), tcp_port=free_port()))
    subprocess.run([HAPROXY, "-f", str(config), "-D"], check=True, timeout=10)
    try:
        wait_until(lambda: sock.exists() and http_get(http_port, "/bytes/2000").status == 200,
                   what="the live HAProxy serving")

        def settled():
            snapshot = parse(_socat(sock))
            statuses = {server: status for _, server, status in snapshot.server_statuses()}
            if (snapshot.frontend_bytes_out()["http"] >= 2000
                    and statuses.get("102") == statuses.get("node.a") == "DOWN"):
                return snapshot
            return None
        wait_until(settled, what="2000 bytes counted and the dead servers DOWN")
        yield sock, _socat(sock)
    finally:
        stop_haproxy(config)
        web.stop()


def _split(text):
    info, _, stat_text = text.partition("\n# ")
    return info, list(csv.reader(stat_text.splitlines()))


def _join(info, table):
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(row for row in table if row)
    return info + "\n# " + out.getvalue() + "\n"


def _summary(snapshot):
    return (snapshot.generation, sorted(snapshot.server_statuses()),
            snapshot.frontend_bytes_out())


# -- parse on live text ---------------------------------------------------------


def test_parse_reads_a_live_haproxy(live):
    sock, text = live
    snapshot = parse(text)
    fields = dict(line.split(": ", 1) for line in text.partition("\n# ")[0].splitlines() if ": " in line)
    assert snapshot.pid == int(fields["Pid"])
    assert snapshot.generation == f"{fields['Pid']}@{fields['Start_time_sec']}"
    assert sorted(snapshot.server_statuses()) == [
        ("http_servers", "102", "DOWN"),
        ("http_servers", "off", "DOWN"),            # MAINT
        ("http_servers", "web-1", "UP"),
        ("tcp_servers", "node.a", "DOWN")]
    bytes_out = snapshot.frontend_bytes_out()
    assert set(bytes_out) == {"http", "tcp"}
    assert 2000 <= bytes_out["http"] < 2000 + 1024 and bytes_out["tcp"] == 0

    # The worker's own reader agrees (real socat, real socket).
    read = StatsSocket(SOCAT, str(sock), Commands(sudo=False)).snapshot()
    assert read.generation == snapshot.generation
    assert read.frontend_bytes_out()["http"] >= bytes_out["http"]


def test_parse_goes_by_header_names_not_column_positions(live):
    _, text = live
    info, table = _split(text)
    header = table[0]
    order = list(reversed(range(len(header))))        # every column moves
    reordered = [[row[i] for i in order] for row in table if row]
    extra = [["future_a"] + reordered[0] + ["zz_new"]] + [
        ["x,y"] + row + ["7"] for row in reordered[1:]]
    for variant in (reordered, extra):
        assert _summary(parse(_join(info, variant))) == _summary(parse(text))


def test_parse_does_not_name_a_generation_by_uptime(live):
    """Without Start_time_sec (older HAProxy) two readings of one process are one generation."""
    _, text = live
    lines = [line for line in text.split("\n") if not line.startswith("Start_time_sec:")]
    older = "\n".join(lines)
    first = parse(older.replace("Uptime_sec: ", "Uptime_sec: 1"))
    later = parse(older.replace("Uptime_sec: ", "Uptime_sec: 9"))
    assert first.generation == later.generation
    assert first.pid == parse(text).pid


@pytest.mark.parametrize("text", [
    "",
    "\x00\xff garbage \x01",
    "Unknown command. Please enter one of the following commands only :\n  help\n\n",
    "Pid: 12\nStart_time_sec: 3\n\n",                                       # no statistics
    "Pid: twelve\n\n# pxname,svname,status,bout\nhttp,FRONTEND,OPEN,1\n\n",
    "Pid: 12\n\n# pxname,svname,status\nhttp,FRONTEND,OPEN\n\n",             # no bout column
    "Pid: 12\n\n# pxname,svname,status,bout\nhttp,FRONTEND,OPEN,lots\n\n",  # bout not a number
    "Pid: 12\n\n# pxname,svname,status,bout\nhttp,FRONTEND,OPEN\n\n",       # short row
    "Pid: 12\n\n# pxname,svname,status,bout\nhttp,FRONTEND,OPEN,1\n",       # no end of answer
    "# pxname,svname,status,bout\nhttp,FRONTEND,OPEN,1\n\n",                # no show info
])
@pytest.mark.no_haproxy
def test_parse_rejects_garbage_with_a_service_error(text):
    with pytest.raises(ServiceError) as error:
        parse(text)
    assert "stats socket" in str(error.value) and "\n" not in str(error.value)


def test_parse_never_accepts_an_answer_cut_short(live):
    """socat or HAProxy cutting the answer anywhere must never give a partial reading."""
    _, text = live
    accepted = []
    for cut in range(1, len(text)):
        try:
            parse(text[:cut])
        except ServiceError:
            continue
        accepted.append(cut)
    assert accepted == [], f"partial answers accepted at {accepted[:5]}"
    parse(text)


@pytest.mark.no_haproxy
def test_node_status_is_up_when_haproxy_routes_to_it():
    # "UP 1/3": up, a failed check counting toward down; HAProxy still routes to it.
    for status in ("UP", "UP 1/3", "UP 2/3", " UP 1/2 "):
        assert node_status(status) == "UP", status
    for status in ("DOWN", "DOWN 1/2", "NOLB", "MAINT", "MAINT (via x/y)", "DRAIN",
                   "no check", "UPPER", ""):
        assert node_status(status) == "DOWN", status


@pytest.mark.no_haproxy
def test_stats_socket_fails_clearly_when_missing_or_refusing(tmp_path):
    missing = StatsSocket(SOCAT, str(tmp_path / "none.sock"), Commands(sudo=False))
    with pytest.raises(ServiceError, match="not running"):
        missing.snapshot()
    assert missing.pid() is None
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))                      # a socket file nobody listens on
    with pytest.raises(ServiceError, match="not answering"):
        StatsSocket(SOCAT, str(stale), Commands(sudo=False)).snapshot()


def test_stats_socket_waits_for_a_slow_answer(live, tmp_path):
    """socat gives up 0.5 s after its stdin ended unless told otherwise: a busy HAProxy
    answering later must still be read whole."""
    _, text = live
    path = tmp_path / "slow.sock"
    with FakeStatsSocket(path, text.encode(), delay=1.0) as fake:
        snapshot = StatsSocket(SOCAT, str(path), Commands(sudo=False)).snapshot()
    assert fake.received == [QUERY.encode()]
    assert _summary(snapshot) == _summary(parse(text))


def test_a_held_session_reads_long_answers_and_many_lines_at_once(tmp_path):
    """3,000 servers: `show servers state` (~200 kB, several reads) through the interactive
    session is the one-shot socat answer, the commands of one line come apart, and 60
    lines written at once come back as 3,120 answers in order."""
    sock = tmp_path / "stats.sock"
    config = tmp_path / "haproxy.cfg"
    servers = "\n".join(f"    server s{index} 127.0.0.1:{20000 + index} id {index + 1}"
                         for index in range(3000))
    config.write_text(f"global\n    stats socket {sock} mode 600 level admin\n"
                      f"    pidfile {tmp_path / 'haproxy.pid'}\n"
                      "defaults\n    mode http\n    timeout connect 1s\n    timeout client 1s\n"
                      f"    timeout server 1s\nbackend big\n{servers}\n")
    subprocess.run([HAPROXY, "-f", str(config), "-D"], check=True, timeout=20)
    try:
        wait_until(sock.exists, what="the stats socket")
        socket_ = StatsSocket(SOCAT, str(sock), Commands(sudo=False))
        one_shot = socket_.ask("show servers state")
        assert one_shot.count("\n") > 3000 and len(one_shot) > 200_000
        held = socket_.session()
        try:
            assert held.ask("show servers state") + "\n" == one_shot
            state, info, again = held.answers("show servers state;show info;show servers state big")
            assert state + "\n" == one_shot and again.count(" big ") == 3000
            assert "Pid:" in info and "Name: HAProxy" in info
            # 6,000 commands in 60 lines (~250 kB, more than a pipe holds) written at once
            lines = [";".join(f"set server big/s{index} weight {2 + index % 7}"
                              for index in range(first, first + 50)) + ";show info;set server big/nope weight 2"
                     for first in range(0, 3000, 50)]
            answers = held.exchange(lines, 60 * 52)
            assert len(answers) == 3120 and answers[50].startswith("Name: HAProxy")
            assert all(text == "" for number, text in enumerate(answers) if number % 52 < 50)
            assert all("No such server" in text for number, text in enumerate(answers) if number % 52 == 51)
            weights = {fields[3]: fields[7] for fields in (line.split() for line in
                                                           held.ask("show servers state big").splitlines()[2:])}
            assert all(weights[f"s{index}"] == str(2 + index % 7) for index in range(3000))
            # An answer given up on would come in as the next one's: the session is done.
            with pytest.raises(ServiceError, match="did not answer"):
                held.ask("show servers state", timeout=1e-6)
            with pytest.raises(ServiceError, match="failed before"):
                held.ask("show info")
            with pytest.raises(ServiceError, match="failed before"):
                held.exchange(["show info"], 1)
        finally:
            held.close()
    finally:
        stop_haproxy(config)


# -- Ledger ---------------------------------------------------------------------------


def snap(pid, http=None, tcp=None, started=1000):
    rows = []
    for frontend, count in (("http", http), ("tcp", tcp)):
        if count is not None:
            rows.append(StatRow(frontend, "FRONTEND", "OPEN", str(count)))
    return Snapshot(pid=pid, started=started, rows=tuple(rows))


def bytes_of(report):
    """The report's rows as METRICS sends them: lower case, as Libra's billing reads them."""
    return dict(report.bytes_out)


@pytest.fixture
def statsfile(tmp_path):
    return str(tmp_path / "lib" / "haproxy.stats")


@pytest.mark.no_haproxy
def test_report_counts_each_byte_once_within_a_generation(statsfile):
    ledger = Ledger(Statsfile(statsfile))
    assert bytes_of(ledger.report(snap(10, http=100, tcp=5))) == {"http": 100, "tcp": 5}
    assert bytes_of(ledger.report(snap(10, http=250, tcp=5))) == {"http": 150, "tcp": 0}
    assert bytes_of(ledger.report(snap(10, http=250, tcp=5))) == {"http": 0, "tcp": 0}
    assert bytes_of(ledger.report(None)) == {}


@pytest.mark.no_haproxy
def test_carry_folds_a_generation_in_before_a_reload(statsfile, caplog):
    ledger = Ledger(Statsfile(statsfile))
    ledger.report(snap(10, http=100))
    ledger.carry(snap(10, http=300))                    # 200 carried, reload next
    assert bytes_of(ledger.report(None)) == {"http": 200}   # HAProxy down: carried only
    ledger.carry(snap(10, http=350))                    # reload failed, old process still serves
    ledger.carry(snap(11, http=40))                     # the reload after that worked
    ledger.carry(None)                                  # SUSPEND found it gone
    report = ledger.report(snap(12, http=7))
    assert bytes_of(report) == {"http": 50 + 40 + 7}
    assert "behind" not in caplog.text, "restarts the worker did were taken for crashes"


@pytest.mark.no_haproxy
def test_restart_behind_the_workers_back_is_logged_and_counted_from_zero(statsfile, caplog):
    ledger = Ledger(Statsfile(statsfile))
    ledger.report(snap(10, http=1000))
    with caplog.at_level(logging.WARNING):
        report = ledger.report(snap(20, http=30, started=2000))
    assert bytes_of(report) == {"http": 30}
    assert "behind the worker's back" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ledger.carry(None)                              # found stopped, nobody told it
    assert "behind the worker's back" in caplog.text


@pytest.mark.no_haproxy
def test_counters_below_their_baseline_are_never_negative(statsfile):
    ledger = Ledger(Statsfile(statsfile))
    ledger.report(snap(10, http=5000, tcp=70))
    assert bytes_of(ledger.report(snap(10, http=120, tcp=0))) == {"http": 120, "tcp": 0}
    assert bytes_of(ledger.report(snap(10, http=200, tcp=3))) == {"http": 80, "tcp": 3}
    ledger.carry(snap(10, http=100))
    assert bytes_of(ledger.report(None)) == {"http": 100}


@pytest.mark.no_haproxy
def test_a_late_answer_from_a_replaced_process_is_not_counted_again(statsfile):
    ledger = Ledger(Statsfile(statsfile))
    ledger.carry(snap(10, http=500))
    assert bytes_of(ledger.report(snap(11, http=20))) == {"http": 520}
    assert bytes_of(ledger.report(snap(10, http=520))) == {}    # the old process, draining
    assert bytes_of(ledger.report(snap(11, http=25))) == {"http": 5}


@pytest.mark.no_haproxy
def test_a_carry_with_a_late_answer_is_not_taken_for_a_crash(statsfile, caplog):
    ledger = Ledger(Statsfile(statsfile))
    ledger.carry(snap(10, http=500))
    ledger.report(snap(11, http=20))
    with caplog.at_level(logging.INFO):
        ledger.carry(snap(10, http=600))                # the old process answered late
    assert "behind" not in caplog.text and "ignored" in caplog.text
    assert bytes_of(ledger.report(snap(12, http=4))) == {"http": 4}


@pytest.mark.no_haproxy
def test_a_reading_missing_a_frontend_does_not_reset_its_baseline(statsfile):
    ledger = Ledger(Statsfile(statsfile))
    ledger.report(snap(10, http=900, tcp=400))
    assert bytes_of(ledger.report(snap(10, http=950))) == {"http": 50}
    assert bytes_of(ledger.report(snap(10, http=950, tcp=410))) == {"http": 0, "tcp": 10}


@pytest.mark.no_haproxy
def test_the_ledger_survives_a_new_worker(statsfile):
    first = Ledger(Statsfile(statsfile))
    first.report(snap(10, http=100))
    first.carry(snap(10, http=160))
    window = first.state["window_start"]
    second = Ledger(Statsfile(statsfile))                          # the worker was killed and restarted
    report = second.report(snap(11, http=9))
    assert bytes_of(report) == {"http": 69}
    assert report.utc_start == window


@pytest.mark.no_haproxy
def test_windows_follow_each_other_even_when_the_clock_goes_back(statsfile):
    ledger = Ledger(Statsfile(statsfile))
    first = ledger.report(None)
    second = ledger.report(None)
    assert second.utc_start == first.utc_end and second.utc_end >= second.utc_start
    ledger.state["window_start"] = "2999-01-01 00:00:00.000000"      # clock set back since
    report = ledger.report(None)
    assert report.utc_end >= report.utc_start


@pytest.mark.no_haproxy
def test_reset_forgets_the_old_load_balancer(statsfile):
    shared = Statsfile(statsfile)
    ledger, lifecycle = Ledger(shared), Lifecycle(shared)
    ledger.carry(snap(10, http=100))
    lifecycle.set_lb_state("ACTIVE")
    ledger.reset()
    assert lifecycle.lb_state == "ACTIVE"
    assert Lifecycle(Statsfile(statsfile)).lb_state == "ACTIVE"     # on disk too
    assert bytes_of(ledger.report(None)) == {}


@pytest.mark.no_haproxy
def test_save_is_atomic_private_and_leaves_no_temp_file(statsfile):
    ledger = Ledger(Statsfile(statsfile))
    for count in range(1, 30):
        ledger.report(snap(10, http=count * 10))
    directory = os.path.dirname(statsfile)
    assert os.listdir(directory) == ["haproxy.stats"]
    assert stat.S_IMODE(os.stat(statsfile).st_mode) == 0o600
    assert valid_state(json.load(open(statsfile)))
    assert Ledger(Statsfile(statsfile)).state["baseline"] == {"HTTP": 290}


@pytest.mark.no_haproxy
def test_a_report_that_cannot_be_saved_fails_and_moves_nothing(statsfile, caplog):
    ledger = Ledger(Statsfile(statsfile))
    ledger.report(snap(10, http=0))
    os.unlink(statsfile)
    os.mkdir(statsfile)                                # the rename onto it fails from now on
    with caplog.at_level(logging.ERROR):
        ledger.carry(snap(10, http=5))                 # a reload: logged, counted in memory
    assert "cannot write statsfile" in caplog.text
    start = ledger.state["window_start"]
    for _ in range(2):
        with pytest.raises(CommandFailed, match="not moved"):
            ledger.report(snap(11, http=8))
        assert ledger.state["window_start"] == start and ledger.state["carried"] == {"HTTP": 5}
    os.rmdir(statsfile)                                # writable again
    report = ledger.report(snap(11, http=9))
    assert report.utc_start == start
    assert bytes_of(report) == {"http": 5 + 9}         # once, and only once
    assert bytes_of(ledger.report(snap(11, http=9))) == {"http": 0}
    assert [name for name in os.listdir(os.path.dirname(statsfile)) if name != "haproxy.stats"] == []


@pytest.mark.no_haproxy
def test_galera_is_billed_as_tcp_and_summed_with_it():
    assert billing_rows({"HTTP": 3, "TCP": 4, "GALERA": 5}) == [("http", 3), ("tcp", 9)]
    assert billing_rows({"GALERA": 7}) == [("tcp", 7)]
    assert billing_rows({}) == []


CORRUPT = [
    b"\x00\xff\xfe\x13 garbage",
    b"{\"version\": 1, \"lb_state\": \"ACT",
    b"[" * 100_000,
    json.dumps({"version": 1, "lb_state": "ACTIVE", "window_start": "yesterday",
                "carried": {}, "generation": None, "baseline": {}}).encode(),
    json.dumps({"version": 1, "lb_state": "ACTIVE", "window_start": "2024-01-01 00:00:00.000000",
                "carried": {"HTTP": -5}, "generation": None, "baseline": {}}).encode(),
    json.dumps({"version": 1, "lb_state": "ACTIVE", "window_start": "2024-01-01 00:00:00.000000",
                "carried": {"HTTP": True}, "generation": None, "baseline": {}}).encode(),
    json.dumps(["not", "a", "ledger"]).encode(),
]


@pytest.mark.parametrize("content", CORRUPT, ids=range(len(CORRUPT)))
@pytest.mark.no_haproxy
def test_a_corrupt_statsfile_is_moved_aside_and_counting_starts_afresh(statsfile, content, caplog):
    """Afresh from the next reading of the process already running; a new process counts whole."""
    os.makedirs(os.path.dirname(statsfile))
    with open(statsfile, "wb") as stream:
        stream.write(content)
    with caplog.at_level(logging.ERROR):
        shared = Statsfile(statsfile)
    ledger = Ledger(shared)
    asides = [name for name in os.listdir(os.path.dirname(statsfile)) if ".corrupt-" in name]
    assert len(asides) == 1 and asides[0].startswith("haproxy.stats.corrupt-")
    with open(os.path.join(os.path.dirname(statsfile), asides[0]), "rb") as stream:
        assert stream.read() == content
    assert statsfile in caplog.text and "moved to" in caplog.text
    assert Lifecycle(shared).lb_state == "NONE"
    # What the running HAProxy counted may have been reported already: never bill it twice.
    assert bytes_of(ledger.report(snap(10, http=11))) == {"http": 0}
    assert bytes_of(ledger.report(snap(10, http=20))) == {"http": 9}


@pytest.mark.no_haproxy
def test_two_corrupt_statsfiles_in_one_second_are_both_kept(statsfile):
    os.makedirs(os.path.dirname(statsfile))
    for content in (b"first garbage", b"second garbage"):
        with open(statsfile, "wb") as stream:
            stream.write(content)
        Ledger(Statsfile(statsfile))
    directory = os.path.dirname(statsfile)
    kept = sorted(open(os.path.join(directory, name), "rb").read()
                  for name in os.listdir(directory) if ".corrupt-" in name)
    assert kept == [b"first garbage", b"second garbage"]


@pytest.mark.no_haproxy
def test_a_ledger_written_before_retired_generations_still_loads(statsfile):
    """A statsfile from before `retired` existed is a valid ledger, not a corrupt one."""
    os.makedirs(os.path.dirname(statsfile))
    old = {"version": 1, "lb_state": "ACTIVE", "window_start": "2024-01-01 00:00:00.000000",
           "carried": {"HTTP": 12}, "generation": "10@1000", "baseline": {"HTTP": 100},
           "expect_new_generation": False}
    with open(statsfile, "w") as stream:
        json.dump(old, stream)
    ledger = Ledger(Statsfile(statsfile))
    assert os.listdir(os.path.dirname(statsfile)) == ["haproxy.stats"]
    assert bytes_of(ledger.report(snap(10, http=130))) == {"http": 42}


@pytest.mark.no_haproxy
def test_after_a_corrupt_statsfile_a_process_started_afresh_counts_whole(statsfile):
    os.makedirs(os.path.dirname(statsfile))
    with open(statsfile, "wb") as stream:
        stream.write(b"garbage")
    ledger = Ledger(Statsfile(statsfile))
    ledger.carry(None)                      # the worker starts HAProxy itself
    assert bytes_of(ledger.report(snap(10, http=11))) == {"http": 11}


@pytest.mark.no_haproxy
def test_a_statsfile_from_before_the_split_loads_in_both_parts(statsfile):
    """One file still holds the lifecycle state and the bytes; the old code's file loads whole."""
    os.makedirs(os.path.dirname(statsfile))
    old = {"version": 1, "lb_state": "SUSPENDED", "window_start": "2024-01-01 00:00:00.000000",
           "carried": {"HTTP": 12, "GALERA": 3}, "generation": "10@1000", "baseline": {"HTTP": 100},
           "expect_new_generation": True, "retired": ["9@900"], "draining": {"9@900": {"HTTP": 50}}}
    with open(statsfile, "w") as stream:
        json.dump(old, stream)
    shared = Statsfile(statsfile)
    ledger, lifecycle = Ledger(shared), Lifecycle(shared)
    assert os.listdir(os.path.dirname(statsfile)) == ["haproxy.stats"]
    assert lifecycle.lb_state == "SUSPENDED"
    assert ledger.draining() == {"9@900": {"HTTP": 50}}
    lifecycle.set_lb_state("ACTIVE")                    # a write of one part keeps the other
    assert json.load(open(statsfile)) == {**old, "lb_state": "ACTIVE"}
    report = ledger.report(snap(11, http=7))
    assert bytes_of(report) == {"http": 12 + 7, "tcp": 3} and report.utc_start == old["window_start"]
    written = json.load(open(statsfile))
    assert sorted(written) == sorted(old) and written["lb_state"] == "ACTIVE"
