"""libra_worker.drivers.haproxy.plan: every UPDATE decision, on plain values.

No HAProxy here: the planner is pure.  test_runtime.py and
test_driver_update.py carry the same decisions out on a real HAProxy.
"""
import dataclasses

import pytest

from libra_worker.drivers.haproxy import plan, render
from libra_worker.drivers.haproxy.apply import RUNTIME_LINE_BYTES, runtime_batches
from libra_worker.drivers.haproxy.plan import Accepts, Applied, plan_update, server_ids
from libra_worker.models import Monitor, Options, parse_update
from libra_worker.settings import HaproxySettings

# scripts/test runs these once, where HAProxy cannot run (scripts/without-haproxy).
pytestmark = pytest.mark.no_haproxy

SETTINGS = HaproxySettings()
OLD_HAPROXY = Accepts()                      # 2.6: no `cookie` on `add server`
NEW_HAPROXY = Accepts(dynamic_cookie=True, costs=plan.COSTS_3_0)   # 3.0
MONITOR = {"type": "CONNECT", "delay": 7, "timeout": 3, "attempts": 4}


def lbs(protocol="HTTP", nodes=None, **fields):
    nodes = nodes if nodes is not None else [node("a"), node("b", address="10.0.0.2")]
    return parse_update({"loadBalancers": [{"protocol": protocol, "port": 8080, "nodes": nodes,
                                            "monitor": MONITOR, **fields}]})


def node(node_id, address="10.0.0.1", port=80, **fields):
    return {"id": node_id, "address": address, "port": port, **fields}


def decide(old, new, accepts=OLD_HAPROXY, running=True, holds=True):
    """The plan, with the server ids the driver keeps: old's, then new's after them."""
    before = None if old is None else server_ids(old)
    ids = server_ids(new, before)
    applied = Applied(running=running, load_balancers=old, file_holds_config=holds, server_ids=before)
    return plan_update(new, render.render_config(new, SETTINGS, server_ids=ids), applied, accepts, ids)


def lines(chosen):
    assert chosen.kind == plan.RUNTIME, (chosen.kind, chosen.reason)
    return [command.line for command in chosen.commands]


# --------------------------------------------------------------------------
# The four kinds
# --------------------------------------------------------------------------

def test_not_running_starts_whatever_was_applied():
    chosen = decide(lbs(), lbs(), running=False)
    assert chosen.kind == plan.START and chosen.commands == ()
    assert chosen.config == render.render_config(lbs(), SETTINGS)


def test_unknown_running_state_reloads():
    chosen = decide(None, lbs())
    assert chosen.kind == plan.RELOAD and "not known" in chosen.reason


def test_same_request_and_same_file_is_unchanged():
    chosen = decide(lbs(), lbs())
    assert chosen.kind == plan.UNCHANGED and chosen.commands == ()


def test_same_request_but_another_file_on_disk_reloads():
    chosen = decide(lbs(), lbs(), holds=False)
    assert chosen.kind == plan.RELOAD and "live file" in chosen.reason


def test_every_plan_carries_the_whole_config_text():
    new = lbs(nodes=[node("a", weight=5)])
    for old, running in ((None, True), (lbs(nodes=[node("a")]), True), (new, True), (new, False)):
        assert decide(old, new, running=running).config == render.render_config(new, SETTINGS)


# --------------------------------------------------------------------------
# Node changes the runtime API makes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["HTTP", "TCP", "GALERA"])
def test_weight(protocol):
    old = lbs(protocol, [node("a"), node("b", backup=True)])
    new = lbs(protocol, [node("a", weight=7), node("b", backup=True)])
    backend = render.backend_name(protocol)
    assert lines(decide(old, new)) == [f"set server {backend}/a weight 7"]


def test_condition_disabled_then_enabled():
    old, new = lbs(nodes=[node("a")]), lbs(nodes=[node("a", condition="DISABLED")])
    assert lines(decide(old, new)) == ["set server http_servers/a state maint"]
    assert lines(decide(new, old)) == ["set server http_servers/a state ready"]


def test_ip_address_and_port():
    old = lbs(nodes=[node("a")])
    new = lbs(nodes=[node("a", address="2001:db8::7", port=81)])
    assert lines(decide(old, new)) == ["set server http_servers/a addr 2001:db8::7 port 81"]


@pytest.mark.parametrize("protocol", ["TCP", "GALERA"])
def test_added_node_on_any_haproxy(protocol):
    old = lbs(protocol, [node("a")])
    new = lbs(protocol, [node("a"), node("b", address="10.0.0.2", backup=True)])
    backend = render.backend_name(protocol)
    assert [line.split(" ", 3)[:3] for line in lines(decide(old, new))] == [
        ["add", "server", f"{backend}/b"], ["enable", "health", f"{backend}/b"],
        ["set", "server", f"{backend}/b"]]
    assert lines(decide(old, new))[-1].endswith(" state ready")


def test_added_http_node_reloads_where_add_server_refuses_cookie():
    old, new = lbs(nodes=[node("a")]), lbs(nodes=[node("a"), node("b")])
    chosen = decide(old, new, OLD_HAPROXY)
    assert chosen.kind == plan.RELOAD and "cookie" in chosen.reason


def test_added_http_node_is_dynamic_where_add_server_takes_cookie():
    old, new = lbs(nodes=[node("a")]), lbs(nodes=[node("a"), node("b")])
    add = lines(decide(old, new, NEW_HAPROXY))[0]
    assert add.startswith("add server http_servers/b 10.0.0.1:80 ") and add.endswith(" cookie b")


def test_added_disabled_node_stays_in_maintenance():
    old = lbs("TCP", [node("a")])
    new = lbs("TCP", [node("a"), node("b", condition="DISABLED")])
    commands = lines(decide(old, new))
    assert commands[0].endswith(" disabled") and len(commands) == 2
    assert not any("state ready" in line for line in commands)


@pytest.mark.parametrize("protocol", ["HTTP", "TCP"])
def test_removed_node_goes_to_maintenance_then_is_deleted_again_and_again(protocol):
    old, new = lbs(protocol, [node("a"), node("b")]), lbs(protocol, [node("a")])
    chosen = decide(old, new)
    backend = render.backend_name(protocol)
    assert lines(chosen) == [f"set server {backend}/b state maint", f"del server {backend}/b"]
    deleting = chosen.commands[-1]
    assert deleting.retry.search("Server still has connections attached to it, cannot remove it.")
    assert not deleting.expect.match("Server still has connections attached to it, cannot remove it.")
    assert all(command.retry is None for command in chosen.commands[:-1])
    # Before each retry the server (taking no traffic) moves to another port: HAProxy 2.6
    # closes the idle connections that would block `del server` only then.
    assert deleting.nudge == (f"set server {backend}/b addr 10.0.0.1 port 1",
                              f"set server {backend}/b addr 10.0.0.1 port 2")


def test_many_changes_in_one_plan_keep_their_order():
    old = lbs("TCP", [node("keep"), node("w"), node("off"), node("gone")])
    new = lbs("TCP", [node("keep"), node("w", weight=2), node("off", condition="DISABLED"),
                      node("new", address="10.0.0.9")])
    verbs = [" ".join(line.split()[:2]) + (" " + line.split()[-1] if "state" in line else "")
             for line in lines(decide(old, new))]
    assert verbs == ["add server", "enable health", "set server ready", "set server",
                     "set server maint", "set server maint", "del server"]


def test_ten_thousand_weights_make_one_runtime_plan():
    """No cap on the number of commands: they travel many per socket line."""
    old = lbs(nodes=[node(f"n{i}", port=1000 + i) for i in range(10_000)])
    new = lbs(nodes=[node(f"n{i}", port=1000 + i, weight=2) for i in range(10_000)])
    commands = lines(decide(old, new, NEW_HAPROXY))
    assert len(commands) == 10_000 and commands[-1] == "set server http_servers/n9999 weight 2"


def test_where_2_6s_commands_cost_more_than_its_reload_it_reloads():
    """2.6 walks a backend's list for each `set server`: 10,000 weights reload there, not on 3.0."""
    old = lbs("TCP", [node(f"n{i}", port=1000 + i) for i in range(10_000)])
    new = lbs("TCP", [node(f"n{i}", port=1000 + i, weight=2) for i in range(10_000)])
    chosen = decide(old, new, OLD_HAPROXY)
    assert chosen.kind == plan.RELOAD and "10000 runtime commands" in chosen.reason
    assert "take longer than a reload" in chosen.reason
    assert decide(old, new, NEW_HAPROXY).kind == plan.RUNTIME
    # 1,000 nodes added (3,000 commands) still go at run time on 2.6
    assert decide(lbs("TCP", [node("anchor", port=1)]),
                  lbs("TCP", [node("anchor", port=1)] + [node(f"a{i}", port=2000 + i) for i in range(1_000)]),
                  OLD_HAPROXY).kind == plan.RUNTIME


def test_two_load_balancers_change_separately():
    old = parse_update({"loadBalancers": [
        {"protocol": "HTTP", "port": 80, "nodes": [node("h")]},
        {"protocol": "TCP", "port": 81, "nodes": [node("t")]}]})
    new = parse_update({"loadBalancers": [
        {"protocol": "TCP", "port": 81, "nodes": [node("t", weight=3)]},
        {"protocol": "HTTP", "port": 80, "nodes": [node("h", weight=4)]}]})
    assert lines(decide(old, new)) == ["set server tcp_servers/t weight 3", "set server http_servers/h weight 4"]


# --------------------------------------------------------------------------
# What only a reload does
# --------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"port": 8081}, {"algorithm": "LEAST_CONNECTIONS"},
    {"monitor": {"type": "HTTP", "delay": 7, "timeout": 3, "attempts": 4, "path": "/"}},
    {"options": {"client_timeout": 1000}}, {"options": {"connect_retries": 0}}])
def test_a_load_balancers_own_settings(change):
    chosen = decide(lbs(), lbs(**change), NEW_HAPROXY)
    assert chosen.kind == plan.RELOAD and "own settings" in chosen.reason


def test_a_protocol_replaced_or_a_load_balancer_added():
    assert decide(lbs("HTTP"), lbs("TCP"), NEW_HAPROXY).kind == plan.RELOAD
    both = parse_update({"loadBalancers": [{"protocol": "HTTP", "port": 80, "nodes": [node("h")]},
                                           {"protocol": "TCP", "port": 81, "nodes": [node("t")]}]})
    chosen = decide(lbs("HTTP", [node("h")], port=80), both, NEW_HAPROXY)
    assert chosen.kind == plan.RELOAD and "added or removed" in chosen.reason


def test_a_backup_flag():
    chosen = decide(lbs("TCP", [node("a"), node("b")]), lbs("TCP", [node("a"), node("b", backup=True)]),
                    NEW_HAPROXY)
    assert chosen.kind == plan.RELOAD and "backup" in chosen.reason


def test_a_host_name_moved_to_or_added():
    old = lbs("TCP", [node("a")])
    assert decide(old, lbs("TCP", [node("a", address="db.example")])).kind == plan.RELOAD
    chosen = decide(old, lbs("TCP", [node("a"), node("b", address="db.example")]))
    assert chosen.kind == plan.RELOAD and "host name" in chosen.reason


def test_thousands_of_nodes_added_to_a_big_backend_reload_faster():
    """3.0's `add server` costs more the more servers the backend has: there a reload wins."""
    anchor = [node("anchor", port=1)]
    many = [node(f"n{i}", port=1000 + i) for i in range(9_999)]
    assert decide(lbs("TCP", anchor), lbs("TCP", anchor + many[:1_000])).kind == plan.RUNTIME
    assert decide(lbs("TCP", many[:9_000]), lbs("TCP", many[:9_100])).kind == plan.RUNTIME
    for accepts in (OLD_HAPROXY, NEW_HAPROXY):
        assert decide(lbs("TCP", anchor), lbs("TCP", anchor + many[:1_000]), accepts).kind == plan.RUNTIME
    chosen = decide(lbs("TCP", anchor), lbs("TCP", anchor + many), NEW_HAPROXY)
    assert chosen.kind == plan.RELOAD and "take longer than a reload" in chosen.reason
    assert decide(lbs("TCP", many[:8_000]), lbs("TCP", many[:9_999]), NEW_HAPROXY).kind == plan.RELOAD


def test_most_of_a_big_backend_removed_reloads_faster():
    anchor = [node("anchor", port=1)]
    many = [node(f"n{i}", port=1000 + i) for i in range(9_999)]
    assert decide(lbs("TCP", anchor + many[:1_000]), lbs("TCP", anchor)).kind == plan.RUNTIME
    assert decide(lbs("TCP", many), lbs("TCP", many[:8_000]), NEW_HAPROXY).kind == plan.RUNTIME
    for accepts in (OLD_HAPROXY, NEW_HAPROXY):
        chosen = decide(lbs("TCP", anchor + many), lbs("TCP", anchor), accepts)
        assert chosen.kind == plan.RELOAD and "take longer than a reload" in chosen.reason


def test_a_hand_built_model_with_an_unsafe_value_is_refused_not_sent():
    old = lbs("TCP", [node("a")])
    (good,) = old
    bad = dataclasses.replace(good, nodes=(good.nodes[0]._replace(weight="2 check"),))
    with pytest.raises(ValueError):
        decide(old, (bad,))


# --------------------------------------------------------------------------
# What the running HAProxy accepts
# --------------------------------------------------------------------------

@pytest.mark.parametrize("info,cookie", [
    ("Name: HAProxy\nVersion: 2.6.12-1+deb12u4\nRelease_date: 2026/10/17\n", False),
    ("Name: HAProxy\nVersion: 3.0.11-9e587df\n", True),
    ("Version: 3.2.0\n", True), ("Version: 2.9.9\n", False), ("no version here", False), ("", False)])
def test_accepts_from_show_info(info, cookie):
    assert Accepts.from_info(info) == Accepts(dynamic_cookie=cookie,
                                              costs=plan.COSTS_3_0 if cookie else plan.COSTS_2_6)


def test_ten_thousand_state_changes_stay_at_run_time_on_3_0_and_reload_on_2_6():
    """A tie on 3.0 (both paths measured 1.2-1.8x the floor) goes to the runtime path."""
    old = lbs("TCP", [node(f"n{i}", port=1000 + i) for i in range(10_000)])
    new = lbs("TCP", [node(f"n{i}", port=1000 + i, condition="DISABLED") for i in range(10_000)])
    assert decide(old, new, NEW_HAPROXY).kind == plan.RUNTIME
    assert decide(old, new, OLD_HAPROXY).kind == plan.RELOAD


def test_the_cost_estimates_grow_as_measured():
    """Per command, with the backend (2.6's lookups, 3.0's adds), and a reload with its servers."""
    small = plan.runtime_cost(plan.COSTS_2_6, {"set_weight": 10}, 10, 0)
    big = plan.runtime_cost(plan.COSTS_2_6, {"set_weight": 10}, 10_000, 0)
    assert big > 5 * small
    assert plan.runtime_cost(plan.COSTS_3_0, {"set_weight": 10}, 10_000, 0) == \
        plan.runtime_cost(plan.COSTS_3_0, {"set_weight": 10}, 10, 0)
    adds = {"add_server": 1_000, "enable_health": 1_000, "set_state": 1_000}
    assert plan.runtime_cost(plan.COSTS_3_0, adds, 9_000, 1_000) > \
        2 * plan.runtime_cost(plan.COSTS_3_0, adds, 0, 1_000)
    few, many = lbs("TCP", [node("a")]), lbs("TCP", [node(f"n{i}", port=1000 + i) for i in range(10_000)])
    for costs in (plan.COSTS_2_6, plan.COSTS_3_0):
        assert plan.reload_cost(costs, few, few) < plan.reload_cost(costs, few, many) \
            < plan.reload_cost(costs, many, many)


# --------------------------------------------------------------------------
# One server line for the config and for `add server`
# --------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["HTTP", "TCP", "GALERA"])
@pytest.mark.parametrize("extra", [{}, {"backup": True, "weight": 9}, {"condition": "DISABLED"},
                                   {"address": "::1"}])
def test_add_server_says_what_the_config_says(protocol, extra):
    first, added = node("a"), node("b", **{"address": "10.0.0.2", **extra})
    if protocol == "GALERA":
        added["backup"] = True
    old, new = lbs(protocol, [first]), lbs(protocol, [first, added])
    server_line = next(line for line in render.render_config(new, SETTINGS).splitlines()
                       if line.strip().startswith("server b "))
    add = lines(decide(old, new, NEW_HAPROXY))[0]
    assert add.split(" ", 3)[3] == server_line.strip().split(" ", 2)[2], (add, server_line)


# --------------------------------------------------------------------------
# What counts as done
# --------------------------------------------------------------------------

def test_expected_answers():
    old = lbs("TCP", [node("a"), node("b"), node("c")])
    new = lbs("TCP", [node("a", weight=2), node("b", address="10.0.0.5", condition="DISABLED"),
                      node("d", address="10.0.0.4")])
    answers = {"add": "New server registered.\n", "enable": "", "set": "",
               "del": "Server deleted.\n"}
    for command in decide(old, new).commands:
        answer = ("IP changed from '10.0.0.1' to '10.0.0.5', no need to change the port by 'stats socket command'\n"
                  if " addr " in command.line else answers[command.line.split()[0]])
        assert command.expect.match(answer), command.line
        assert not command.expect.match("No such server.\n"), command.line


def test_runtime_batches_keep_order_and_stay_within_a_line():
    old = lbs(nodes=[node(f"n{i}", port=1000 + i) for i in range(2_000)])
    new = lbs(nodes=[node(f"n{i}", port=1000 + i, weight=3) for i in range(2_000)])
    commands = decide(old, new).commands
    batches = list(runtime_batches(commands))
    assert len(batches) > 1
    assert [command for batch in batches for command in batch] == list(commands)
    assert all(len(";".join(command.line for command in batch)) < RUNTIME_LINE_BYTES for batch in batches)


def test_models_used_here_are_what_the_edge_makes():
    (lb,) = lbs()
    assert isinstance(lb.monitor, Monitor) and isinstance(lb.options, Options)


# --------------------------------------------------------------------------
# Server ids (HAProxy's `id`), kept across UPDATEs
# --------------------------------------------------------------------------

def test_server_ids_number_a_fresh_backend_in_order():
    assert server_ids(lbs(nodes=[node("a"), node("b"), node("c")])) == {"HTTP": {"a": 1, "b": 2, "c": 3}}


def test_a_node_keeps_its_id_and_a_new_one_takes_a_free_id():
    before = {"HTTP": {"a": 1, "b": 2, "c": 3}}
    # b removed, d and e added in the same UPDATE: b's id is still in use when they are added
    after = server_ids(lbs(nodes=[node("e"), node("c"), node("a"), node("d")]), before)
    assert after == {"HTTP": {"a": 1, "c": 3, "e": 4, "d": 5}}
    # the next UPDATE fills the gap b left
    assert server_ids(lbs(nodes=[node("a"), node("c"), node("d"), node("e"), node("f")]), after) == \
        {"HTTP": {"a": 1, "c": 3, "d": 5, "e": 4, "f": 2}}


def test_server_ids_are_per_backend():
    two = parse_update({"loadBalancers": [
        {"protocol": "HTTP", "port": 80, "nodes": [node("a"), node("b")]},
        {"protocol": "TCP", "port": 81, "nodes": [node("a"), node("x")]}]})
    assert server_ids(two, {"HTTP": {"b": 7}}) == {"HTTP": {"b": 7, "a": 1}, "TCP": {"a": 1, "x": 2}}


def test_config_and_add_server_name_the_same_kept_id():
    old = lbs("TCP", [node("a"), node("b"), node("c")])
    new = lbs("TCP", [node("a"), node("c"), node("d", address="10.0.0.4")])
    chosen = decide(old, new)
    assert lines(chosen)[0].startswith("add server tcp_servers/d 10.0.0.4:80 id 4 weight 1 ")
    assert [line.split()[4] for line in chosen.config.splitlines() if line.startswith("    server ")] == \
        ["1", "3", "4"]


def test_same_request_renders_the_same_ids_so_it_is_unchanged():
    old = lbs("TCP", [node("a"), node("b")])
    ids = server_ids(old, {"TCP": {"b": 1, "a": 2}})
    assert ids == {"TCP": {"a": 2, "b": 1}}
    applied = Applied(running=True, load_balancers=old, file_holds_config=True, server_ids=ids)
    text = render.render_config(old, SETTINGS, server_ids=server_ids(old, ids))
    assert plan_update(old, text, applied).kind == plan.UNCHANGED
    assert "server a 10.0.0.1:80 id 2 " in text and "server b 10.0.0.1:80 id 1 " in text


def test_a_server_id_that_is_not_a_positive_int_is_refused():
    for bad in (0, -1, "3", 2 ** 31, True):
        with pytest.raises(ValueError):
            render.render_config(lbs("TCP", [node("a")]), SETTINGS, server_ids={"TCP": {"a": bad}})
