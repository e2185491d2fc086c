"""libra_worker.drivers.haproxy.render: typed load balancers → HAProxy config.

Rendered configs are compared whole against tests/data/render/*.cfg, and
every config rendered here must pass `haproxy -c`.
"""
import dataclasses
import os
import re
import shutil
import subprocess
import time

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from hypothesis import strategies as st

from libra_worker.drivers.haproxy import render
from libra_worker.drivers.haproxy.render import backend_name, frontend_name, render_config
from libra_worker.errors import BadRequest, ConfigError
from libra_worker.models import LoadBalancer, Monitor, Node, Options, parse_update
from libra_worker.settings import HaproxySettings

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "render")
HAPROXY = os.environ.get("LIBRA_TEST_HAPROXY") or shutil.which("haproxy") or "/usr/sbin/haproxy"

# The settings the expected files were rendered with.
SETTINGS = HaproxySettings(pidfile="/run/libra-test/haproxy.pid",
                           stats_socket="/run/libra-test/haproxy-stats.socket",
                           log_target="/dev/log", bind_address="127.0.0.1")

HTTP_WITH_MONITOR = {"hpcs_action": "UPDATE", "loadBalancers": [{
    "name": "web", "protocol": "HTTP", "port": "18080", "algorithm": "LEAST_CONNECTIONS",
    "monitor": {"type": "HTTP", "delay": "10", "timeout": "4", "attempts": "3",
                "path": "/health?full=1"},
    "options": {"client_timeout": 60000, "server_timeout": "45000", "connect_timeout": 5000,
                "connect_retries": 2},
    "nodes": [
        {"id": 101, "address": "10.0.0.1", "port": "8080", "weight": "1"},
        {"id": "102", "address": "2001:DB8::2", "port": 8080, "weight": 10},
        {"id": "web-3.b_c", "address": "localhost", "port": 8081, "backup": "true"}]}]}

TCP_ON_IPV6 = {"hpcs_action": "UPDATE", "loadBalancers": [{
    "protocol": "tcp", "port": 13000,
    "monitor": {"type": "CONNECT", "delay": 5, "timeout": 5, "attempts": 2},
    "nodes": [
        {"id": "1", "address": "127.0.0.1", "port": 3001},
        {"id": "2", "address": "::1", "port": 3002, "weight": 256, "backup": True}]}]}

HTTP_AND_TCP = {"hpcs_action": "UPDATE", "loadBalancers": [
    {"protocol": "HTTP", "port": 18081,
     "nodes": [{"id": "a", "address": "127.0.0.1", "port": 9001},
               {"id": "b", "address": "127.0.0.1", "port": 9002}]},
    {"protocol": "TCP", "port": 18082, "algorithm": "least_connections",
     "options": {"connect_retries": 0},
     "nodes": [{"id": "a", "address": "127.0.0.1", "port": 9003}]}]}

GALERA = {"hpcs_action": "UPDATE", "loadBalancers": [{
    "protocol": "GALERA", "port": 13306,
    "monitor": {"type": "HTTP", "delay": 3, "timeout": 2, "attempts": 1, "path": "/"},
    "nodes": [
        {"id": "db1", "address": "127.0.0.1", "port": 3306},
        {"id": "db2", "address": "127.0.0.2", "port": 3306, "backup": "True"},
        {"id": "db3", "address": "127.0.0.3", "port": 3306, "backup": True}]}]}

CASES = {  # expected file → (message, settings changes, render keywords)
    "http_monitor.cfg": (HTTP_WITH_MONITOR, {}, {}),
    "tcp_ipv6.cfg": (TCP_ON_IPV6, {"bind_address": "::"}, {}),
    "http_tcp.cfg": (HTTP_AND_TCP, {}, {"user": "nobody", "group": "nogroup"}),
    "galera.cfg": (GALERA, {}, {}),
}


def render_case(name, **settings_changes):
    message, changes, keywords = CASES[name]
    settings = dataclasses.replace(SETTINGS, **{**changes, **settings_changes})
    return render_config(parse_update(message), settings, **keywords)


def in_tmp(tmp_path):
    """Settings changes that keep pid file, stats socket and statsfile inside tmp_path.

    The server-state file beside the statsfile is there, empty, as the worker leaves it.
    """
    (tmp_path / "haproxy.server-state").write_text("1\n")
    return {"pidfile": str(tmp_path / "haproxy.pid"),
            "stats_socket": str(tmp_path / "stats.sock"),
            "statsfile": str(tmp_path / "haproxy.stats")}


def haproxy_check(text, tmp_path, name="haproxy.cfg"):
    if not os.access(HAPROXY, os.X_OK):
        pytest.skip(f"{HAPROXY} is not installed")
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    result = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True,
                            text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def server_lines(text):
    return [line for line in text.splitlines() if line.startswith("    server ")]


# --------------------------------------------------------------------------
# Whole configs
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.no_haproxy
def test_rendered_config_matches_expected_file(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as stream:
        expected = stream.read()
    assert render_case(name) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_config_passes_haproxy_check(name, tmp_path):
    text = render_case(name, **in_tmp(tmp_path))
    assert str(tmp_path / "stats.sock") in text
    code, output = haproxy_check(text, tmp_path)
    assert code == 0, output
    assert "[ALERT]" not in output and "[WARNING]" not in output, output


def test_haproxy_check_rejects_a_broken_config(tmp_path):
    # The check above can fail: a config with a typo does not pass.
    text = render_case("tcp_ipv6.cfg", **in_tmp(tmp_path)).replace("balance", "balanse")
    code, output = haproxy_check(text, tmp_path)
    assert code != 0 and "balanse" in output


# --------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------

@pytest.mark.parametrize("protocol, frontend, backend", [
    ("HTTP", "http", "http_servers"), ("TCP", "tcp", "tcp_servers"),
    ("GALERA", "galera", "galera_servers")])
@pytest.mark.no_haproxy
def test_names(protocol, frontend, backend):
    assert frontend_name(protocol) == frontend
    assert backend_name(protocol) == backend
    text = render_config((lb(protocol),), SETTINGS)
    assert f"\nfrontend {frontend}\n" in text
    assert f"\nbackend {backend}\n" in text
    assert f"    default_backend {backend}\n" in text


@pytest.mark.no_haproxy
def test_unknown_protocol_name_is_an_error():
    with pytest.raises(ValueError):
        frontend_name("UDP")
    with pytest.raises(ValueError):
        backend_name("UDP")


def lb(protocol="HTTP", nodes=None, monitor=None, options=Options(), port=18080):
    if nodes is None:
        nodes = (Node("n1", "127.0.0.1", 9000),)
    return LoadBalancer(protocol=protocol, port=port, algorithm="ROUND_ROBIN",
                        nodes=tuple(nodes), monitor=monitor, options=options)


@pytest.mark.no_haproxy
def test_user_and_group_only_when_given():
    plain = render_config((lb(),), SETTINGS)
    assert "    user " not in plain and "    group " not in plain
    both = render_config((lb(),), SETTINGS, user="haproxy", group="haproxy")
    assert "\n    user haproxy\n    group haproxy\n" in both
    only_user = render_config((lb(),), SETTINGS, user="haproxy")
    assert "    user haproxy\n" in only_user and "    group " not in only_user


@pytest.mark.no_haproxy
def test_global_section_carries_the_settings():
    settings = HaproxySettings(pidfile="/tmp/x/h.pid", stats_socket="/tmp/x/s.sock",
                               log_target="127.0.0.1:514")
    text = render_config((lb(),), settings)
    assert "    log 127.0.0.1:514 local0\n" in text
    assert "    pidfile /tmp/x/h.pid\n" in text
    assert "    stats socket /tmp/x/s.sock mode 660 level admin expose-fd listeners\n" in text
    assert "    hard-stop-after 30s\n" in text


@pytest.mark.no_haproxy
def test_without_monitor_servers_get_a_default_tcp_check():
    text = render_config((lb(),), SETTINGS)
    assert server_lines(text) == [
        "    server n1 127.0.0.1:9000 id 1 weight 1 check inter 5s rise 2 fall 3 cookie n1"]
    assert "httpchk" not in text and "timeout check 5s\n" in text  # defaults only


@pytest.mark.no_haproxy
def test_connect_monitor_has_no_http_check():
    mon = Monitor(type="CONNECT", delay=7, timeout=3, attempts=4, path="/ignored")
    text = render_config((lb("TCP", monitor=mon),), SETTINGS)
    assert "httpchk" not in text and "/ignored" not in text
    assert "    timeout check 3s\n" in text
    assert server_lines(text) == ["    server n1 127.0.0.1:9000 id 1 weight 1 check inter 7s rise 4 fall 4"]


def test_ipv6_bind_address_and_stickiness_key(tmp_path):
    settings = dataclasses.replace(SETTINGS, bind_address="::1", **in_tmp(tmp_path))
    text = render_config((lb("TCP"),), settings)
    assert "    bind [::1]:18080\n" in text
    assert "    stick-table type ipv6 size 200k expire 30m\n" in text
    code, output = haproxy_check(text, tmp_path)
    assert code == 0, output


# --------------------------------------------------------------------------
# Nothing from a job adds a line
# --------------------------------------------------------------------------

@pytest.mark.parametrize("node", [
    Node("a\nserver evil 1.2.3.4:80", "127.0.0.1", 80),
    Node("a b", "127.0.0.1", 80),
    Node("a#b", "127.0.0.1", 80),
    Node("n1", "127.0.0.1\n", 80),
    Node("n1", "127.0.0.1", "80\nlisten x"),
    Node("n1", "127.0.0.1", 80, weight="1 backup"),
    Node("n1", "{x}", 80),
    Node("n1", "127.0.0.1", True),
    Node("n1", "127.0.0.1", 80, backup=1),
    Node("n1", "127.0.0.1", 80, enabled="no"),
    Node(7, "127.0.0.1", 80),
])
@pytest.mark.no_haproxy
@pytest.mark.parametrize("among", [0, 1, 2, 3])
def test_hand_built_models_with_unsafe_values_are_refused(node, among):
    """Alone, or first, in the middle or last of good nodes (render checks them in bulk)."""
    good = [Node(f"good-{index}", "127.0.0.1", 8000 + index) for index in range(2)]
    nodes = [node] if among == 0 else (good[:among - 1] + [node] + good[among - 1:])
    with pytest.raises(ValueError):
        render_config((lb(nodes=nodes),), SETTINGS)


@pytest.mark.no_haproxy
def test_hand_built_monitor_path_with_a_newline_is_refused():
    mon = Monitor(type="HTTP", delay=5, timeout=5, attempts=2, path="/\nlisten evil")
    with pytest.raises(ValueError):
        render_config((lb(monitor=mon),), SETTINGS)


@pytest.mark.parametrize("option, value", [
    ("pidfile", "/run/a b.pid"), ("stats_socket", "/run/s.sock\nlisten x"),
    ("log_target", "/dev/log #"), ("bind_address", "")])
@pytest.mark.no_haproxy
def test_unsafe_settings_are_refused(option, value):
    with pytest.raises(ConfigError) as caught:
        render_config((lb(),), dataclasses.replace(SETTINGS, **{option: value}))
    assert option in str(caught.value)


@pytest.mark.no_haproxy
def test_unsafe_user_is_refused():
    with pytest.raises(ValueError):
        render_config((lb(),), SETTINGS, user="root\n    daemon")


BASELINE = render_config(parse_update(HTTP_WITH_MONITOR), SETTINGS).count("\n")
NASTY = st.text(alphabet=st.sampled_from(list("ab/.:-_#{}\"'\\ \t\n\r%$;1") + ["\x00", "\u2028"]),
                max_size=20)


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(["id", "address", "path"]), value=NASTY)
@pytest.mark.no_haproxy
def test_no_string_from_a_job_adds_a_line(field, value):
    message = {"loadBalancers": [dict(HTTP_WITH_MONITOR["loadBalancers"][0])]}
    lb_raw = message["loadBalancers"][0]
    if field == "path":
        lb_raw["monitor"] = dict(lb_raw["monitor"], path=value)
    else:
        lb_raw["nodes"] = [dict(lb_raw["nodes"][0], **{field: value})] + lb_raw["nodes"][1:]
    try:
        lbs = parse_update(message)
    except BadRequest:
        return
    text = render_config(lbs, SETTINGS)
    assert text.count("\n") == BASELINE
    assert all(re.fullmatch(r"[ -~]*", line) for line in text.splitlines())
    assert "#" not in haproxy_unquoted(text.split("\nglobal\n", 1)[1])


def haproxy_unquoted(text):
    """`text` without what HAProxy's tokenizer reads as quoted or escaped: a '#' left is a comment."""
    out, quote, escaped = [], None, False
    for char in text:
        if escaped:
            escaped = False
        elif quote:
            if char == quote:
                quote = None
        elif char == "\\":
            escaped = True
        elif char in "'\"":
            quote = char
        else:
            out.append(char)
    return "".join(out)


# --------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------

def test_ten_thousand_nodes(tmp_path):
    nodes = [{"id": i, "address": f"10.{i // 250}.{i % 250}.1", "port": 8000 + i % 100,
              "weight": 1 + i % 256} for i in range(10_000)]
    message = {"loadBalancers": [{"protocol": "HTTP", "port": 18080, "nodes": nodes,
                                  "monitor": {"type": "HTTP", "delay": 30, "timeout": 10,
                                              "attempts": 2, "path": "/"}}]}
    settings = dataclasses.replace(SETTINGS, **in_tmp(tmp_path))
    started = time.perf_counter()
    lbs = parse_update(message)
    parsed = time.perf_counter()
    text = render_config(lbs, settings)
    rendered = time.perf_counter()
    print(f"\n10,000 nodes: parse {parsed - started:.3f}s, render {rendered - parsed:.3f}s")
    lines = server_lines(text)
    assert len(lines) == 10_000
    assert lines[-1] == ("    server 9999 10.39.249.1:8099 id 10000 weight 16 check inter 30s rise 2 "
                         "fall 2 cookie 9999")
    code, output = haproxy_check(text, tmp_path)
    assert code == 0, output[:2000]


@pytest.mark.no_haproxy
def test_environment_is_cached():
    assert render.environment() is render.environment()
    assert render.environment().undefined is jinja2.StrictUndefined
