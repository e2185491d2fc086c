"""Send one job to a libra_worker and print its reply (bin/client.py).

    client.py [-s HOST:PORT]... [--name NAME] [--timeout SECONDS]
              [ACTION | --file FILE | --json TEXT]

ACTION alone sends {"hpcs_action": ACTION}; nothing at all sends a sample
UPDATE.  Exit status: 0 PASS, 1 FAIL, 2 usage error, time-out or no job server.
"""
import argparse
import json
import socket
import sys

from libra_worker.errors import ConfigError
from libra_worker.settings import parse_host_port
from libra_worker.wire import client as wire_client

SAMPLE_UPDATE = {
    "hpcs_action": "UPDATE",
    "loadBalancers": [{
        "name": "sample-lb",
        "protocol": "HTTP",
        "port": "8080",
        "nodes": [
            {"id": "101", "address": "127.0.0.1", "port": "8081", "weight": "1"},
            {"id": "102", "address": "127.0.0.1", "port": "8082", "weight": "1"},
        ],
    }],
}


class Usage(Exception):
    """Exit 2 with one line on stderr."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Send one job to a libra_worker and print the reply.")
    parser.add_argument("-s", "--server", action="append", metavar="HOST:PORT",
                        help="Gearman job server (repeatable; default 127.0.0.1:4730)")
    parser.add_argument("--name", default=socket.gethostname(),
                        help="worker function name (default: this hostname)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="give up after this long (default 30)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("action", nargs="?", help="send {\"hpcs_action\": ACTION}")
    what.add_argument("--file", help="send the JSON in FILE")
    what.add_argument("--json", help="send this JSON text")
    return parser.parse_args(argv)


def build_payload(args):
    if args.action:
        return json.dumps({"hpcs_action": args.action}).encode()
    if args.file:
        try:
            with open(args.file, "rb") as stream:
                return stream.read()
        except OSError as error:
            raise Usage(f"--file: cannot read {args.file}: {error.strerror}") from None
    if args.json is not None:
        return args.json.encode("utf-8")
    return json.dumps(SAMPLE_UPDATE).encode()


def submit(servers, name, payload, timeout, tls_context=None):
    """Send the job and wait for WORK_COMPLETE; returns the reply bytes."""
    try:
        outcome = wire_client.submit(servers, name, payload, timeout=timeout, tls_context=tls_context)
    except wire_client.ClientError as error:
        raise Usage(str(error)) from None
    if outcome.status != "complete":
        detail = f": {outcome.data[:200]!r}" if outcome.data else ""
        raise Usage(f"the job failed without a reply (worker {name!r}, WORK_{outcome.status.upper()}{detail})")
    return outcome.data


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        servers = [parse_host_port("--server", text, 4730) for text in (args.server or ["127.0.0.1:4730"])]
        payload = build_payload(args)
        raw_reply = submit(servers, args.name, payload, args.timeout)
    except (Usage, ConfigError) as error:
        print(f"client.py: {error}", file=sys.stderr)
        return 2
    try:
        reply = json.loads(raw_reply)
    except ValueError:
        print(f"client.py: the reply is not JSON: {raw_reply[:200]!r}", file=sys.stderr)
        return 2
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if isinstance(reply, dict) and reply.get("hpcs_response") == "PASS" else 1

