"""A real HTTP/1.1 back-end for the load balancer, in its own process.

    python -m bench.backend PORT NAME

asyncio, keep-alive, Content-Length on every answer:
  GET|HEAD|OPTIONS /   → 200, body NAME (also HAProxy's health checks)
  GET /bytes/<n>       → 200, n bytes
anything else          → 404.
"""
import asyncio
import re
import sys

_BYTES = re.compile(rb"^/bytes/(\d{1,9})$")
MAX_HEADER = 16384


def response(status, body, head_only=False, close=False, name=b""):
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}[status]
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"X-Backend: %s\r\n%s\r\n" % (status, reason, len(body), name,
                                          b"Connection: close\r\n" if close else b""))
    return head if head_only else head + body


async def serve(name, reader, writer):
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.split(b"\r\n")
            parts = lines[0].split()
            if len(parts) != 3:
                writer.write(response(400, b"bad request\n", close=True, name=name))
                await writer.drain()
                return
            method, path, version = parts
            headers = {}
            for line in lines[1:]:
                key, sep, value = line.partition(b":")
                if sep:
                    headers[key.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0") or 0)
            if length:
                await reader.readexactly(length)
            close = (headers.get(b"connection", b"").lower() == b"close"
                     or version == b"HTTP/1.0")
            path = path.split(b"?", 1)[0]
            match = _BYTES.match(path)
            if path == b"/" or method == b"OPTIONS":
                body, status = name, 200
            elif match:
                body, status = b"x" * int(match.group(1)), 200
            else:
                body, status = b"not found\n", 404
            writer.write(response(status, body, method == b"HEAD", close, name))
            await writer.drain()
            if close:
                return
    finally:
        writer.close()


async def main(port, name):
    server = await asyncio.start_server(lambda r, w: serve(name, r, w), "127.0.0.1", port,
                                        backlog=1024, limit=MAX_HEADER)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2].encode()))
