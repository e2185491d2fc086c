"""Least privilege and secrets.

* The sudoers file grants nothing as shipped (service = process); its one
  commented system-mode rule is exactly `privileged_argvs()`: the user
  haproxy, `service haproxy start|stop|reload`, no file command, no socat
  (tests/test_sudo_probes.py tries escalations against both).
* A full scenario (UPDATE, UPDATE, SUSPEND, ENABLE, STATS, METRICS, DELETE,
  UPDATE) runs in-process on a real HAProxy through `HAProxyDriver` with
  `sudo = true` in process mode: nothing runs as root.
* The package's source: no shell, no eval/exec, no os.system/os.popen, no
  command built from a string (AST).
* Modes of what the worker creates, under a umask of 000: config 0644/0640,
  statsfile 0600 (its directory 0700), the driver's temp dir 0700.
* The object-store token, sent with every kind of job to a worker running
  with --debug: never in a reply, a log line, stderr or any file the worker
  writes.
"""
import ast
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from libra_worker import models, settings as settings_module
from libra_worker.drivers.haproxy import commands as commands_module
from libra_worker.drivers.haproxy.driver import HAProxyDriver, privileged_argvs, privileged_commands
from libra_worker.settings import HaproxySettings
from support.backends import HttpBackend
from support.client import GearClient
from support.faults import HostileHttpServer, mode_of
from support.ports import LOOPBACK, free_port
from support.traffic import backend_counts, lb, node, refuses, stop_haproxy, update, wait_until
from support.worker import HAPROXY, PROJECT, write_config

PACKAGE = PROJECT / "libra_worker"
DEBIAN = PROJECT / "debian"
README = PROJECT / "README.rst"
TOKEN_FIELD = "hpcs_object_store_token"


# ==========================================================================
# The sudoers file
# ==========================================================================

SUDOERS = DEBIAN / "sudoers.d" / "libra-worker"
SYSTEM_RULE = re.compile(r"^#(haproxy\s+ALL\s*=.*NOPASSWD:.*)$", re.M)


def parse_sudoers(text):
    """{user or %group: [argv as listed]} of the active rules (aliases expanded)."""
    text = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    aliases, rules = {}, {}
    for line in lines:
        alias = re.fullmatch(r"Cmnd_Alias\s+(.*)", line)
        if alias:
            for definition in alias.group(1).split(":"):
                name, _, commands = definition.partition("=")
                aliases[name.strip()] = [entry.strip() for entry in commands.split(",") if entry.strip()]
            continue
        rule = re.fullmatch(r"(%?[\w-]+)\s+ALL\s*=\s*(?:\([^)]*\)\s*)?(?:\w+:\s*)*(.*)", line)
        if rule:
            entries = []
            for entry in (part.strip() for part in rule.group(2).split(",")):
                entries.extend(aliases.get(entry, [entry]))
            rules.setdefault(rule.group(1), []).extend(entry.split() for entry in entries)
    return rules


def system_mode_text():
    text = SUDOERS.read_text()
    assert len(SYSTEM_RULE.findall(text)) == 1, f"{SUDOERS}: one commented system-mode rule expected"
    return SYSTEM_RULE.sub(r"\1", text)


def _visudo(text, tmp_path, name):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o440)
    if shutil.which("visudo") is None:
        pytest.fail("visudo not found (apt-get install sudo): the sudoers file is unchecked")
    check = subprocess.run(["visudo", "-cf", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and "arning" not in check.stdout + check.stderr, \
        f"visudo: {check.stdout} {check.stderr}"


@pytest.mark.no_haproxy
def test_shipped_sudoers_grants_nothing(tmp_path):
    """service = process, the packaged default, runs nothing as root: the file grants nothing."""
    _visudo(SUDOERS.read_text(), tmp_path, "shipped")
    assert parse_sudoers(SUDOERS.read_text()) == {}
    assert privileged_argvs(HaproxySettings()) == [] and HaproxySettings().service == "process"


@pytest.mark.no_haproxy
def test_system_mode_rule_is_exactly_what_system_mode_runs(tmp_path):
    text = system_mode_text()
    _visudo(text, tmp_path, "system")
    rules = parse_sudoers(text)
    # The user alone (not its group), exact argument lists, nothing that writes a file or runs socat.
    assert list(rules) == ["haproxy"], rules
    assert rules["haproxy"] == privileged_argvs(HaproxySettings(service="system")), rules
    assert all(os.path.isabs(argv[0]) and len(argv) > 1 for argv in rules["haproxy"]), rules
    banned = {"/bin/cp", "/bin/mv", "/bin/rm", "/usr/bin/socat", "/bin/sh", "ALL"}
    assert not banned & {argv[0] for argv in rules["haproxy"]}, rules
    # README shows the same rule.
    assert SYSTEM_RULE.search(SUDOERS.read_text()).group(1) in README.read_text(), \
        "README.rst does not show the system-mode sudo rule as the file has it"


@pytest.mark.no_haproxy
def test_every_service_action_the_worker_runs_is_granted():
    """service = system runs `service haproxy <action>`: each action it can run is in the rule."""
    rules = parse_sudoers(system_mode_text())["haproxy"]
    tree = ast.parse((PACKAGE / "drivers" / "haproxy" / "service.py").read_text())
    actions = {call.args[1].value for call in ast.walk(tree)
               if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
               and call.func.attr == "service" and len(call.args) == 2
               and all(isinstance(arg, ast.Constant) for arg in call.args)}
    assert {"start", "stop", "reload"} <= actions, actions
    for action in actions:
        assert [commands_module.SERVICE, "haproxy", action] in rules, f"`service haproxy {action}`"


# ==========================================================================
# The scenario, in-process, sudo = true
# ==========================================================================

@pytest.fixture
def permissive_umask():
    """umask 000 while the test runs: every mode the worker sets, it sets itself."""
    previous = os.umask(0)
    yield
    os.umask(previous)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """tempfile's directory for this test: the driver's private dir lands where it can be seen."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def _scenario_settings(tmp_path):
    ini = tmp_path / "worker.ini"
    write_config(ini, tmp_path, [f"{LOOPBACK}:{free_port()}"], name="privilege", extra_ini={
        "worker:haproxy": {"sudo": "true",
                           "statsfile": str(tmp_path / "lib" / "libra" / "haproxy.stats"),
                           "log_target": str(tmp_path / "haproxy" / "log.sock")}})
    return settings_module.load(["--config", str(ini), "--nodaemon"]).haproxy


def test_full_scenario_in_process_mode_runs_nothing_as_root(
        tmp_path, permissive_umask, private_tmp):
    settings = _scenario_settings(tmp_path)
    web = [HttpBackend(f"priv-{index}").start() for index in range(2)]
    driver = HAProxyDriver(settings)
    workdir = Path(driver.configs.workdir)
    port = free_port()
    first = models.parse_update(update(lb("HTTP", port, [node("a", web[0])])))
    second = models.parse_update(update(lb("HTTP", port, [node("a", web[0]), node("b", web[1])])))
    modes = {}
    try:
        assert workdir.parent == private_tmp and mode_of(workdir) == 0o700
        driver.start()

        driver.update(first)
        modes["config"] = mode_of(settings.config)
        modes["statsfile"] = mode_of(settings.statsfile)
        modes["statsfile dir"] = mode_of(os.path.dirname(settings.statsfile))
        assert backend_counts(port, 2) == {"priv-0": 2}
        driver.update(second)
        modes["config.BKUP"] = mode_of(settings.config + ".BKUP")
        assert set(backend_counts(port, 4)) == {"priv-0", "priv-1"}
        driver.suspend()
        wait_until(lambda: refuses(port), timeout=5, what="SUSPEND to close the port")
        driver.enable()
        assert set(backend_counts(port, 4)) == {"priv-0", "priv-1"}
        assert sorted(server for server, _ in driver.stats()) == ["a", "b"]
        report = driver.metrics()
        assert all(count >= 0 for _, count in report.bytes_out)
        modes["master socket"] = mode_of(settings.master_socket)
        modes["stats socket"] = mode_of(settings.stats_socket)
        if os.path.exists(settings.logfile):
            modes["haproxy log"] = mode_of(settings.logfile)
        driver.delete()
        assert not os.path.exists(settings.config)
        driver.update(first)
        assert backend_counts(port, 2) == {"priv-0": 2}
        modes["config (after DELETE)"] = mode_of(settings.config)
        leftovers = sorted(os.listdir(workdir))
    finally:
        driver.close()
        stop_haproxy(settings.config)
        for backend in web:
            backend.stop()

    # process mode runs nothing as root, even with sudo = true; no file goes through cp/mv/rm.
    assert list(driver.commands.privileged_log) == [], list(driver.commands.privileged_log)

    # Modes, with a umask of 000: no wider than needed.
    assert modes["config"] in (0o644, 0o640) and modes["config (after DELETE)"] in (0o644, 0o640), modes
    assert modes["config.BKUP"] in (0o644, 0o640, 0o600), modes
    assert modes["statsfile"] == 0o600, modes
    assert modes["statsfile dir"] == 0o700, modes
    assert modes["master socket"] & 0o077 == 0, modes
    assert modes["stats socket"] & 0o007 == 0, modes
    if "haproxy log" in modes:
        assert modes["haproxy log"] & 0o037 == 0, modes
    assert leftovers == [], f"candidates left in the private dir: {leftovers}"
    assert not workdir.exists(), "the driver's private dir outlived close()"


# ==========================================================================
# The package's source
# ==========================================================================

def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 10, files
    return [(path.relative_to(PROJECT), ast.parse(path.read_text(), str(path))) for path in files]


def _dotted(expression):
    parts = []
    while isinstance(expression, ast.Attribute):
        parts.append(expression.attr)
        expression = expression.value
    if isinstance(expression, ast.Name):
        parts.append(expression.id)
    return ".".join(reversed(parts))


FORBIDDEN_CALLS = {"eval", "exec", "compile", "os.system", "os.popen", "subprocess.getoutput",
                   "subprocess.getstatusoutput", "pty.spawn", "__import__"}
PROCESS_CALLS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
                 "subprocess.check_output"}
HELPER_CALLS = {"run", "privileged"}  # Commands.run / Commands.privileged (self.commands.run, ...)


def shell_problems(sources):
    """Calls that hand a string to a shell or an interpreter, in [(label, ast tree)]."""
    problems = []
    for where, tree in sources:
        for call in (item for item in ast.walk(tree) if isinstance(item, ast.Call)):
            name = _dotted(call.func)
            if name in FORBIDDEN_CALLS or re.fullmatch(r"os\.(spawn|exec)\w*", name):
                problems.append(f"{where}:{call.lineno}: {name}()")
            for keyword in call.keywords:
                if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant)
                                                  and keyword.value.value is False):
                    problems.append(f"{where}:{call.lineno}: shell={ast.unparse(keyword.value)}")
        for imported in (item for item in ast.walk(tree) if isinstance(item, (ast.Import, ast.ImportFrom))):
            names = [alias.name for alias in imported.names] + [getattr(imported, "module", None) or ""]
            if any(name in ("shlex", "commands", "pty") for name in names):
                problems.append(f"{where}:{imported.lineno}: imports {names}")
    return problems


def _stringy(expression):
    """True for an expression that builds a string (a command line) rather than a list."""
    if isinstance(expression, ast.Constant):
        return isinstance(expression.value, (str, bytes))
    if isinstance(expression, ast.JoinedStr):
        return True
    if isinstance(expression, ast.BinOp):
        return (isinstance(expression.op, ast.Mod) or _stringy(expression.left)
                or _stringy(expression.right))
    if isinstance(expression, ast.Call) and isinstance(expression.func, ast.Attribute):
        return expression.func.attr == "format" or (expression.func.attr == "join"
                                                    and _dotted(expression.func.value) != "os.path")
    return False


def string_commands(sources):
    """(process calls seen, calls whose command is built as a string) in [(label, ast tree)].

    A process call is subprocess.* or the helper's run()/privileged(); its first
    argument, or what that name is assigned in the same function, must not be
    a string expression.
    """
    problems, checked = [], 0
    for where, tree in sources:
        for function in (node for node in ast.walk(tree)
                         if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))):
            assigned = {}
            for statement in ast.walk(function):
                if isinstance(statement, ast.Assign):
                    for target in statement.targets:
                        if isinstance(target, ast.Name):
                            assigned.setdefault(target.id, []).append(statement.value)
            for call in (item for item in ast.walk(function) if isinstance(item, ast.Call)):
                name = _dotted(call.func)
                receiver = _dotted(call.func.value) if isinstance(call.func, ast.Attribute) else ""
                is_process = name in PROCESS_CALLS or (
                    isinstance(call.func, ast.Attribute) and call.func.attr in HELPER_CALLS
                    and (receiver.endswith("commands") or receiver == "self"))
                if not is_process or not call.args:
                    continue
                checked += 1
                argv = call.args[0]
                values = assigned.get(argv.id, []) if isinstance(argv, ast.Name) else [argv]
                for value in values or [argv]:
                    if _stringy(value):
                        problems.append(f"{where}:{call.lineno}: {name}({ast.unparse(value)[:80]})")
    return checked, problems


BAD_EXAMPLES = {
    "shell=True": "import subprocess\ndef f(x):\n    subprocess.run(['ls', x], shell=True)\n",
    "os.system": "import os\ndef f(x):\n    os.system('rm ' + x)\n",
    "os.popen": "import os\ndef f(x):\n    return os.popen(x).read()\n",
    "eval": "def f(x):\n    return eval(x)\n",
    "exec": "def f(x):\n    exec(x)\n",
    "shlex": "import shlex, subprocess\ndef f(x):\n    subprocess.run(shlex.split(x))\n",
}
BAD_COMMANDS = {
    "f-string": "import subprocess\ndef f(x):\n    subprocess.run(f'/bin/rm {x}')\n",
    "concatenated": "def f(self, x):\n    self.commands.privileged('/bin/cp ' + x)\n",
    "joined": "def f(self, x):\n    argv = ' '.join(['/bin/mv', x])\n    self.commands.run(argv)\n",
    "formatted": "import subprocess\ndef f(x):\n    subprocess.Popen('/bin/cp {}'.format(x))\n",
    "percent": "def f(self, x):\n    self.run('/bin/rm %s' % x)\n",
}


@pytest.mark.no_haproxy
def test_the_source_checks_catch_what_they_look_for():
    for label, code in BAD_EXAMPLES.items():
        assert shell_problems([(label, ast.parse(code))]), f"the shell check misses {label}"
    for label, code in BAD_COMMANDS.items():
        checked, problems = string_commands([(label, ast.parse(code))])
        assert checked == 1 and problems, f"the argument-list check misses {label}"
    good = "import subprocess\ndef f(self, x):\n    argv = ['/bin/cp', '--', x, x + '.NEW']\n" \
           "    self.commands.privileged(argv)\n    subprocess.run([SUDO, '-n', *argv])\n"
    assert string_commands([("good", ast.parse(good))]) == (2, [])


@pytest.mark.no_haproxy
def test_no_shell_no_eval_no_os_system():
    problems = shell_problems(_sources())
    assert not problems, problems


@pytest.mark.no_haproxy
def test_every_command_is_an_argument_list():
    """Each process started (subprocess.*, Commands.run/privileged) gets a list, never a string."""
    checked, problems = string_commands(_sources())
    assert checked >= 5, f"only {checked} process calls found: is the check still looking?"
    assert not problems, problems


@pytest.mark.no_haproxy
def test_privileged_command_paths_are_absolute():
    for name in ("SUDO", "SERVICE"):
        assert os.path.isabs(getattr(commands_module, name)), name
    for name in ("CP", "MV", "RM"):
        assert not hasattr(commands_module, name), f"files go through {name} again"
    for service in ("system", "process"):
        assert all(os.path.isabs(command) for command in privileged_commands(HaproxySettings(service=service)))


# ==========================================================================
# The token
# ==========================================================================

def _tokens():
    core = uuid.uuid4().hex
    return {
        "plain": f"AUTH_tk{core}a",
        "quoted": f'AUTH_tk"{core}b\\x',
        "spaced": f"AUTH tk {core}c",
        "unicode": f"AUTH_\u0442\u043e\u043a{core}d",
        "number": int("7" + str(int(core[:12], 16))),
        "list": [f"AUTH_tk{core}e"],
        "object": {"token": f"AUTH_tk{core}f"},
    }


def _needles(token):
    """Every form a leaked token could take in a log or a reply."""
    if isinstance(token, (list, dict)):
        return {needle for value in (token.values() if isinstance(token, dict) else token)
                for needle in _needles(value)}
    text = str(token)
    needles = {text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]}
    needles.update(part for part in re.split(r"[^0-9A-Za-z]", text) if len(part) >= 12)
    return needles


def test_token_never_reaches_logs_or_replies(tmp_path, worker, gearmand):
    web = HttpBackend("token-web").start()
    stores = [HostileHttpServer(401).start(), HostileHttpServer(503).start()]
    process = worker(args=["--debug"])
    config = process.sections["worker:haproxy"]["config"]
    # A log for ARCHIVE to upload, so that it goes as far as talking to the object store.
    Path(process.sections["worker:haproxy"]["logfile"]).write_text(
        "Nov 22 18:26:39 device haproxy[1]: Proxy http started.\n")
    port = free_port()
    tokens = _tokens()
    endpoints = [f"http://{LOOPBACK}:{free_port()}/v1/AUTH_test"] + [
        f"http://{LOOPBACK}:{store.port}/v1/AUTH_test" for store in stores]
    archives = [{"hpcs_action": "ARCHIVE", "hpcs_object_store_type": "swift",
                 "hpcs_object_store_basepath": "lbaas-logs", "hpcs_object_store_endpoint": endpoint,
                 "loadBalancers": [{"id": "7", "protocol": "HTTP"}]} for endpoint in endpoints]
    valid = update(lb("HTTP", port, [node("n1", web)]))
    messages = []
    for kind, token in tokens.items():
        for base in (*archives, valid, {"hpcs_action": "STATS"},
                     {"hpcs_action": "METRICS"}, {"hpcs_action": "DISCOVER"}, {"hpcs_action": "DIAGNOSTICS"},
                     {"hpcs_action": "NO_SUCH_ACTION"}, {"loadBalancers": "no action"},
                     update(lb("HTTP", port, [{"id": "bad id"}]))):
            messages.append((kind, token, json.dumps({**base, TOKEN_FIELD: token}).encode()))
    plain = tokens["plain"]
    messages += [
        ("twice", plain, f'{{"hpcs_action": "DISCOVER", "{TOKEN_FIELD}": "{plain}x", '
                         f'"{TOKEN_FIELD}": "{plain}"}}'.encode()),
        ("not-json", plain, f'{{"hpcs_action": "DISCOVER", "{TOKEN_FIELD}": "{plain}"'.encode()),
        ("not-object", plain, json.dumps([{TOKEN_FIELD: plain}]).encode()),
    ]
    replies = []
    try:
        with GearClient([gearmand]) as client:
            for kind, token, payload in messages:
                raw = client.submit_raw(process.name, payload, timeout=30, alive=process.alive)
                replies.append((kind, token, payload, raw))
        process.stop()
    finally:
        stop_haproxy(config)
        web.stop()
        for store in stores:
            store.stop()
    assert all(store.tokens_seen for store in stores), "ARCHIVE never reached the object store"

    passed = {json.loads(raw)["hpcs_action"] for _, _, _, raw in replies
              if json.loads(raw).get("hpcs_response") == "PASS"}
    assert {"UPDATE", "DISCOVER", "METRICS"} <= passed, f"the scenario did not reach the actions: {passed}"
    for kind, token, payload, raw in replies:
        leaked = [needle for needle in _needles(token) if needle.encode() in raw]
        assert not leaked, f"token ({kind}) in the reply to {payload[:60]!r}: {raw[:300]!r}"
        reply = json.loads(raw)
        if TOKEN_FIELD in reply:
            assert reply[TOKEN_FIELD] == "*****", reply[TOKEN_FIELD]

    log = process.log_text()
    assert "request:" in log and "*****" in log, "--debug did not log the requests: nothing was tested"
    texts = {"log": log, "stderr": process.stderr_text(), "stdout": process.stdout_text()}
    for path in Path(process.dir).rglob("*"):
        if path.is_file():
            texts[str(path.relative_to(process.dir))] = path.read_bytes().decode("utf-8", "replace")
    for kind, token in tokens.items():
        for where, text in texts.items():
            leaked = [needle for needle in _needles(token) if needle in text]
            assert not leaked, f"token ({kind}) found in {where}: {leaked[:2]}"


# ==========================================================================
# The rendered config: HAProxy's privileges in each mode
# ==========================================================================

def test_system_mode_config_drops_to_haproxy_in_a_chroot_and_process_mode_does_not(tmp_path):
    from libra_worker.drivers.haproxy import render
    lbs = models.parse_update(update(lb("HTTP", 8080, [{"id": "a", "address": "127.0.0.1", "port": 80}])))
    common = dict(pidfile=str(tmp_path / "h.pid"), stats_socket=str(tmp_path / "s.sock"),
                  log_target="/dev/log", bind_address="127.0.0.1")
    system = render.render_config(lbs, HaproxySettings(service="system", **common))
    process = render.render_config(lbs, HaproxySettings(service="process", **common))
    global_system = system.split("defaults")[0].split()
    assert "chroot" in global_system and global_system[global_system.index("chroot") + 1] == "/var/lib/haproxy"
    assert global_system[global_system.index("user") + 1] == "haproxy"
    assert global_system[global_system.index("group") + 1] == "haproxy"
    for keyword in ("chroot", "user", "group"):
        assert keyword not in process.split("defaults")[0].split(), f"process mode renders {keyword}"
    # HAProxy itself accepts both.
    for text in (system, process):
        path = tmp_path / "candidate.cfg"
        path.write_text(text)
        check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.no_haproxy
def test_system_mode_refuses_a_pid_file_the_worker_could_aim(tmp_path):
    from libra_worker import preflight
    worker_dir = tmp_path / "run"
    worker_dir.mkdir(mode=0o777)
    worker_dir.chmod(0o777)
    ini = tmp_path / "worker.ini"
    write_config(ini, tmp_path, [f"{LOOPBACK}:{free_port()}"], name="pid", extra_ini={
        "worker:haproxy": {"service": "system", "pidfile": str(worker_dir / "haproxy.pid")}})
    loaded = settings_module.load(["--config", str(ini), "--nodaemon"])
    problems = preflight.root_path_problems(loaded)
    assert len(problems) == 1 and str(worker_dir) in problems[0], problems
    fine = settings_module.load(["--config", str(ini), "--nodaemon"])
    fine = fine.__class__(**{**fine.__dict__, "haproxy": fine.haproxy.__class__(
        **{**fine.haproxy.__dict__, "pidfile": "/run/haproxy.pid"})})
    assert preflight.root_path_problems(fine) == []
