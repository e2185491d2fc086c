"""The HAProxy driver: each protocol action as a sequence of device steps.

Every step that can fail raises a JobError; update() undoes what it did
before re-raising, so a FAIL leaves HAProxy serving what it served before.
"""
import functools
import logging
import os
import threading

from libra_worker import safe_files
from libra_worker.drivers.haproxy import archive, logsink, plan, render, server_state
from libra_worker.drivers.haproxy.apply import Executor
from libra_worker.drivers.haproxy.drain import DrainFollower
from libra_worker.drivers.haproxy.commands import SERVICE, Commands
from libra_worker.drivers.haproxy.config_files import ConfigStore
from libra_worker.drivers.haproxy.ledger import Ledger
from libra_worker.drivers.haproxy.lifecycle import Lifecycle
from libra_worker.drivers.haproxy.stats_socket import SERVERS_QUERY, StatsSocket
from libra_worker.drivers.haproxy.statsfile import Statsfile
from libra_worker.drivers.haproxy.service import make_service
from libra_worker.errors import CommandFailed, Deleted, JobError, ServiceError

LOG = logging.getLogger(__name__)
SERVICE_ACTIONS = ("start", "stop", "reload")


def privileged_argvs(settings):
    """Every argv the worker runs as root, exactly (the sudoers rules, --check).

    process mode: none.  system mode: `service haproxy start|stop|reload`.
    """
    if settings.service != "system":
        return []
    return [[SERVICE, "haproxy", action] for action in SERVICE_ACTIONS]


def privileged_commands(settings):
    """Absolute paths of the commands in privileged_argvs()."""
    return sorted({argv[0] for argv in privileged_argvs(settings)})


def exclusive(action):
    """Actions hold `busy`, so the drain follower never reads HAProxy mid-change."""
    @functools.wraps(action)
    def locked(self, *args):
        with self.busy:
            return action(self, *args)
    return locked


def _identity(path):
    """Which file `path` is now (an upgrade replaces it), or None."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size


class HAProxyDriver:
    def __init__(self, settings):
        self.settings = settings
        self.commands = Commands(settings.sudo, timeout=settings.job_timeout)
        self.stats_socket = StatsSocket(settings.socat, settings.stats_socket, self.commands)
        self.service = make_service(settings, self.commands, self.stats_socket.pid)
        self.configs = ConfigStore(settings, self.commands)
        statsfile = Statsfile(settings.statsfile)
        self.ledger = Ledger(statsfile)        # METRICS bytes
        self.lifecycle = Lifecycle(statsfile)  # ACTIVE, SUSPENDED, DELETED...
        self.applied = None  # the load balancers HAProxy runs, when this worker applied them
        self.applied_ids = None  # plan.server_ids() of self.applied
        self.accepts = None  # (binary identity, plan.Accepts) of the running HAProxy, once asked
        self.busy = threading.Lock()
        self.drain_follower = DrainFollower(self.ledger, self.service, self.busy)
        self.log_sink = logsink.for_settings(settings)  # process mode: HAProxy's log → logfile
        self.executor = Executor(self.configs, self.service, self.stats_socket, self.ledger,
                                 self.drain_follower, server_state.path_for(settings.statsfile))

    # -- start-up ------------------------------------------------------------
    def start(self):
        """Adopt a running HAProxy; bring back an active one that is not running."""
        if self.log_sink is not None:
            try:
                self.log_sink.start()
            except OSError as error:
                LOG.error("cannot receive HAProxy's log at %s: %s", self.settings.log_target, error)
        self.drain_follower.start()
        server_state.clear(server_state.path_for(self.settings.statsfile))  # only a reload fills it
        if self.service.running():
            LOG.info("adopted the running HAProxy (worker pid %s)", self.service.worker_pid())
        elif self.lifecycle.lb_state == "ACTIVE" and self.configs.exists():
            LOG.warning("HAProxy should be serving but is not running: starting it")
            try:
                self.ledger.carry(None)
                self.service.start()
            except JobError as error:
                LOG.error("could not start HAProxy: %s", error)

    def close(self):
        """The worker is stopping: HAProxy keeps serving; only our temp files go."""
        self.drain_follower.stop()
        if self.log_sink is not None:
            self.log_sink.stop()
        self.configs.close()

    # -- actions ---------------------------------------------------------------
    @exclusive
    def update(self, load_balancers):
        """Apply an UPDATE; returns the path taken: 'unchanged', 'runtime', 'reload' or 'start'.

        The decision is plan.plan_update's; apply.Executor carries it out.
        """
        running = self.service.running()
        known = running and self.applied is not None
        ids = plan.server_ids(load_balancers, self.applied_ids if known else None)
        text = render.render_config(load_balancers, self.settings, server_ids=ids)
        # The live file is read only when it can matter: the same request again (a
        # 10,000-node file is a megabyte).
        same = known and tuple(self.applied) == tuple(load_balancers)
        applied = plan.Applied(running=running, load_balancers=self.applied if known else None,
                               file_holds_config=same and self.configs.holds(text),
                               server_ids=self.applied_ids if known else None)
        chosen = plan.plan_update(load_balancers, text, applied,
                                  self._accepts() if known else plan.Accepts(), ids)
        if chosen.kind == plan.RELOAD:
            LOG.info("UPDATE reloads HAProxy: %s", chosen.reason)
        try:
            how = self.executor.carry_out(chosen, applied.load_balancers, load_balancers)
        except JobError:
            if self.executor.lost_track:
                self.applied = None
            raise
        finally:
            if self.executor.refused:
                self.accepts = None  # learn again what this HAProxy accepts
        self.applied, self.applied_ids = load_balancers, ids
        if self.lifecycle.lb_state != "ACTIVE":
            self.lifecycle.set_lb_state("ACTIVE")
        return how

    def _accepts(self):
        """What the running HAProxy takes at run time, from its `show info`.

        Asked again only when the binary changed (a reload runs the binary at
        `haproxy`: an upgrade) or HAProxy refused something since.
        """
        binary = _identity(self.settings.haproxy)
        if self.accepts is None or self.accepts[0] != binary:
            try:
                self.accepts = (binary, plan.Accepts.from_info(self.stats_socket.ask("show info")))
            except ServiceError as error:
                LOG.info("HAProxy's version is unknown (%s): assuming the least", error)
                return plan.Accepts()
        return self.accepts[1]

    @exclusive
    def suspend(self):
        self._require_configured("SUSPEND")
        if self.service.running():
            self.ledger.carry(self._snapshot_or_none())
            self.service.stop()
        self.lifecycle.set_lb_state("SUSPENDED")

    @exclusive
    def enable(self):
        self._require_configured("ENABLE")
        if not self.configs.exists():
            raise CommandFailed(f"no HAProxy configuration at {self.settings.config} to enable")
        if not self.service.running():
            self.ledger.carry(None)
            self.service.start()
        self.lifecycle.set_lb_state("ACTIVE")

    @exclusive
    def delete(self):
        if self.service.running():
            self.service.stop()
        self.configs.remove_all()
        if self.settings.service == "process":
            self._remove_haproxy_log()
        else:  # the system's syslog owns it (root's directory): its rotation removes it
            LOG.info("DELETE: %s is left to the system's syslog", self.settings.logfile)
        self.ledger.reset()
        self.lifecycle.set_lb_state("DELETED")
        self.applied = self.applied_ids = None

    def stats(self):
        self._require_not_deleted()
        snapshot = self.stats_socket.snapshot(SERVERS_QUERY)
        backends = {render.backend_name(protocol) for protocol in ("HTTP", "TCP", "GALERA")}
        return [(server, status) for proxy, server, status in snapshot.server_statuses()
                if proxy in backends]

    @exclusive
    def metrics(self):
        self._require_not_deleted()
        self.drain_follower.follow_once()
        return self.ledger.report(self._snapshot_or_none())

    def archive(self, message):
        archive.archive(message, self.settings, workdir=self.configs.workdir)

    # -- helpers ---------------------------------------------------------------
    def _remove_haproxy_log(self):
        try:
            safe_files.unlink(self.settings.logfile)
        except OSError as error:
            raise CommandFailed(str(error) if isinstance(error, safe_files.OddFile)
                                else f"cannot remove {self.settings.logfile}: {error.strerror}") from None

    def _snapshot_or_none(self):
        return self.executor.snapshot_or_none()

    def _require_not_deleted(self):
        if self.lifecycle.lb_state == "DELETED":
            raise Deleted("the load balancer was deleted")

    def _require_configured(self, action):
        self._require_not_deleted()
        if self.lifecycle.lb_state == "NONE" and not self.configs.exists():
            raise CommandFailed(f"{action}: no load balancer is configured on this device")
