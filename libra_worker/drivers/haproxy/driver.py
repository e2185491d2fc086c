"""The HAProxy driver: each protocol action as a sequence of device steps.

Every step that can fail raises a JobError; update() undoes what it did
before re-raising, so a FAIL leaves HAProxy serving what it served before.
"""
import logging
import os
import shutil
import subprocess

from libra_worker.drivers.haproxy import render
from libra_worker.drivers.haproxy.commands import CP, MV, RM, SERVICE, SUDO, Commands
from libra_worker.drivers.haproxy.config_files import ConfigStore
from libra_worker.drivers.haproxy.counters import Ledger
from libra_worker.drivers.haproxy.query import StatsSocket
from libra_worker.drivers.haproxy.service import make_service
from libra_worker.errors import CommandFailed, Deleted, JobError, NotSupported, ServiceError

LOG = logging.getLogger(__name__)


def privileged_commands(settings):
    """Absolute paths of every command the worker runs as root (sudoers, --check)."""
    commands = [CP, MV, RM, settings.socat]
    if settings.service == "system":
        commands.append(SERVICE)
    return commands


class HAProxyDriver:
    def __init__(self, settings):
        self.settings = settings
        self.commands = Commands(settings.sudo, timeout=settings.job_timeout)
        self.stats_socket = StatsSocket(settings.socat, settings.stats_socket, self.commands)
        self.service = make_service(settings, self.commands, self.stats_socket.pid)
        self.configs = ConfigStore(settings, self.commands)
        self.ledger = Ledger(settings.statsfile)

    # -- start-up ------------------------------------------------------------
    def preflight(self, user):
        """Problems that must stop a daemon from starting, one line each."""
        problems = []
        for option in ("haproxy", "socat"):
            path = getattr(self.settings, option)
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                problems.append(f"[worker:haproxy] {option}: {path} not found or not executable")
        if self.settings.sudo:
            for command in privileged_commands(self.settings):
                if not self._sudo_allows(user, command):
                    problems.append(f"[worker:haproxy] sudo: 'sudo -n {command}' is not allowed for {user}")
        return problems

    @staticmethod
    def _sudo_allows(user, command):
        argv = [SUDO, "-n", "-l"] + (["-U", user] if os.getuid() == 0 else []) + [command]
        if not shutil.which(SUDO):
            return False
        return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0

    def start(self):
        """Adopt a running HAProxy; bring back an active one that is not running."""
        if self.service.running():
            LOG.info("adopted the running HAProxy (worker pid %s)", self.service.worker_pid())
        elif self.ledger.lb_state == "ACTIVE" and self.configs.exists():
            LOG.warning("HAProxy should be serving but is not running: starting it")
            try:
                self.ledger.carry(None)
                self.service.start()
            except JobError as error:
                LOG.error("could not start HAProxy: %s", error)

    def close(self):
        """The worker is stopping: HAProxy keeps serving; only our temp files go."""
        self.configs.close()

    # -- actions ---------------------------------------------------------------
    def update(self, load_balancers):
        candidate = self.configs.stage(render.render_config(load_balancers, self.settings))
        try:
            self.configs.validate(candidate)
            was_running = self.service.running()
            if was_running:
                self.ledger.carry(self._snapshot_or_none())
            had_live = self.configs.install(candidate)
            try:
                self.service.reload() if was_running else self.service.start()
            except JobError as error:
                self._roll_back(had_live, was_running)
                raise CommandFailed(f"{error} (previous configuration restored)") from None
        finally:
            self.configs.discard(candidate)
        self.ledger.set_lb_state("ACTIVE")

    def _roll_back(self, had_live, was_running):
        try:
            self.configs.restore(had_live)
            if was_running:
                self.service.reload()
            else:
                self.service.stop()
        except JobError as error:
            LOG.error("rolling back the configuration failed too: %s", error)

    def suspend(self):
        self._require_configured("SUSPEND")
        if self.service.running():
            self.ledger.carry(self._snapshot_or_none())
            self.service.stop()
        self.ledger.set_lb_state("SUSPENDED")

    def enable(self):
        self._require_configured("ENABLE")
        if not self.configs.exists():
            raise CommandFailed(f"no HAProxy configuration at {self.settings.config} to enable")
        if not self.service.running():
            self.ledger.carry(None)
            self.service.start()
        self.ledger.set_lb_state("ACTIVE")

    def delete(self):
        if self.service.running():
            self.service.stop()
        self.configs.remove_all()
        self.commands.remove(self.settings.logfile)
        self.ledger.reset()
        self.ledger.set_lb_state("DELETED")

    def stats(self):
        self._require_not_deleted()
        snapshot = self.stats_socket.snapshot()
        backends = {render.backend_name(protocol) for protocol in ("HTTP", "TCP", "GALERA")}
        return [(server, status) for proxy, server, status in snapshot.server_statuses()
                if proxy in backends]

    def metrics(self):
        self._require_not_deleted()
        return self.ledger.report(self._snapshot_or_none())

    def archive(self, message):
        raise NotSupported("ARCHIVE is not supported by this driver yet")

    # -- helpers ---------------------------------------------------------------
    def _snapshot_or_none(self):
        try:
            return self.stats_socket.snapshot()
        except ServiceError as error:
            LOG.info("no HAProxy counters to read: %s", error)
            return None

    def _require_not_deleted(self):
        if self.ledger.lb_state == "DELETED":
            raise Deleted("the load balancer was deleted")

    def _require_configured(self, action):
        self._require_not_deleted()
        if self.ledger.lb_state == "NONE" and not self.configs.exists():
            raise CommandFailed(f"{action}: no load balancer is configured on this device")
