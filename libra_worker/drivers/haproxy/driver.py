"""The HAProxy driver: each protocol action as a sequence of device steps.

Every step that can fail raises a JobError; update() undoes what it did
before re-raising, so a FAIL leaves HAProxy serving what it served before.
"""
import functools
import logging
import threading

from libra_worker import safe_files
from libra_worker.drivers.haproxy import archive, logsink, render, server_state
from libra_worker.drivers.haproxy.drain import DrainFollower
from libra_worker.drivers.haproxy.commands import SERVICE, Commands
from libra_worker.drivers.haproxy.config_files import ConfigStore
from libra_worker.drivers.haproxy.counters import Ledger
from libra_worker.drivers.haproxy.query import FRONTENDS_QUERY, SERVERS_QUERY, StatsSocket
from libra_worker.drivers.haproxy.service import make_service
from libra_worker.errors import CommandFailed, Deleted, JobError, ServiceError

LOG = logging.getLogger(__name__)
MAX_RUNTIME_COMMANDS = 100
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


RUNTIME_LINE_BYTES = 14000  # per stats-socket line: HAProxy reads one into tune.bufsize (16 kB)


def runtime_batches(commands, limit=RUNTIME_LINE_BYTES):
    """The commands in groups whose `;`-joined line stays under `limit` bytes."""
    batch, size = [], 0
    for command in commands:
        if batch and size + len(command.line) + 1 > limit:
            yield batch
            batch, size = [], 0
        batch.append(command)
        size += len(command.line) + 1
    if batch:
        yield batch


def split_answers(text, count):
    """HAProxy's answer to `count` `;`-separated commands → one text each.

    Each command's answer ends with an empty line (a silent command's is only
    that); fewer than `count` answers means the reply was cut short.
    """
    answers, current = [], []
    for line in text.split("\n"):
        if line:
            current.append(line)
            continue
        answers.append("\n".join(current))
        current = []
        if len(answers) == count:
            break
    return answers


class HAProxyDriver:
    def __init__(self, settings):
        self.settings = settings
        self.commands = Commands(settings.sudo, timeout=settings.job_timeout)
        self.stats_socket = StatsSocket(settings.socat, settings.stats_socket, self.commands)
        self.service = make_service(settings, self.commands, self.stats_socket.pid)
        self.configs = ConfigStore(settings, self.commands)
        self.ledger = Ledger(settings.statsfile)
        self.applied = None  # the load balancers HAProxy runs, when this worker applied them
        self.busy = threading.Lock()
        self.drain_follower = DrainFollower(self.ledger, self.service, self.busy)
        self.log_sink = logsink.for_settings(settings)  # process mode: HAProxy's log → logfile

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
        elif self.ledger.lb_state == "ACTIVE" and self.configs.exists():
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
        """Apply an UPDATE; returns the path taken: 'unchanged', 'runtime' or 'reload'."""
        text = render.render_config(load_balancers, self.settings)
        was_running = self.service.running()
        # Only what this worker applied is known to run: after a restart (or a worker
        # killed between the swap and the reload) the file can be ahead of HAProxy.
        if was_running and self.applied is not None and self.configs.holds(text):
            how = "unchanged"
        else:
            how = self._swap(text, load_balancers, was_running)
        self.applied = load_balancers
        if self.ledger.lb_state != "ACTIVE":
            self.ledger.set_lb_state("ACTIVE")
        return how

    def _swap(self, text, load_balancers, was_running):
        """Validate, install, then change HAProxy at run time or reload it; all or nothing."""
        runtime = render.runtime_commands(self.applied, load_balancers,
                                          limit=MAX_RUNTIME_COMMANDS) if was_running else None
        if runtime is not None and len(runtime) > MAX_RUNTIME_COMMANDS:
            runtime = None  # a socat round trip each: past a few dozen, one reload is faster
        reloading = was_running and runtime is None
        candidate = self.configs.stage(text)
        try:
            had_live, held = self._install(candidate, reloading)
        finally:
            self.configs.discard(candidate)
        if runtime is not None and self._apply_at_runtime(runtime):
            return "runtime"
        try:
            if was_running:
                if runtime is not None:  # the runtime path gave up half-way
                    held = self._hold_old_process()
                self._reload(held, load_balancers)
            else:
                self.ledger.carry(None)
                self.service.start()
        except JobError as error:
            self._roll_back(had_live, was_running)
            raise CommandFailed(f"{error} (previous configuration restored)") from None
        return "reload"

    def _install(self, candidate, reloading):
        """Check the candidate and swap it in → (had a live file, HeldSession or None).

        `haproxy -c` is the long step, and it runs in a process of its own:
        meanwhile the worker backs up, stages and, before a reload, opens its
        session on the old process, none of which changes what HAProxy serves.
        """
        check = self.configs.start_check(candidate)
        held = None
        try:
            had_live = self.configs.prepare(candidate)
            if reloading:  # last: a process a reload just started answers only once it is ready
                held = self.stats_socket.hold()
            try:
                check.verdict()
            except JobError:
                self.configs.unstage()
                raise
            if reloading:
                self._carry_before_reload(held)
            self.configs.commit()
        except BaseException:
            check.abandon()
            if held is not None:
                held.close()
            raise
        return had_live, held

    def _hold_old_process(self):
        """A stats session on the process serving now, its counters carried (just before a reload)."""
        held = self.stats_socket.hold()
        self._carry_before_reload(held)
        return held

    def _carry_before_reload(self, held):
        reading = None
        if held is not None:
            try:
                reading = held.snapshot()
            except ServiceError as error:
                LOG.info("the held stats session gave no counters: %s", error)
        self.ledger.carry(reading if reading is not None else self._snapshot_or_none())

    def _reload(self, held, load_balancers):
        """Reload; `held` keeps the old process alive until its last bytes are read."""
        state_file = server_state.path_for(self.settings.statsfile)
        server_state.save(self.stats_socket.ask, state_file, self.applied, load_balancers,
                          render.backend_name)
        try:
            self.service.reload()
        except JobError:
            if held is not None:
                held.close()
            raise
        finally:
            server_state.clear(state_file)
        if held is not None:
            self.drain_follower.hold(held)

    def _apply_at_runtime(self, commands):
        """Send the commands, many per stats-socket call; False (reload instead) at the first refusal."""
        for batch in runtime_batches(commands):
            try:
                answer = self.stats_socket.ask(";".join(command.line for command in batch))
            except ServiceError as error:
                LOG.warning("runtime change %r... failed (%s): reloading instead", batch[0].line, error)
                return False
            answers = split_answers(answer, len(batch))
            if len(answers) < len(batch):
                LOG.warning("HAProxy answered %d of %d runtime commands: reloading instead",
                            len(answers), len(batch))
                return False
            for command, text in zip(batch, answers):
                if not command.expect.match(text):
                    LOG.warning("HAProxy refused %r (%s): reloading instead",
                                command.line, " ".join(text.split())[:200])
                    return False
        return True

    def _roll_back(self, had_live, was_running):
        try:
            self.configs.restore(had_live)
            if was_running:
                self.service.reload()
            else:
                self.service.stop()
        except JobError as error:
            self.applied = None  # what runs is no longer known for sure
            LOG.error("rolling back the configuration failed too: %s", error)

    @exclusive
    def suspend(self):
        self._require_configured("SUSPEND")
        if self.service.running():
            self.ledger.carry(self._snapshot_or_none())
            self.service.stop()
        self.ledger.set_lb_state("SUSPENDED")

    @exclusive
    def enable(self):
        self._require_configured("ENABLE")
        if not self.configs.exists():
            raise CommandFailed(f"no HAProxy configuration at {self.settings.config} to enable")
        if not self.service.running():
            self.ledger.carry(None)
            self.service.start()
        self.ledger.set_lb_state("ACTIVE")

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
        self.ledger.set_lb_state("DELETED")
        self.applied = None

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
        try:
            return self.stats_socket.snapshot(FRONTENDS_QUERY)
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
