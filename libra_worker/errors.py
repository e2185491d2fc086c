"""Specific failures of a job; the controller turns each into `hpcs_error`."""


class JobError(Exception):
    """A job cannot be done; str(error) is the one-line `hpcs_error`."""


class BadRequest(JobError):
    """The message is malformed or misses something (adds `badRequest`)."""


class CommandFailed(JobError):
    """A command on the device failed; the text carries its own message."""


class Deleted(JobError):
    """The load balancer was deleted: STATS and METRICS report DELETED."""


class ServiceError(JobError):
    """HAProxy could not be started, stopped, reloaded or queried."""


class ConfigError(Exception):
    """A bad configuration value; main() prints it and exits with 2."""

    def __init__(self, option, value, why):
        super().__init__(f"{option}: {why} (got {value!r})")
        self.option = option
        self.value = value
