"""The libra_worker command: settings → logging → driver → job loop."""
import logging
import os
import signal
import sys

from libra_worker import __version__, logs, settings as settings_module
from libra_worker.controller import Controller
from libra_worker.drivers import load_driver
from libra_worker.errors import ConfigError
from libra_worker.job_loop import JobLoop, StopFlag

LOG = logging.getLogger(__name__)


def install_signal_handlers(stop_flag, file_handler):
    """TERM/INT: finish the job in hand, reply, exit 0 (also while starting); a second one exits now.

    Installed before the driver starts, so a signal during start-up is a
    first signal too: start-up completes, nothing is served, driver.close()
    runs, exit 0.  HUP: reopen the log.
    """
    def stop(signum, frame):
        if stop_flag.requested:
            LOG.warning("second %s: exiting without waiting", signal.Signals(signum).name)
            os._exit(1)
        LOG.info("%s: stopping after the job in hand", signal.Signals(signum).name)
        stop_flag.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: logs.reopen(file_handler))


def serve(settings, file_handler):
    """Run the job loop until a signal stops it; returns the exit status."""
    stop_flag = StopFlag()
    install_signal_handlers(stop_flag, file_handler)
    LOG.info("libra_worker %s starting (driver %s, pid %d)", __version__, settings.driver, os.getpid())
    driver = load_driver(settings)
    try:
        driver.start()
        JobLoop(settings, Controller(settings, driver), stop_flag).run()
    finally:
        driver.close()
    return 0


def main(argv=None):
    try:
        settings = settings_module.load(sys.argv[1:] if argv is None else argv)
    except ConfigError as error:
        print(f"libra_worker: {error}", file=sys.stderr)
        return 2
    if settings.check:
        from libra_worker import preflight
        return preflight.main(settings)
    if settings.nodaemon:
        from libra_worker import preflight
        for problem in preflight.file_problems(settings):  # never waited on: refused at once
            print(f"libra_worker: {problem}", file=sys.stderr)
            return 1
        try:
            file_handler = logs.setup(settings)
        except OSError as error:
            print(f"libra_worker: --logfile: cannot open {settings.logfile}: {error.strerror}",
                  file=sys.stderr)
            return 1
        return serve(settings, file_handler)
    from libra_worker import daemon
    return daemon.run(settings, serve)


if __name__ == "__main__":
    sys.exit(main())
