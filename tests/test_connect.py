"""`custody ssh-config`, `custody ssh` and `custody psql`: the real OpenSSH client and psql,
run the way an agent's first hour runs them — a fresh home, no known_hosts, no terminal
(stdin is not a tty), a timeout on every command — against a real sshd, a real PostgreSQL,
the bridges and the gateway. Nothing may prompt, hang or loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from examples.samples.postgres import PostgresServer
from examples.samples.sshd import SshServer
from tests.conftest import standard_identity
from tests.support.gateway import ROOT, Gateway
from tests.support.pgbridge import BridgeProcess
from tests.support.servers import free_port

BIN = Path(sys.executable).parent
DB_PASSWORD = "app-pw-5512"


@pytest.fixture(scope="module")
def sshd():
    server = SshServer()
    (Path.home() / "custody-connect-notes.txt").write_text("region: eu-west-1\n")
    yield server
    server.stop()
    (Path.home() / "custody-connect-notes.txt").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer("admin-pw")
    server.execute("CREATE DATABASE shop")
    server.execute(f"CREATE ROLE app LOGIN PASSWORD '{DB_PASSWORD}'")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers, sshd, pg):
    directory = tmp_path_factory.mktemp("connect-gateway")
    ssh_port, pg_port = free_port(), free_port()
    gateway = Gateway(
        directory,
        connections=[
            {"name": "prod-web", "kind": "ssh", "hosts": ["web.prod.internal"],
             "upstream": f"ssh://{sshd.user}@127.0.0.1:{sshd.port}", "known_hosts": str(sshd.known_hosts),
             "credential": {"type": "private_key", "secret": f"file:{sshd.client_key}"},
             "listen": f"127.0.0.1:{ssh_port}", "host_key": str(directory / "bridge_host_key")},
            {"name": "prod-db", "kind": "postgres", "hosts": ["db.prod.internal"],
             "upstream": f"postgresql://127.0.0.1:{pg.port}/shop",
             "credential": {"type": "password", "username": "app", "secret": "env:PG_APP_PASSWORD"},
             "listen": f"127.0.0.1:{pg_port}"},
        ],
        rules={"ssh.yaml": (ROOT / "rules" / "ssh.yaml").read_text(),
               "db.yaml": {"rules": [{"id": "ops-read-db", "match": {"connection": "prod-db", "action": "read",
                                                                     "principal": {"groups": ["ops"]}},
                                      "effect": "allow"}]}},
        identity=standard_identity(servers.jwks),
        env={"PG_APP_PASSWORD": DB_PASSWORD},
    )
    gateway.start()
    gateway.ssh_port, gateway.pg_port = ssh_port, pg_port
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def bridges(gw, tmp_path_factory):
    logs = tmp_path_factory.mktemp("connect-bridges")
    ssh = BridgeProcess(gw, gw.ssh_port, logs / "ssh.log", module="ssh_bridge")
    pg = BridgeProcess(gw, gw.pg_port, logs / "pg.log")
    yield ssh, pg
    ssh.stop()
    pg.stop()


@pytest.fixture(scope="module")
def tokens(keys, jwks):
    def mint(sub: str, groups: list[str], ttl: float = 3600) -> str:
        return keys["rsa"].token(jwks.issuer, sub=sub, groups=groups, ttl=ttl)

    return {"ops": mint("crew-ops", ["ops"]), "stranger": mint("nobody", []), "expired": mint("crew-ops", ["ops"], -60)}


def custody(gw, home: Path, *args: str, token: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real `custody`, as an agent with a fresh home (no ~/.ssh, no known_hosts) runs it,
    stdin not a terminal."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CUSTODY_CONFIG": str(gw.config_file),
           "CUSTODY_PROXY_URL": gw.proxy_url(None), "CUSTODY_CONFDIR": str(gw.confdir), "LANG": "C.UTF-8",
           **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}, **({"CUSTODY_TOKEN": token} if token else {})}
    return subprocess.run([str(BIN / "custody"), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_ssh_config_pins_the_bridges_real_host_key(gw, bridges, tmp_path):
    out = custody(gw, tmp_path, "ssh-config")
    assert out.returncode == 0, out.stderr
    directory = tmp_path / ".config" / "custody" / "ssh"
    known = (directory / "known_hosts").read_text().split()
    scanned = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-p", str(gw.ssh_port), "127.0.0.1"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    assert known[0] == f"[127.0.0.1]:{gw.ssh_port}" and known[1:3] == scanned[1:3]  # the key the bridge presents
    config = (directory / "config").read_text()
    assert "Host prod-web\n" in config and f"  Port {gw.ssh_port}\n" in config and "StrictHostKeyChecking yes" in config


@pytest.mark.parametrize(
    "agent, command, status, stdout, stderr",
    [
        ("ops", "cat custody-connect-notes.txt", 0, "region: eu-west-1\n", ""),
        ("ops", "sudo id", 126, "", "custody: sudo, su and doas are not allowed for agents."),
        ("stranger", "cat custody-connect-notes.txt", 255, "", "custody: "),  # refused at login, with the reason
        ("expired", "cat custody-connect-notes.txt", 255, "", "custody: token expired"),
    ],
)
def test_custody_ssh_runs_without_a_prompt_and_says_why_it_refuses(gw, bridges, tmp_path, tokens, agent, command,
                                                                  status, stdout, stderr):
    out = custody(gw, tmp_path, "ssh", "prod-web", command, token=tokens[agent], timeout=60)
    assert out.returncode == status, (out.stdout, out.stderr)
    assert out.stdout == stdout
    assert stderr in out.stderr
    assert "continue connecting" not in out.stderr and "Password:" not in out.stderr


def test_a_changed_bridge_key_is_refused_then_trusted_again_from_the_gateway(gw, bridges, tmp_path, tokens):
    first = custody(gw, tmp_path, "ssh-config")
    assert first.returncode == 0, first.stderr
    known = tmp_path / ".config" / "custody" / "ssh" / "known_hosts"
    real = known.read_text()
    other = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    assert other.returncode == 0
    known.write_text(f"[127.0.0.1]:{gw.ssh_port} {(tmp_path / 'k.pub').read_text()}")
    config = tmp_path / ".config" / "custody" / "ssh" / "config"
    plain = subprocess.run(["ssh", "-F", str(config), "prod-web", "true"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert plain.returncode == 255 and "REMOTE HOST IDENTIFICATION HAS CHANGED" in plain.stderr
    again = custody(gw, tmp_path, "ssh", "prod-web", "cat custody-connect-notes.txt", token=tokens["ops"])
    assert again.returncode == 0 and known.read_text() == real  # re-fetched from the gateway, over its CA


@pytest.mark.parametrize(
    "prompt, answers",
    [
        ("agent+prod-web@127.0.0.1's password: ", True),
        ("Custody\nAnswer with your agent token.", True),
        ("(agent+prod-web@127.0.0.1) token: ", True),
        ("Are you sure you want to continue connecting (yes/no/[fingerprint])?", False),
        ("Enter passphrase for key '/root/.ssh/id_ed25519': ", False),
        ("Allow use of key? ", False),
        ("", False),
    ],
)
def test_askpass_answers_only_the_bridges_token_prompt(prompt, answers):
    env = {"PATH": os.environ["PATH"], "CUSTODY_SSH_TOKEN": "tok-1",
           **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}
    out = subprocess.run([str(BIN / "custody-askpass"), prompt], capture_output=True, text=True, env=env, timeout=30)
    assert (out.returncode, out.stdout) == ((0, "tok-1\n") if answers else (1, ""))


@pytest.mark.parametrize(
    "agent, sql, status, says",
    [
        ("ops", "SELECT 40 + 2", 0, "42"),
        ("stranger", "SELECT 1", 2, "custody: no rule matches this request"),  # refused at login
        ("stranger", "SELECT 1", 2, "HINT:  no rule allows this; `custody rules explain` shows the rules that could"),
        ("stranger", "SELECT 1", 2, "DETAIL:  audit event: "),
        ("expired", "SELECT 1", 2, "custody: token expired"),
        ("expired", "SELECT 1", 2, "HINT:  send the agent's token"),
        ("ops", "DROP TABLE nothing", 1, "HINT:  no rule allows this"),
    ],
)
def test_custody_psql_logs_in_with_the_token(gw, bridges, tmp_path, tokens, agent, sql, status, says):
    out = custody(gw, tmp_path, "psql", "prod-db", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql,
                  token=tokens[agent])
    assert out.returncode == status, (out.stdout, out.stderr)
    assert says in (out.stdout if status == 0 else out.stderr)


def test_the_wrappers_name_what_is_missing(gw, tmp_path):
    no_token = custody(gw, tmp_path, "ssh", "prod-web", "true")
    assert no_token.returncode == 1
    assert no_token.stderr.strip() == ("the agent's token is needed: pass --token or set CUSTODY_TOKEN "
                                       "(custody token --sub … in development)")
    unknown = custody(gw, tmp_path, "psql", "nowhere", "-c", "SELECT 1", token="x")
    assert unknown.returncode == 1 and "no postgres connection nowhere with a listen address" in unknown.stderr
    assert yaml.safe_load(gw.config_file.read_text())  # the configuration was only read
