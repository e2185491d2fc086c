"""`Device`: one libra_worker (service = process, sudo = true, every HAProxy
path in its directory), the HAProxy it runs, a client, and a gearmand — its
own, or a shared one given to it.

The driver, STATS and METRICS tests all use it.  A device on a shared
gearmand is laid out but not started, so a test can plant files (a corrupt
statsfile) before the first start.  A later worker on the same directory,
config, name and statsfile replaces one that was stopped or killed.
`stop()` stops every worker it started, the HAProxy they left running and
its own gearmand.
"""
from pathlib import Path

from .client import GearClient
from .gearmand import Gearmand
from .metrics_helpers import Metrics, info
from .traffic import haproxy_masters, haproxy_processes, kill_haproxy, stop_haproxy
from .worker import WorkerProcess, sudo_ini


class Device:
    def __init__(self, tmpdir, name=None, gearmand=None, client=None):
        self.dir = Path(tmpdir)
        self.worker_dir = self.dir / "w"
        self.gearmand = gearmand
        self.client = client
        self._owns = {"gearmand": gearmand is None, "client": client is None}
        self.worker = None
        self.workers = []
        self.name = name
        self.extra_ini = sudo_ini()
        self.haproxy_dir.mkdir(parents=True, exist_ok=True)

    # paths the worker config names (support.worker.write_config)
    @property
    def haproxy_dir(self):
        return self.worker_dir / "haproxy"

    @property
    def config(self):
        return self.haproxy_dir / "haproxy.cfg"

    @property
    def backup(self):
        return Path(str(self.config) + ".BKUP")

    @property
    def pidfile(self):
        return self.haproxy_dir / "haproxy.pid"

    @property
    def master_socket(self):
        return self.haproxy_dir / "master.sock"

    @property
    def stats_socket(self):
        return self.haproxy_dir / "stats.sock"

    @property
    def statsfile(self):
        return self.haproxy_dir / "haproxy.stats"

    @property
    def logfile(self):
        """HAProxy's log (the worker's own log is `worker.logfile`)."""
        return self.haproxy_dir / "haproxy.log"

    # -- processes ----------------------------------------------------------
    def start(self):
        if self.gearmand is None:
            self.gearmand = Gearmand(self.dir / "g").start()
        self.start_worker()
        if self.client is None:
            self.client = GearClient([self.gearmand.address])
        return self

    def start_worker(self):
        """Start a worker (the first, or one replacing a dead one); returns once it answered DISCOVER."""
        self.worker = WorkerProcess(self.worker_dir, [self.gearmand], name=self.name,
                                    extra_ini=self.extra_ini)
        self.name = self.worker.name
        self.workers.append(self.worker)
        self.worker.start()
        self.worker.wait_registered()
        return self.worker

    def restart_worker(self):
        """SIGTERM the worker and start a new one on the same directory and name."""
        self.worker.stop()
        return self.start_worker()

    def restart_after_kill(self):
        """SIGKILL the worker, then start a new one on the same directory and name."""
        self.worker.kill()
        self.start_worker()
        return self

    def stop(self):
        if self.client is not None and self._owns["client"]:
            self.client.close()
        for process in self.workers:
            process.stop()
        stop_haproxy(self.config)
        if self.gearmand is not None and self._owns["gearmand"]:
            self.gearmand.stop()

    def __enter__(self):
        try:
            return self.start()
        except BaseException:  # a half-started device still stops what did start
            self.stop()
            raise

    def __exit__(self, *exc_info):
        self.stop()

    # -- jobs ---------------------------------------------------------------
    def submit(self, message, timeout=30.0):
        return self.client.submit(self.name, message, timeout=timeout, alive=self.worker.alive)

    def must_pass(self, message, timeout=30.0):
        reply = self.submit(message, timeout)
        assert reply.get("hpcs_response") == "PASS", (
            f"{message.get('hpcs_action')} did not PASS: {reply}; {self.worker.diagnosis()}")
        return reply

    def must_fail(self, message, timeout=30.0):
        reply = self.submit(message, timeout)
        assert reply.get("hpcs_response") == "FAIL", f"{message.get('hpcs_action')} did not FAIL: {reply}"
        error = reply.get("hpcs_error")
        assert isinstance(error, str) and error.strip() and "\n" not in error, reply
        return reply

    def node_statuses(self):
        """STATS (must PASS) → {node id: 'UP'|'DOWN'}, each id reported once."""
        reply = self.must_pass({"hpcs_action": "STATS"})
        nodes = reply.get("nodes")
        assert isinstance(nodes, list), reply
        statuses = {}
        for entry in nodes:
            assert set(entry) == {"id", "status"}, entry
            assert entry["status"] in ("UP", "DOWN"), entry
            assert entry["id"] not in statuses, f"node {entry['id']!r} reported twice: {nodes}"
            statuses[entry["id"]] = entry["status"]
        return statuses

    def metrics(self):
        """METRICS (must PASS) → Metrics."""
        return Metrics(self.must_pass({"hpcs_action": "METRICS"}))

    # -- HAProxy ------------------------------------------------------------
    def config_bytes(self):
        return self.config.read_bytes()

    def masters(self):
        return haproxy_masters(self.config)

    def haproxy_pids(self):
        return sorted(haproxy_processes(self.config))

    def serving_pid(self):
        """The pid of the HAProxy process answering the stats socket."""
        return int(info(self.stats_socket)["Pid"])

    def kill_haproxy(self, timeout=10.0):
        """SIGKILL every HAProxy process of this device (master and workers)."""
        return kill_haproxy(self.config, timeout)

    def log_text(self):
        """Every worker's log (they share one file) as text."""
        logfile = self.worker.logfile if self.worker is not None else None
        return logfile.read_text(errors="replace") if logfile is not None and logfile.exists() else ""
