"""The README's first command works: scripts/run starts the sample gateway, whose
walkthrough requests are allowed, denied and recorded."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time

import asyncssh
import requests

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


def test_scripts_run_serves_the_walkthrough(tmp_path):
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
        output = (tmp_path / "run.log").read_text()
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
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
