"""One of several concurrent Gearman clients, each in its own process.

    python -m bench.gearload ADDRESS FUNCTION PAYLOADS_JSON (--seconds S | --jobs N)

PAYLOADS_JSON is a JSON list of messages sent in turn, one job at a time.
The client connects, prints "ready", waits for a line on stdin (so that all
clients start together), then sends jobs back to back for S seconds or N
jobs, and prints {"jobs": completed, "failed": FAIL replies, "seconds": elapsed}.
"""
import argparse
import json
import sys
import time

from bench.gearclient import Client


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("function")
    parser.add_argument("payloads")
    limit = parser.add_mutually_exclusive_group(required=True)
    limit.add_argument("--seconds", type=float)
    limit.add_argument("--jobs", type=int)
    args = parser.parse_args(argv)
    payloads = [json.dumps(message).encode() for message in json.loads(args.payloads)]
    client = Client(args.address, client_id="bench-load")
    try:
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.monotonic()
        end = started + args.seconds if args.seconds else None
        done = failed = 0
        while (done < args.jobs) if args.jobs else (time.monotonic() < end):
            _, reply = client.call(args.function, payloads[done % len(payloads)], timeout=60)
            if b'"hpcs_response": "FAIL"' in reply:
                failed += 1
            done += 1
        elapsed = time.monotonic() - started
    finally:
        client.close()
    print(json.dumps({"jobs": done, "failed": failed, "seconds": elapsed}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
