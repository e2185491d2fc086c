"""Load-balancer drivers, chosen by `[worker] driver`."""


def load_driver(settings):
    if settings.driver == "haproxy":
        from libra_worker.drivers.haproxy.driver import HAProxyDriver
        return HAProxyDriver(settings.haproxy)
    raise ValueError(f"unknown driver {settings.driver!r}")  # settings.load() rejects it first
