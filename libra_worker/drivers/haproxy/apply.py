"""Carrying out a plan.Plan, all or nothing.

START / RELOAD: `haproxy -c` of the candidate (in a process of its own, while
the worker backs up the live file, stages the candidate beside it and, before
a reload, opens a stats session on the old process) ▸ swap ▸ reload or start
▸ confirm ▸ on any failure restore the backup and reload it.

RUNTIME: the commands go to the running process over one interactive stats
session, many per line; every answer is checked.  Only then is the live file
replaced (backup, atomic swap), so it says what HAProxy runs and the next
reload changes nothing.  No `haproxy -c` on this path: it would cost more than
the whole change (0.3 s for 10,000 servers), and HAProxy checks each command
itself; the frame around the servers is the one that passed `-c` before, and
every server line is one that `add server` accepted or the config had.  A
refused command, a cut-short answer or a lost session: the RELOAD path
instead, from its check on, which also replaces whatever the commands did.
"""
import logging
import time

from libra_worker.drivers.haproxy import plan as plans, render, server_state
from libra_worker.drivers.haproxy.stats_socket import FRONTENDS_QUERY
from libra_worker.errors import CommandFailed, JobError, ServiceError

LOG = logging.getLogger(__name__)

RUNTIME_LINE_BYTES = 14000  # per stats-socket line: HAProxy reads one into tune.bufsize (16 kB)
RUNTIME_LINE_TIMEOUT = 10.0   # without an answer coming
# A removed server's last request may still be finishing, and HAProxy 2.6 closes a
# server's idle connections only just after it enters maintenance: `del server` is
# tried again for this long before the UPDATE reloads instead.
REMOVE_WAIT = 1.0
REMOVE_RETRY_INTERVAL = 0.02


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


class RuntimeRefused(Exception):
    """The running HAProxy did not take a runtime change: reload instead."""


class Executor:
    def __init__(self, configs, service, stats_socket, ledger, drain_follower, state_file):
        self.configs = configs
        self.service = service
        self.stats_socket = stats_socket
        self.ledger = ledger
        self.drain_follower = drain_follower
        self.state_file = state_file  # HAProxy's server-state file: node health across a reload
        self.health = (None, ())     # (load balancers running, load balancers wanted)
        self.lost_track = False  # a roll-back failed too: what runs is no longer known
        self.refused = False     # the last plan's runtime commands were refused

    def carry_out(self, plan, running_lbs=None, wanted_lbs=()):
        """Make the device run `plan`; returns the path taken, or raises JobError (nothing changed).

        `running_lbs` (None: not known) and `wanted_lbs` say whose node health a reload carries.
        """
        self.lost_track = self.refused = False
        self.health = (running_lbs, wanted_lbs)
        if plan.kind == plans.UNCHANGED:
            return plans.UNCHANGED
        if plan.kind == plans.START:
            return self._swap(plan.config, running=False)
        if plan.kind == plans.RUNTIME:
            try:
                self._apply_at_runtime(plan.commands)
            except RuntimeRefused as why:
                LOG.warning("%s: reloading instead", why)
                self.refused = True
                return self._swap(plan.config, running=True, half_changed=True)
            self._write_after_runtime(plan.config)
            return plans.RUNTIME
        return self._swap(plan.config, running=True)

    # -- runtime ---------------------------------------------------------------
    def _apply_at_runtime(self, commands):
        """Send the commands, many per line of one stats session; RuntimeRefused at a refusal.

        Every line is written at once and the answers are read as they come:
        HAProxy goes through 10,000 commands without waiting for the worker
        between lines.  Commands that take servers out of service go in a
        second exchange, once every other answer was checked: after a refusal
        (the reload that follows replaces whatever ran) no node has left.
        """
        try:
            session = self.stats_socket.session()
        except ServiceError as error:
            raise RuntimeRefused(f"no stats session for the runtime change ({error})") from None
        try:
            waiting = []
            for withdraws in (False, True):
                group = [command for command in commands if command.withdraws is withdraws]
                if group:
                    waiting += self._send(session, group)
            deadline = time.monotonic() + REMOVE_WAIT
            while waiting:
                if time.monotonic() > deadline:
                    raise RuntimeRefused(f"{waiting[0].line!r} still had connections after {REMOVE_WAIT:g}s")
                time.sleep(REMOVE_RETRY_INTERVAL)
                retries = []
                for command in waiting:
                    retries.extend(plans.RuntimeCommand(line, plans.NUDGE_EXPECT) for line in command.nudge)
                    retries.append(command)
                waiting = self._send(session, retries)
        finally:
            session.close()

    @staticmethod
    def _send(session, commands):
        """The commands, in lines of many → the commands to send again later ("not yet" answers)."""
        lines = [";".join(command.line for command in batch) for batch in runtime_batches(commands)]
        try:
            answers = session.exchange(lines, len(commands), RUNTIME_LINE_TIMEOUT)
        except ServiceError as error:
            raise RuntimeRefused(f"the runtime change of {len(commands)} commands failed ({error})") from None
        again = []
        for command, text in zip(commands, answers):
            if command.expect.match(text):
                continue
            if command.retry is not None and command.retry.search(text):
                again.append(command)
                continue
            raise RuntimeRefused(f"HAProxy refused {command.line!r} ({' '.join(text.split())[:200]})")
        return again

    def _write_after_runtime(self, text):
        """The live file := what HAProxy now runs; if it cannot be, HAProxy goes back to the old file."""
        try:
            candidate = self.configs.stage(text)
            try:
                self.configs.prepare(candidate)  # refuses an odd file at .BKUP/.NEW, leaving it be
                try:
                    self.configs.commit()
                except JobError:
                    self.configs.unstage()
                    raise
            finally:
                self.configs.discard(candidate)
        except JobError as error:
            self._undo_runtime()
            raise CommandFailed(f"{error} (previous configuration restored)") from None

    def _undo_runtime(self):
        """The live file is still the old one: reload it, undoing what runtime commands did."""
        running_lbs = self.health[0]
        try:
            self._reload(self._hold_old_process(), (running_lbs, running_lbs or ()))
        except JobError as error:
            self.lost_track = True
            LOG.error("undoing the runtime change failed too: %s", error)

    # -- check, swap, reload or start --------------------------------------------
    def _swap(self, text, running, half_changed=False):
        """Validate, install, reload (or start) HAProxy; all or nothing.  Returns the path.

        `half_changed`: runtime commands changed the running process already;
        if the candidate goes no further than its check, the old file is reloaded.
        """
        try:
            candidate = self.configs.stage(text)
            try:
                had_live, held = self._install(candidate, running)
            finally:
                self.configs.discard(candidate)
        except JobError:
            if half_changed:
                self._undo_runtime()
            raise
        try:
            if running:
                self._reload(held, saved=True)
            else:
                self.ledger.carry(None)
                self.service.start()
        except JobError as error:
            self._roll_back(had_live, running)
            raise CommandFailed(f"{error} (previous configuration restored)") from None
        return plans.RELOAD if running else plans.START

    def _install(self, candidate, reloading):
        """Check the candidate and swap it in → (had a live file, HeldSession or None).

        `haproxy -c` is the long step, and it runs in a process of its own:
        meanwhile the worker backs up, stages and, before a reload, opens its
        session on the old process and saves node health, none of which
        changes what HAProxy serves.
        """
        check = self.configs.start_check(candidate)
        held = None
        try:
            had_live = self.configs.prepare(candidate)
            if reloading:  # last: a process a reload just started answers only once it is ready
                held = self.stats_socket.hold()
                self._save_health(self.health)  # while the check runs (10,000 servers: ~30 ms)
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
            if reloading:  # no reload follows: no health may wait for a later start
                server_state.clear(self.state_file)
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
        self.ledger.carry(reading if reading is not None else self.snapshot_or_none())

    def _save_health(self, health):
        """Node health → the server-state file (`health`: running and wanted load balancers).

        Through a socat of its own, not the held session: a dump of 10,000
        servers that failed halfway must not cost the session the counters
        of the old process.
        """
        running_lbs, wanted_lbs = health
        server_state.save(self.stats_socket.ask, self.state_file, running_lbs, wanted_lbs,
                          render.backend_name)

    def _reload(self, held, health=None, saved=False):
        """Reload; `held` keeps the old process alive until its last bytes are read.

        Node health goes to the new process through the server-state file
        (`health`: running and wanted load balancers; default the plan's),
        saved here unless `saved` (_install saves it while the check runs:
        health as of the check, a fraction of a second before the reload).
        """
        if not saved:
            self._save_health(health or self.health)
        try:
            self.service.reload()
        except JobError:
            if held is not None:
                held.close()
            raise
        finally:
            server_state.clear(self.state_file)
        if held is not None:
            self.drain_follower.hold(held)

    def _roll_back(self, had_live, was_running):
        try:
            self.configs.restore(had_live)
            if was_running:
                self.service.reload()
            else:
                self.service.stop()
        except JobError as error:
            self.lost_track = True
            LOG.error("rolling back the configuration failed too: %s", error)

    def snapshot_or_none(self):
        try:
            return self.stats_socket.snapshot(FRONTENDS_QUERY)
        except ServiceError as error:
            LOG.info("no HAProxy counters to read: %s", error)
            return None
