"""Test certificates (openssl CLI) and a real TLS front for gearmand (socat OPENSSL-LISTEN).

Debian's gearmand does not really speak TLS, so the tests put
`socat OPENSSL-LISTEN` in front of it: it verifies the worker's client
certificate against the CA and forwards plain Gearman to gearmand.
"""
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .ports import LOOPBACK, free_port, wait_port

OPENSSL = "/usr/bin/openssl"
SOCAT = "/usr/bin/socat"
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pair:
    key: str
    cert: str


def _run(*args, cwd):
    result = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {result.stderr.strip()}")


def make_ca(directory, name):
    directory = Path(directory)
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _run("req", "-x509", *EC, "-keyout", str(key), "-out", str(cert), "-days", "3",
         "-subj", f"/CN={name}", cwd=directory)
    return Pair(str(key), str(cert))


def make_cert(directory, ca, name, common_name, san=None):
    """A key and a certificate signed by `ca`; `san` like "IP:127.0.0.1" or "DNS:gearman.example"."""
    directory = Path(directory)
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
    _run("req", *EC, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}", cwd=directory)
    extfile = directory / f"{name}.ext"
    extfile.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _run("x509", "-req", "-in", str(csr), "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
         "-out", str(cert), "-days", "3", "-extfile", str(extfile), cwd=directory)
    return Pair(str(key), str(cert))


class TlsFront:
    """socat OPENSSL-LISTEN on 127.0.0.1:<free port> → gearmand, client certificates required."""

    def __init__(self, directory, target, server, ca):
        self.directory = Path(directory)
        self.target, self.server, self.ca = target, server, ca
        self.port = free_port()
        self.proc = None
        self.log = self.directory / f"socat-{self.port}.log"

    @property
    def address(self):
        return f"{LOOPBACK}:{self.port}"

    def start(self):
        listen = (f"OPENSSL-LISTEN:{self.port},bind={LOOPBACK},reuseaddr,fork,cert={self.server.cert},"
                  f"key={self.server.key},cafile={self.ca.cert},verify=1")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([SOCAT, "-d", listen, f"TCP:{self.target}"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_port(LOOPBACK, self.port, 10)
        time.sleep(0.1)
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
