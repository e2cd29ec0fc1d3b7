"""The README's first command works: scripts/run starts the sample gateway, whose
walkthrough requests are allowed, denied and recorded."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
import requests

from addons.engine.store import Store
from addons.evidence.timeline import Record, Selection
from addons.evidence.timeline import approvals as approvals_of
from tests.support.gateway import ROOT
from tests.support.kubectl import clean_env
from tests.support.pgbridge import psql
from tests.support.servers import free_port


def walkthrough_kubectl(tmp_path, env, port):
    """kubectl set up the way scripts/run prints: a token, `custody kubeconfig`, KUBECONFIG."""
    custody_env = {**env, "CUSTODY_CONFIG": str(ROOT / "examples" / "custody.yaml")}
    token = subprocess.run([str(ROOT / ".venv" / "bin" / "custody"), "token", "--sub", "crew-ops", "--groups",
                            "k8s-operators", "--ttl", "1h"], capture_output=True, text=True, check=True,
                           env=custody_env).stdout
    (tmp_path / "ops.jwt").write_text(token)
    subprocess.run([str(ROOT / ".venv" / "bin" / "custody"), "kubeconfig", "--connection", "prod-k8s", "--token-file",
                    str(tmp_path / "ops.jwt"), "--proxy-url", f"http://127.0.0.1:{port}", "--confdir",
                    str(ROOT / ".custody" / "mitmproxy"), "-o", str(tmp_path / "ops.kubeconfig")],
                   capture_output=True, text=True, check=True, env=custody_env)
    kube_env = clean_env(KUBECONFIG=str(tmp_path / "ops.kubeconfig"), KUBECACHEDIR=str(tmp_path / "kube-cache"))
    return lambda *args: subprocess.run(["kubectl", *args], capture_output=True, text=True, env=kube_env, timeout=60)


async def ssh_walkthrough(token: str, *commands: str) -> list:
    """The walkthrough's ssh commands, with asyncssh (the token as the password)."""
    async with asyncssh.connect("127.0.0.1", 2222, username="agent", password=token, known_hosts=None,
                                client_keys=None, agent_path=None, config=None) as conn:
        return [await conn.run(c, check=False) for c in commands]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """scripts/run, as a user starts it: the gateway on the embedded defaults with every sample.
    Its ports are fixed, so there is one per module (scripts/test distributes by file)."""
    tmp_path = tmp_path_factory.mktemp("stack")
    port = free_port()
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen([str(ROOT / "scripts" / "run"), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while f"proxy listening at *:{port}" not in (tmp_path / "run.log").read_text():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        yield Stack(port, env, tmp_path)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


@dataclass
class Stack:
    port: int
    env: dict
    dir: Path

    def custody(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / ".venv" / "bin" / "custody"), *args], capture_output=True, text=True,
                              env={**self.env, "CUSTODY_CONFIG": str(ROOT / "examples" / "custody.yaml")}, timeout=60)


def test_scripts_run_serves_the_walkthrough(stack, tmp_path):
    port, env = stack.port, stack.env
    output = (stack.dir / "run.log").read_text()
    assert re.search(r"TOKEN=\$\(custody token --sub crew-analyst --groups analysts", output)
    token = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "custody"), "token", "--sub", "crew-analyst", "--groups", "analysts"],
        capture_output=True, text=True, check=True,
        env={**env, "CUSTODY_CONFIG": str(ROOT / "examples" / "custody.yaml")},
    ).stdout.strip()
    proxies = {"http": f"http://agent:{token}@127.0.0.1:{port}"}
    ok = requests.get("http://sample-api.internal/items", proxies=proxies, timeout=10)
    assert ok.status_code == 200 and ok.json()[0]["name"] == "bolt M6"
    denied = requests.delete("http://sample-api.internal/items/1", proxies=proxies, timeout=10)
    assert denied.status_code == 403 and denied.json()["rules"] == ["no-deletes"]
    kubectl = walkthrough_kubectl(tmp_path, env, port)
    pods = kubectl("get", "pods", "-n", "shop")
    assert pods.returncode == 0 and "web-1" in pods.stdout, pods.stderr
    secret = kubectl("get", "secret", "db-credentials", "-n", "shop", "-o", "jsonpath={.data.password}")
    assert (secret.returncode, secret.stdout) == (0, "[REDACTED]"), secret.stderr
    gone = kubectl("delete", "namespace", "shop")
    assert gone.returncode == 1 and "custody: Agents never delete namespaces." in gone.stderr
    rows = psql(15432, token, "-A", "-t", "-c", "SELECT name, email FROM customers WHERE id = 1")
    assert (rows.returncode, rows.stdout.strip()) == (0, "Customer 1|[EMAIL_ADDRESS]"), rows.stderr
    dropped = psql(15432, token, "-c", "DROP TABLE orders")
    assert dropped.returncode == 1 and "custody: Schema changes (DDL) are not allowed for agents." in dropped.stderr
    ops = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "custody"), "token", "--sub", "crew-ops", "--groups", "ops"],
        capture_output=True, text=True, check=True,
        env={**env, "CUSTODY_CONFIG": str(ROOT / "examples" / "custody.yaml")},
    ).stdout.strip()
    shown, refused = asyncio.run(ssh_walkthrough(ops, "cat notes.txt", "sudo id"))
    assert shown.exit_status == 0 and "deploy key: [AWS_ACCESS_KEY_ID]" in shown.stdout, shown.stderr
    assert refused.exit_status == 126 and "custody: sudo, su and doas are not allowed" in refused.stderr


def test_the_crewai_example_crew_is_governed_and_on_record(stack, tmp_path):
    """examples/crewai with the deterministic stand-in LLM: every request names its agent,
    model, run and task; the large order waits for a manager; the DDL is denied; the chain verifies."""
    token = stack.custody("token", "--sub", "crew-inventory", "--groups", "analysts,buyers,k8s-readers", "--ttl", "1h")
    (tmp_path / "crew.jwt").write_text(token.stdout)
    made = stack.custody("kubeconfig", "--connection", "prod-k8s", "--token-file", str(tmp_path / "crew.jwt"),
                         "--proxy-url", f"http://127.0.0.1:{stack.port}", "--confdir", str(ROOT / ".custody" / "mitmproxy"),
                         "-o", str(tmp_path / "crew.kubeconfig"))
    assert made.returncode == 0, made.stderr
    env = {**clean_env(), "PATH": stack.env["PATH"], "HOME": str(tmp_path), "CREWAI_STORAGE_DIR": str(tmp_path / "crewai"),
           "CUSTODY_CONFIG": str(ROOT / "examples" / "custody.yaml"), "CUSTODY_SUBJECT": "crew-inventory",
           "CUSTODY_GROUPS": "analysts,buyers,k8s-readers", "CUSTODY_PROXY_URL": f"http://127.0.0.1:{stack.port}",
           "CUSTODY_CA": str(ROOT / ".custody" / "mitmproxy" / "mitmproxy-ca-cert.pem"),
           "CUSTODY_KUBECONFIG": str(tmp_path / "crew.kubeconfig")}
    crew = subprocess.Popen([str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "examples" / "crewai" / "crew.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        manager = stack.custody("token", "--sub", "manager-1", "--groups", "managers").stdout.strip()
        approvals = ["--url", "http://127.0.0.1:9090", "--token", manager]
        deadline, held = time.monotonic() + 120, None
        while held is None:
            assert crew.poll() is None and time.monotonic() < deadline, crew.stdout.read() if crew.poll() is not None else ""
            listed = json.loads(stack.custody("approvals", "list", "--json", *approvals).stdout)
            held = next((a for a in listed if a["requester"]["subject"] == "crew-inventory"), None)
            time.sleep(0.3)
        assert held["rules"] == ["large-orders-reviewed"] and held["requester"]["asserted"]["task"] == "restock"
        voted = stack.custody("approvals", "approve", held["id"], "--reason", "stock is low", *approvals)
        assert voted.returncode == 0, voted.stderr
        output, _ = crew.communicate(timeout=180)
    finally:
        crew.kill()
    assert crew.returncode == 0, output
    run = re.search(r"^run: (\S+)$", output, re.M).group(1)
    assert 'task restock: HTTP 201: {"order_id"' in output
    assert "task tidy schema: NAME" in output and "web-1" in output  # kubectl ran after the refused DROP

    store = Store(str(ROOT / ".custody" / "audit.db"))
    try:
        events = [Record.of(r) for r in Selection(run=run).rows(store)]
    finally:
        store.close()
    agent_events = [e for e in events if e["kind"] in ("request", "decision")]
    assert {e["protocol"] for e in agent_events} == {"http", "postgres", "kubernetes"}
    tasks = {"check stock": "Inventory analyst", "restock": "Operations engineer", "tidy schema": "Operations engineer"}
    for e in agent_events:
        assert e.attribute("model") == "custody-standin/scripted-1" and e.attribute("run") == run
        assert tasks[e.attribute("task")] == e.attribute("agent"), (e.attribute("task"), e.attribute("agent"))
        assert e.attribute("prompt").startswith("tool:")
    stories = approvals_of(events)
    story = stories[held["id"]]
    assert (story.outcome, story.approvers, story.task, story.agent) == ("approved", ["manager-1"], "restock",
                                                                         "Operations engineer")
    assert story.requested < story.decided <= story.executed
    ddl = [e for e in agent_events if e["kind"] == "decision" and e["effect"] == "deny"]
    assert [(e.rules, e.operation["summary"], e.attribute("task")) for e in ddl] == [
        (["pg-ddl-denied"], "DROP TABLE on prod-db", "tidy schema")]
    kube = [e for e in agent_events if e["protocol"] == "kubernetes" and e["kind"] == "request"]
    assert kube and all(e.attribute("prompt") == "tool:kubectl" for e in kube)  # carried by the proxy user name
    verified = stack.custody("audit", "verify")
    assert verified.returncode == 0 and verified.stdout.startswith("ok: "), verified.stdout
    replay = stack.custody("audit", "replay", "--run", run)
    assert f"APPROVAL  {held['id']}: approved by manager-1 — stock is low" in replay.stdout
    assert "DECISION  deny · rules pg-ddl-denied" in replay.stdout


def in_namespace(pid: int, *cmd: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """A command in the network namespace of process `pid` (nsenter), so it sees that copy's ports."""
    return subprocess.run(["nsenter", "-t", str(pid), "-n", *cmd], capture_output=True, text=True, env=env,
                          timeout=timeout)


@dataclass
class Fresh:
    clone: Path
    env: dict
    pid: int
    dir: Path


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A clean clone and nothing else: scripts/run builds its own .venv (the samples need
    nothing scripts/test installs), then serves from a network namespace of its own, so its
    fixed ports never meet another copy's."""
    tmp_path = tmp_path_factory.mktemp("fresh")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (tmp_path / "home").mkdir()
    env = {"HOME": str(tmp_path / "home"), "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8", "PIP_CACHE_DIR": os.path.expanduser("~/.cache/pip"),
           **{k: v for k, v in os.environ.items() if k in ("PYENV_ROOT", "CUSTODY_PYTHON")}}
    if shutil.which("pyenv"):
        env["PATH"] = f"{Path(shutil.which('pyenv')).parent}:{env['PATH']}"
    setup = subprocess.run([str(clone / "scripts" / "run"), "--setup"], capture_output=True, text=True, env=env,
                           timeout=900)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert (clone / ".venv" / "bin" / "mitmdump").exists()
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {clone / 'scripts' / 'run'}"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "proxy listening at *:8080" not in (tmp_path / "run.log").read_text(errors="replace"):
            assert proc.poll() is None, (tmp_path / "run.log").read_text(errors="replace")
            assert time.monotonic() < deadline, (tmp_path / "run.log").read_text(errors="replace")
            time.sleep(0.3)
        yield Fresh(clone, env, proc.pid, tmp_path)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_scripts_run_works_from_a_fresh_clone(fresh):
    clone, env, tmp_path = fresh.clone, fresh.env, fresh.dir
    custody = str(clone / ".venv" / "bin" / "custody")
    cenv = {**env, "CUSTODY_CONFIG": str(clone / "examples" / "custody.yaml")}
    token = subprocess.run([custody, "token", "--sub", "crew-analyst", "--groups", "analysts"], capture_output=True,
                           text=True, env=cenv, check=True).stdout.strip()
    items = in_namespace(fresh.pid, "curl", "-sS", "-x", f"http://agent:{token}@127.0.0.1:8080",
                         "http://sample-api.internal/items")
    assert items.returncode == 0 and json.loads(items.stdout)[0]["name"] == "bolt M6", items.stderr
    (tmp_path / "ops.jwt").write_text(subprocess.run(
        [custody, "token", "--sub", "crew-ops", "--groups", "k8s-operators"], capture_output=True, text=True,
        env=cenv, check=True).stdout)
    subprocess.run([custody, "kubeconfig", "--connection", "prod-k8s", "--token-file", str(tmp_path / "ops.jwt"),
                    "--confdir", str(clone / ".custody" / "mitmproxy"), "-o", str(tmp_path / "kubeconfig")],
                   capture_output=True, text=True, env=cenv, check=True)
    pods = in_namespace(fresh.pid, "kubectl", "get", "pods", "-n", "shop",
                        env=clean_env(KUBECONFIG=str(tmp_path / "kubeconfig"), KUBECACHEDIR=str(tmp_path / "kc")))
    assert pods.returncode == 0 and "web-1" in pods.stdout, pods.stderr
    rows = in_namespace(fresh.pid, "psql", "host=127.0.0.1 port=15432 dbname=shop user=agent", "-A", "-t", "-c",
                        "SELECT name, email FROM customers WHERE id = 1", env={**env, "PGPASSWORD": token})
    assert (rows.returncode, rows.stdout.strip()) == (0, "Customer 1|[EMAIL_ADDRESS]"), rows.stderr


def walkthrough() -> list[tuple[str, str | None]]:
    """README's five minutes: each shell block, with the output block that follows it."""
    section = (ROOT / "README.md").read_text().split("## Five minutes", 1)[1].split("\n## ", 1)[0]
    pairs: list[list] = []
    for kind, body in re.findall(r"```(sh|text)\n(.*?)```", section, re.S):
        if kind == "sh":
            pairs.append([body, None])
        elif pairs and pairs[-1][1] is None:
            pairs[-1][1] = body
    return [tuple(p) for p in pairs]


def shown(expected: str) -> re.Pattern:
    """An expected output line as a pattern: ids, counts and times vary; `…` is anything."""
    parts = []
    for word in expected.split():
        piece = re.sub(r"[0-9a-f]{16,}", "\x00", re.escape(word).replace("…", "\x01"))
        piece = re.sub(r"\d+", r"\\d+", piece)
        piece = re.sub(r"^\\d\+[smhd]$", r"\\d+[smhd]", piece)  # an age: 16s, 2m, 1h
        parts.append(piece.replace("\x00", "[0-9a-f]+").replace("\x01", ".*?"))
    return re.compile(r"\s+".join(parts))


def test_the_readme_walkthrough_runs_as_written_on_a_fresh_clone(fresh):
    """Every block of README's five minutes, pasted as written into one shell on the fresh
    clone, prints what the README says it prints (ids, counts and times aside)."""
    blocks = walkthrough()
    assert len(blocks) >= 7
    script = "".join(f"echo '@@@ block {n}'\n{body}\nwait\n" for n, (body, _) in enumerate(blocks))
    done = in_namespace(fresh.pid, "bash", "--norc", "--noprofile", "-c", f"cd {fresh.clone} && {{\n{script}}} 2>&1",
                        env=fresh.env, timeout=600)
    outputs = re.split(r"^@@@ block \d+$", done.stdout, flags=re.M)[1:]
    assert len(outputs) == len(blocks), done.stdout[-3000:]
    for n, ((body, expected), got) in enumerate(zip(blocks, outputs)):
        for line in (expected or "").splitlines():
            if not line.strip() or line.strip() == "...":
                continue
            assert shown(line).search(got), f"block {n}:\n{body}\nexpected a line like {line!r} in:\n{got}"


def test_scripts_test_asks_for_every_system_package_it_lists():
    """Every program=package pair written in scripts/test's `ensure_packages` call reaches the
    call as bash reads it: a line that lost its `\\` is a variable assignment to bash, and
    that package is silently never installed (xmlsec1 was, until a fresh machine ran CI)."""
    text = (ROOT / "scripts" / "test").read_text()
    call = text[text.index("ensure_packages "):text.index("\nensure_venv")]
    written = [w for w in call.replace("\\\n", " ").split() if "=" in w]
    out = subprocess.run(["bash", "-c", 'ensure_packages() { printf "%s\\n" "$@"; }\n' + call],
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.split() == written
    assert "xmlsec1=xmlsec1" in written
