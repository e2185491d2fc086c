"""Least privilege and secrets.

* A full scenario (UPDATE, UPDATE, SUSPEND, ENABLE, STATS, METRICS, DELETE,
  UPDATE) runs in-process on a real HAProxy through `HAProxyDriver` with
  `sudo = true`; every command its one privileged helper ran is compared
  with the sudoers file the package installs: absolute paths, argument lists,
  only the files the worker owns, nothing the sudoers file does not grant.
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
from libra_worker.drivers.haproxy.driver import HAProxyDriver, privileged_commands
from libra_worker.settings import HaproxySettings
from support.backends import HttpBackend
from support.client import GearClient
from support.faults import HostileHttpServer, mode_of
from support.ports import LOOPBACK, free_port
from support.traffic import backend_counts, lb, node, refuses, stop_haproxy, update, wait_until
from support.worker import PROJECT, write_config

PACKAGE = PROJECT / "libra_worker"
DEBIAN = PROJECT / "debian"
README = PROJECT / "README.rst"
TOKEN_FIELD = "hpcs_object_store_token"


# ==========================================================================
# The sudoers file
# ==========================================================================

def find_sudoers():
    """The sudoers file the package installs (a file under debian/ with a NOPASSWD rule), or None."""
    if not DEBIAN.is_dir():
        return None
    for path in sorted(DEBIAN.rglob("*")):
        if path.is_file() and not path.name.endswith((".sh", ".py")):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if re.search(r"^\s*%?\w[\w-]*\s+ALL\s*=.*NOPASSWD:", text, re.M):
                return path
    return None


def parse_sudoers(text):
    """{user or %group: [(command path, args or None)]}: args None means any arguments."""
    text = re.sub(r"\\\n", " ", text)
    lines = [line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
             for line in text.splitlines()]
    aliases, rules = {}, {}
    for line in filter(None, lines):
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
            rules.setdefault(rule.group(1), []).extend(_command(entry) for entry in entries)
    return rules


def _command(entry):
    words = entry.split()
    return words[0], (words[1:] if len(words) > 1 else None)


def granted(rules, argv):
    """Does some rule allow this argv, with sudo's matching (no args listed = any args)?"""
    for path, args in rules:
        if path == argv[0] and (args is None or args == argv[1:] or (args == ['""'] and len(argv) == 1)):
            return True
    return False


def readme_sudoers_paths():
    match = re.search(r"%haproxy\s+ALL\s*=\s*NOPASSWD:\s*(.+)", README.read_text())
    return {entry.strip().split()[0] for entry in match.group(1).split(",")} if match else None


@pytest.fixture(scope="module")
def sudoers():
    """(rules for the haproxy group, where they came from)."""
    path = find_sudoers()
    if path is None:
        # Not packaged yet: the list the code itself declares is all there is to compare with.
        system = HaproxySettings(service="system")
        return [(command, None) for command in privileged_commands(system)], \
            "privileged_commands() (no sudoers file under debian/ yet)"
    rules = parse_sudoers(path.read_text())
    assert "%haproxy" in rules, f"{path} has no rule for %haproxy: {rules}"
    return rules["%haproxy"], str(path.relative_to(PROJECT))


def test_sudoers_file_is_valid_and_grants_exactly_the_privileged_commands(sudoers):
    rules, source = sudoers
    path = find_sudoers()
    if path is not None and shutil.which("visudo"):
        check = subprocess.run(["visudo", "-cf", str(path)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"visudo rejects {source}: {check.stdout} {check.stderr}"
    system = HaproxySettings(service="system")
    assert {command for command, _ in rules} == set(privileged_commands(system)), source
    assert all(os.path.isabs(command) for command, _ in rules), rules
    documented = readme_sudoers_paths()
    if documented is not None:
        assert documented == set(privileged_commands(system)), "README.rst's sudoers line differs"


def test_every_service_action_the_worker_runs_is_granted(sudoers):
    """service = system runs `service haproxy <action>`: each action it can run is in sudoers."""
    rules, source = sudoers
    tree = ast.parse((PACKAGE / "drivers" / "haproxy" / "service.py").read_text())
    actions = {call.args[1].value for call in ast.walk(tree)
               if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
               and call.func.attr == "service" and len(call.args) == 2
               and all(isinstance(arg, ast.Constant) for arg in call.args)}
    assert {"start", "stop", "reload"} <= actions, actions
    for action in actions:
        assert granted(rules, [commands_module.SERVICE, "haproxy", action]), \
            f"{source} does not grant `service haproxy {action}`"


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


def test_full_scenario_runs_only_granted_commands_on_the_workers_own_files(
        tmp_path, sudoers, permissive_umask, private_tmp):
    rules, source = sudoers
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

    # What ran as root: only granted commands, by absolute path, as argument lists,
    # on the worker's own files (and its private candidates).
    ran = driver.commands.privileged_log
    assert ran, "the scenario ran nothing through the privileged helper"
    assert {argv[0] for argv in ran} >= {commands_module.CP, commands_module.MV, commands_module.RM}
    own = {settings.config, settings.config + ".BKUP", settings.config + ".NEW", settings.logfile}
    allowed_options = {commands_module.CP: set(), commands_module.MV: {"-f"}, commands_module.RM: {"-f"}}
    for argv in ran:
        assert isinstance(argv, list) and all(isinstance(word, str) for word in argv), argv
        assert os.path.isabs(argv[0]), f"not an absolute path: {argv}"
        assert granted(rules, argv), f"{source} does not grant {argv}"
        if argv[0] in allowed_options:
            assert "--" in argv, f"paths not separated from options: {argv}"
            options, paths = argv[1:argv.index("--")], argv[argv.index("--") + 1:]
            assert set(options) <= allowed_options[argv[0]], argv
            for path in paths:
                assert path in own or Path(path).parent == workdir, f"{argv[0]} on a file not the worker's: {path}"

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


def test_the_source_checks_catch_what_they_look_for():
    for label, code in BAD_EXAMPLES.items():
        assert shell_problems([(label, ast.parse(code))]), f"the shell check misses {label}"
    for label, code in BAD_COMMANDS.items():
        checked, problems = string_commands([(label, ast.parse(code))])
        assert checked == 1 and problems, f"the argument-list check misses {label}"
    good = "import subprocess\ndef f(self, x):\n    argv = ['/bin/cp', '--', x, x + '.NEW']\n" \
           "    self.commands.privileged(argv)\n    subprocess.run([SUDO, '-n', *argv])\n"
    assert string_commands([("good", ast.parse(good))]) == (2, [])


def test_no_shell_no_eval_no_os_system():
    problems = shell_problems(_sources())
    assert not problems, problems


def test_every_command_is_an_argument_list():
    """Each process started (subprocess.*, Commands.run/privileged) gets a list, never a string."""
    checked, problems = string_commands(_sources())
    assert checked >= 5, f"only {checked} process calls found: is the check still looking?"
    assert not problems, problems


def test_privileged_command_paths_are_absolute():
    for name in ("SUDO", "CP", "MV", "RM", "SERVICE"):
        assert os.path.isabs(getattr(commands_module, name)), name
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
