"""The configuration contract: INI file + command line → one typed Settings.

Loaded once in main() and passed to constructors; nothing else reads the
INI file or argv.  Every bad value raises ConfigError naming the option.
"""
import argparse
import configparser
import os
import socket
from dataclasses import dataclass, field
from typing import Optional, Tuple

from libra_worker import __version__
from libra_worker.errors import ConfigError
from libra_worker.models import CONFIG_WORD
from libra_worker.wire import tls as wire_tls

DEFAULT_CONFIG = "/etc/libra/libra.cfg"
DEFAULT_GEARMAN_PORT = 4730
SERVICE_MODES = ("system", "process")
DRIVERS = ("haproxy",)

HostPort = Tuple[str, int]


@dataclass(frozen=True)
class GearmanSettings:
    servers: Tuple[HostPort, ...] = (("127.0.0.1", DEFAULT_GEARMAN_PORT),)
    reconnect_sleep: float = 60.0
    keepalive: bool = False
    keepidle: int = 7200
    keepintvl: int = 75
    keepcnt: int = 9
    timeout: float = 10.0
    probe_interval: float = 30.0
    ssl_key: Optional[str] = None
    ssl_cert: Optional[str] = None
    ssl_ca: Optional[str] = None


@dataclass(frozen=True)
class HaproxySettings:
    # process: no sudo, the worker runs HAProxy itself in its own directories.
    service: str = "process"
    haproxy: str = "/usr/sbin/haproxy"
    socat: str = "/usr/bin/socat"
    config: str = "/var/lib/libra/haproxy/haproxy.cfg"  # the worker's, never the haproxy package's
    pidfile: str = "/run/libra/haproxy.pid"
    stats_socket: str = "/run/libra/haproxy-stats.sock"
    master_socket: str = "/run/libra/haproxy-master.sock"
    statsfile: str = "/var/lib/libra/haproxy.stats"
    logfile: str = "/var/log/libra/haproxy.log"
    log_target: str = "/run/libra/haproxy-log.sock"
    bind_address: str = "0.0.0.0"
    sudo: bool = False
    job_timeout: float = 60.0
    # service = system only: HAProxy starts as root and drops to these, in the chroot.
    user: str = "haproxy"
    group: str = "haproxy"
    chroot: str = "/var/lib/haproxy"


@dataclass(frozen=True)
class Settings:
    gearman: GearmanSettings = field(default_factory=GearmanSettings)
    haproxy: HaproxySettings = field(default_factory=HaproxySettings)
    name: str = field(default_factory=socket.gethostname)
    driver: str = "haproxy"
    pid: str = "/var/run/libra/libra_worker.pid"
    logfile: Optional[str] = "/var/log/libra/libra_worker.log"
    user: Optional[str] = "haproxy"
    group: Optional[str] = "haproxy"
    network_check: Optional[HostPort] = None
    config_path: Optional[str] = None
    nodaemon: bool = False
    debug: bool = False
    verbose: bool = False
    syslog: bool = False
    check: bool = False


def parse_host_port(option, text, default_port=None):
    """'host:port', '[v6]:port' or (with a default port) 'host' → (host, port)."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if text.startswith("[") and "]" in text:
        host, _, rest = text[1:].partition("]")
        sep, port_text = (":", rest[1:]) if rest.startswith(":") else ("", "")
    elif not sep or ":" in host:
        host, port_text = text, ""
    if not host:
        raise ConfigError(option, text, "expected HOST:PORT")
    if not port_text:
        if default_port is None:
            raise ConfigError(option, text, "expected HOST:PORT")
        return host, default_port
    return host, parse_int(option, port_text, 1, 65535)


def parse_int(option, text, low, high):
    try:
        number = int(str(text).strip())
    except ValueError:
        raise ConfigError(option, text, "not a whole number") from None
    if not low <= number <= high:
        raise ConfigError(option, text, f"must be between {low} and {high}")
    return number


def parse_float(option, text, low, high):
    try:
        number = float(str(text).strip())
    except ValueError:
        raise ConfigError(option, text, "not a number") from None
    if not low <= number <= high:
        raise ConfigError(option, text, f"must be between {low} and {high}")
    return number


def parse_bool(option, text):
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(option, text, "expected true or false")


def parse_servers(option, text_or_list):
    items = text_or_list if isinstance(text_or_list, list) else [text_or_list]
    servers = []
    for item in items:
        for word in item.replace(",", " ").split():
            servers.append(parse_host_port(option, word, DEFAULT_GEARMAN_PORT))
    if not servers:
        raise ConfigError(option, text_or_list, "at least one job server is needed")
    for index, server in enumerate(servers):
        if server in servers[:index]:
            raise ConfigError(option, text_or_list, f"job server {server[0]}:{server[1]} given twice")
    return tuple(servers)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="libra_worker",
        description="Gearman worker that applies LBaaS jobs to the local HAProxy.",
        epilog="INI-only options are described, with their defaults, in etc/sample_libra.cfg; "
               "[gearman]: reconnect_sleep, timeout (seconds a job server has to answer, finish a "
               "packet or take a reply), probe_interval (idle seconds before an ECHO_REQ probe), "
               "keepalive, ssl_key/ssl_cert/ssl_ca.")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help=f"INI configuration file (default: {DEFAULT_CONFIG} if it exists)")
    parser.add_argument("-n", "--nodaemon", action="store_true",
                        help="stay in the foreground, as the user who started it")
    parser.add_argument("-d", "--debug", action="store_true",
                        help="log at DEBUG: every request and reply (secrets masked)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also log to stderr (always on with --nodaemon)")
    parser.add_argument("-l", "--logfile", metavar="FILE",
                        help="log file ([worker] logfile); '-' logs to stderr only")
    parser.add_argument("-p", "--pid", metavar="FILE", help="pid file in daemon mode ([worker] pid)")
    parser.add_argument("--user", help="user to run as in daemon mode ([worker] user)")
    parser.add_argument("--group", help="group to run as in daemon mode ([worker] group)")
    parser.add_argument("-s", "--server", action="append", metavar="HOST:PORT",
                        help="Gearman job server; repeat for several ([gearman] servers)")
    parser.add_argument("--name", help="Gearman function to register ([worker] name; default: hostname)")
    parser.add_argument("--driver", help=f"load balancer driver ([worker] driver): {', '.join(DRIVERS)}")
    parser.add_argument("--syslog", action="store_true", help="also log to syslog (/dev/log)")
    parser.add_argument("--check", action="store_true",
                        help="check the device (paths, commands, job servers), print one line per check, exit")
    parser.add_argument("--version", action="version", version=f"libra_worker {__version__}")
    return parser


def read_ini(path, explicit):
    ini = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    if not path:
        return ini
    if not os.path.exists(path):
        if explicit:
            raise ConfigError("--config", path, "file not found")
        return ini
    try:
        with open(path, encoding="utf-8") as stream:
            ini.read_file(stream)
    except (OSError, UnicodeDecodeError, configparser.Error) as error:
        raise ConfigError("--config", path, f"cannot read: {error}".replace("\n", " ")) from None
    return ini


def _section(ini, name):
    return dict(ini.items(name)) if ini.has_section(name) else {}


def _gearman(ini, args):
    raw = _section(ini, "gearman")
    servers = (parse_servers("--server", args.server) if args.server
               else parse_servers("[gearman] servers", raw["servers"]) if "servers" in raw
               else GearmanSettings.servers)
    tls = {key: raw.get(key) or None for key in ("ssl_key", "ssl_cert", "ssl_ca")}
    given = [key for key, value in tls.items() if value]
    if given and len(given) != 3:
        missing = sorted(set(tls) - set(given))
        raise ConfigError(f"[gearman] {missing[0]}", "", "TLS needs ssl_key, ssl_cert and ssl_ca together")
    for key in given:
        if not os.path.isfile(tls[key]):
            raise ConfigError(f"[gearman] {key}", tls[key], "file not found")
    if given:
        try:  # every file read and the key matched to its certificate now, not at the first connect
            wire_tls.client_context(tls["ssl_key"], tls["ssl_cert"], tls["ssl_ca"])
        except wire_tls.TlsMaterialError as error:
            raise ConfigError(error.option, error.path, error.why) from None
    return GearmanSettings(
        servers=servers,
        reconnect_sleep=parse_float("[gearman] reconnect_sleep", raw.get("reconnect_sleep", 60), 0.1, 86400),
        keepalive=parse_bool("[gearman] keepalive", raw.get("keepalive", "false")),
        keepidle=parse_int("[gearman] keepidle", raw.get("keepidle", 7200), 1, 86400),
        keepintvl=parse_int("[gearman] keepintvl", raw.get("keepintvl", 75), 1, 86400),
        keepcnt=parse_int("[gearman] keepcnt", raw.get("keepcnt", 9), 1, 1000),
        timeout=parse_float("[gearman] timeout", raw.get("timeout", 10), 0.5, 3600),
        probe_interval=parse_float("[gearman] probe_interval", raw.get("probe_interval", 30), 1, 86400),
        **tls)


def _haproxy(ini):
    raw = _section(ini, "worker:haproxy")
    defaults = HaproxySettings()
    service = raw.get("service", defaults.service).strip().lower()
    if service not in SERVICE_MODES:
        raise ConfigError("[worker:haproxy] service", service, "must be 'system' or 'process'")
    paths = {}
    for key in ("haproxy", "socat", "config", "pidfile", "stats_socket", "master_socket",
                "statsfile", "logfile", "log_target", "user", "group", "chroot"):
        value = raw.get(key, getattr(defaults, key)).strip()
        if not value:
            raise ConfigError(f"[worker:haproxy] {key}", value, "must not be empty")
        paths[key] = value
    for key, value in paths.items():
        if not CONFIG_WORD.fullmatch(value):
            # These go into the HAProxy config or onto command lines as one word.
            raise ConfigError(f"[worker:haproxy] {key}", value,
                              "must be one word without spaces, '#', quotes, '\\' or braces")
    for key in ("config", "pidfile", "stats_socket", "master_socket", "statsfile", "logfile", "chroot"):
        if not os.path.isabs(paths[key]):
            raise ConfigError(f"[worker:haproxy] {key}", paths[key], "must be an absolute path")
    bind_address = raw.get("bind_address", defaults.bind_address).strip()
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in bind_address else socket.AF_INET, bind_address)
    except OSError:
        raise ConfigError("[worker:haproxy] bind_address", bind_address, "not an IP address") from None
    return HaproxySettings(
        service=service, bind_address=bind_address,
        sudo=parse_bool("[worker:haproxy] sudo", raw.get("sudo", "false")),
        job_timeout=parse_float("[worker:haproxy] job_timeout", raw.get("job_timeout", 60), 1, 3600),
        **paths)


def load(argv=None):
    """argv (without the program name) → Settings; raises ConfigError."""
    args = build_parser().parse_args(argv)
    ini = read_ini(args.config or DEFAULT_CONFIG, explicit=bool(args.config))
    worker = _section(ini, "worker")
    defaults = Settings(name="unused")

    driver = (args.driver or worker.get("driver", defaults.driver)).strip().lower()
    if driver not in DRIVERS:
        raise ConfigError("--driver", driver, f"unknown driver; choose from {', '.join(DRIVERS)}")
    name = (args.name or worker.get("name", "")).strip() or socket.gethostname()
    if any(ch.isspace() for ch in name):
        raise ConfigError("--name", name, "a Gearman function name has no spaces")
    logfile = args.logfile or worker.get("logfile", defaults.logfile)
    network_check = worker.get("network_check", "").strip()

    return Settings(
        gearman=_gearman(ini, args),
        haproxy=_haproxy(ini),
        name=name,
        driver=driver,
        pid=os.path.abspath(args.pid or worker.get("pid", defaults.pid)),
        logfile=None if logfile.strip() in ("", "-") else os.path.abspath(logfile.strip()),
        user=(args.user or worker.get("user", defaults.user)).strip() or None,
        group=(args.group or worker.get("group", defaults.group)).strip() or None,
        network_check=parse_host_port("[worker] network_check", network_check) if network_check else None,
        config_path=os.path.abspath(args.config) if args.config else None,
        nodaemon=args.nodaemon,
        debug=args.debug,
        verbose=args.verbose,
        syslog=args.syslog,
        check=args.check)
