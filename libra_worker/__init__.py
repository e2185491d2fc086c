"""libra_worker: a Gearman worker that drives HAProxy on an LBaaS device."""

__version__ = "1.0.0"
