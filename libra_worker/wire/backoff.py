"""Reconnect delays: exponential, jittered, reset only after a healthy stretch.

Pure (the clock and the random source are the caller's).  A server that
accepts and then closes, or answers with garbage, keeps climbing the
backoff: a TCP connect alone proves nothing.  A whole fleet losing the same
job server does not come back in the same instant: every delay is drawn
from [d/2, d].
"""
import random

FIRST_DELAY = 1.0      # seconds; the first retry after a loss is drawn from [0.5, 1]
HEALTHY_AFTER = 30.0   # seconds a connection must stay up before the backoff resets


class Backoff:
    def __init__(self, cap, first=FIRST_DELAY, healthy_after=HEALTHY_AFTER, rand=random.random):
        self.cap = max(cap, 0.1)
        self.first = min(first, self.cap)
        self.healthy_after = healthy_after
        self.failures = 0
        self._rand = rand
        self._up_since = None

    def connected(self, now):
        """The connection is up and answering since `now`."""
        self._up_since = now

    def tick(self, now):
        """Call now and then: resets the backoff once the link stayed up long enough."""
        if self._up_since is not None and now - self._up_since >= self.healthy_after:
            self.failures = 0
            self._up_since = None
            return True
        return False

    @property
    def healthy(self):
        return self.failures == 0

    def next_delay(self, now):
        """The link failed at `now`: seconds to wait before the next attempt."""
        self.tick(now)
        self._up_since = None
        ceiling = min(self.cap, self.first * (2 ** min(self.failures, 30)))
        self.failures += 1
        return ceiling * (0.5 + 0.5 * self._rand())
