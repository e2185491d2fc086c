"""The wire's pure parts: packet reader, argument splitting, backoff, TLS material (issue 14)."""
import random

import pytest

from libra_worker.wire import packets, tls
from libra_worker.wire.backoff import Backoff
from libra_worker.wire.packets import ProtocolError, Reader, encode

# scripts/test runs these once, where HAProxy cannot run (scripts/without-haproxy).
pytestmark = pytest.mark.no_haproxy


def res(kind, *arguments):
    return encode(kind, *arguments, magic=packets.RES)


# --- the reader ---------------------------------------------------------------

def test_packets_split_at_every_byte_come_out_whole_and_in_order():
    stream = (res(packets.NOOP) + res(packets.JOB_ASSIGN_UNIQ, b"H:1", b"fn", b"u", b"pay\0load")
              + res(packets.NO_JOB))
    for cut in range(len(stream) + 1):
        reader = Reader(cap=1024)
        found = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert [kind for kind, _ in found] == [packets.NOOP, packets.JOB_ASSIGN_UNIQ, packets.NO_JOB]
        assert packets.split(*found[1]) == (b"H:1", b"fn", b"u", b"pay\0load"), "NULs stay in the payload"
        assert not reader.partial


def test_partial_tells_a_half_received_packet():
    reader = Reader(cap=1024)
    whole = res(packets.JOB_ASSIGN_UNIQ, b"H:1", b"fn", b"u", b"x" * 100)
    assert reader.feed(whole[:50]) == []
    assert reader.partial and reader.buffered == 50
    assert len(reader.feed(whole[50:])) == 1 and not reader.partial


@pytest.mark.parametrize("size", [packets.WORKER_PACKET_CAP + 1, 2 * 1024 ** 3, 0xFFFFFFFF])
def test_a_header_declaring_too_much_is_refused_before_any_body(size):
    reader = Reader(cap=packets.WORKER_PACKET_CAP)
    with pytest.raises(ProtocolError, match=f"declares {size} bytes"):
        reader.feed(packets.HEADER.pack(packets.RES, packets.JOB_ASSIGN_UNIQ, size))


def test_the_cap_leaves_room_for_a_full_payload_and_its_envelope():
    payload = b"x" * packets.MAX_PAYLOAD
    found = Reader(cap=packets.WORKER_PACKET_CAP).feed(
        res(packets.JOB_ASSIGN_UNIQ, b"H:host:123456", b"f" * 255, b"u" * 64, payload))
    assert packets.split(*found[0])[3] == payload


@pytest.mark.parametrize("data, why", [
    (b"GET / HTTP/1.1\r\n", "magic"),
    (packets.REQ + b"\0\0\0\x06\0\0\0\0", "magic"),               # a request, not a response
    (packets.HEADER.pack(packets.RES, 999, 0), "unknown packet type 999"),
])
def test_bytes_that_are_not_responses_are_a_protocol_error(data, why):
    with pytest.raises(ProtocolError, match=why):
        Reader(cap=1024).feed(data)


@pytest.mark.parametrize("kind, body, why", [
    (packets.JOB_ASSIGN_UNIQ, b"H:1\0fn", "2 of its 4 fields"),
    (packets.JOB_ASSIGN, b"H:1", "1 of its 3 fields"),
    (packets.NOOP, b"junk", "4-byte body"),
    (20, b"", "unexpected"),   # STATUS_RES: a client's answer, never a worker's
])
def test_missing_fields_and_bodies_that_should_not_be_there(kind, body, why):
    with pytest.raises(ProtocolError, match=why):
        packets.split(kind, body)


def test_a_flood_of_small_packets_keeps_the_buffer_small():
    reader = Reader(cap=1024)
    stream = res(packets.NOOP) * 200_000
    count = 0
    for start in range(0, len(stream), 65537):   # reads that cut packets anywhere
        count += len(reader.feed(stream[start:start + 65537]))
        assert reader.buffered < 12, "the buffer grows with the flood"
    assert count == 200_000


# --- backoff --------------------------------------------------------------------

def test_backoff_grows_to_the_cap_with_jitter():
    backoff = Backoff(cap=60, rand=random.Random(1).random)
    delays = [backoff.next_delay(now=float(i)) for i in range(12)]
    ceilings = [min(60, 1.0 * 2 ** i) for i in range(12)]
    for delay, ceiling in zip(delays, ceilings):
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 60


def test_jitter_spreads_a_fleet():
    delays = {round(Backoff(cap=60, rand=random.Random(seed).random).next_delay(0.0), 3) for seed in range(50)}
    assert len(delays) > 40, "fifty workers would come back in the same instant"


def test_backoff_resets_only_after_a_healthy_stretch():
    backoff = Backoff(cap=60, rand=lambda: 1.0)
    for now in range(5):
        backoff.next_delay(float(now))
    backoff.connected(10.0)                      # a connect that answered ...
    assert backoff.next_delay(20.0) == 32.0      # ... and died 10 s later: still climbing
    backoff.connected(100.0)
    assert not backoff.tick(120.0)
    assert backoff.tick(130.0) and backoff.healthy
    assert backoff.next_delay(500.0) == 1.0


# --- TLS material -----------------------------------------------------------------

@pytest.fixture(scope="module")
def material(tmp_path_factory):
    from support.tls import make_ca, make_cert
    where = tmp_path_factory.mktemp("tls")
    ca = make_ca(where, "ca")
    client = make_cert(where, ca, "client", "libra-worker")
    other = make_cert(where, ca, "other", "someone-else")
    return where, ca, client, other


def test_good_material_makes_a_verifying_context(material):
    _, ca, client, _ = material
    context = tls.client_context(client.key, client.cert, ca.cert)
    assert context.check_hostname and context.verify_mode.name == "CERT_REQUIRED"


def test_a_key_that_does_not_match_names_ssl_key(material):
    _, ca, client, other = material
    with pytest.raises(tls.TlsMaterialError) as error:
        tls.client_context(other.key, client.cert, ca.cert)
    assert error.value.option == "[gearman] ssl_key" and "does not match" in str(error.value)


def test_a_certificate_that_is_not_one_names_ssl_cert(material):
    _, ca, client, _ = material
    with pytest.raises(tls.TlsMaterialError) as error:
        tls.client_context(client.key, client.key, ca.cert)
    assert error.value.option == "[gearman] ssl_cert"


def test_a_ca_that_is_not_one_names_ssl_ca(material, tmp_path):
    _, _, client, _ = material
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    with pytest.raises(tls.TlsMaterialError) as error:
        tls.client_context(client.key, client.cert, str(bogus))
    assert error.value.option == "[gearman] ssl_ca"


# --- settings of the wire ------------------------------------------------------------

def test_a_job_server_given_twice_is_a_config_error():
    from libra_worker.errors import ConfigError
    from libra_worker.settings import load
    with pytest.raises(ConfigError, match="given twice"):
        load(["--config", "/dev/null", "-s", "127.0.0.1:4730", "-s", "127.0.0.1:4730"])


def test_timeout_and_probe_interval_are_read_and_checked(tmp_path):
    from libra_worker.errors import ConfigError
    from libra_worker.settings import load
    config = tmp_path / "worker.ini"
    config.write_text("[gearman]\ntimeout = 4\nprobe_interval = 12\n")
    gearman = load(["--config", str(config)]).gearman
    assert (gearman.timeout, gearman.probe_interval) == (4.0, 12.0)
    config.write_text("[gearman]\ntimeout = 0\n")
    with pytest.raises(ConfigError, match=r"\[gearman\] timeout"):
        load(["--config", str(config)])


def test_a_job_a_little_too_large_is_read_past_and_handed_over_as_oversized():
    reader = Reader(cap=packets.WORKER_PACKET_CAP, discard_limit=packets.WORKER_DISCARD_LIMIT,
                    discard_kinds=(packets.JOB_ASSIGN_UNIQ,))
    payload = b"x" * (10 * 1024 * 1024)
    stream = res(packets.JOB_ASSIGN_UNIQ, b"H:1", b"fn", b"u", payload) + res(packets.NOOP)
    found = []
    for start in range(0, len(stream), 262144):
        found += reader.feed(stream[start:start + 262144])
        assert reader.buffered <= 262144 + packets.ENVELOPE + 12, "the big body was kept"
    assert [kind for kind, _ in found] == [packets.JOB_ASSIGN_UNIQ, packets.NOOP]
    body = found[0][1]
    assert isinstance(body, packets.Truncated) and body.declared == len(payload) + len(b"H:1fnu") + 3
    from libra_worker.wire.worker import _oversized
    handle, function, unique, stand_in = _oversized(packets.JOB_ASSIGN_UNIQ, packets.split(*found[0]), body)
    assert (handle, function, unique) == (b"H:1", b"fn", b"u") and len(stand_in) == len(payload)
    assert bytes(stand_in) == b""


def test_beyond_the_discard_limit_the_header_alone_is_refused():
    reader = Reader(cap=packets.WORKER_PACKET_CAP, discard_limit=packets.WORKER_DISCARD_LIMIT,
                    discard_kinds=(packets.JOB_ASSIGN_UNIQ,))
    with pytest.raises(ProtocolError, match="declares"):
        reader.feed(packets.HEADER.pack(packets.RES, packets.JOB_ASSIGN_UNIQ, packets.WORKER_DISCARD_LIMIT + 1))
