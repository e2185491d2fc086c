"""The load balancer's lifecycle state (NONE, ACTIVE, SUSPENDED, DELETED), kept in the statsfile.

It survives a worker restart: start-up brings back an ACTIVE load balancer
that is not running, and a DELETED one refuses UPDATE-less jobs.
"""
LB_STATES = ("NONE", "ACTIVE", "SUSPENDED", "DELETED")


def fresh():
    return {"lb_state": "NONE"}


def valid(state):
    return state.get("lb_state") in LB_STATES


class Lifecycle:
    def __init__(self, statsfile):
        self.file = statsfile

    @property
    def lb_state(self):
        return self.file.state["lb_state"]

    def set_lb_state(self, lb_state):
        with self.file.lock:
            self.file.state["lb_state"] = lb_state
            self.file.save()
