"""Client libraries of other languages, run as the tests' agents: the PostgreSQL JDBC
driver (Debian's libpostgresql-jdbc-java, with the installed JRE) and node-postgres (npm's
`pg`, installed into .cache/node by scripts/test, or here at setup when it is missing:
nothing is vendored)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[2]
NODE_MODULES = ROOT / ".cache" / "node" / "node_modules"
JDBC_JARS = ("/usr/share/java/postgresql.jar",)


def jdbc_jar() -> str:
    for jar in JDBC_JARS:
        if Path(jar).exists():
            return jar
    raise RuntimeError("no PostgreSQL JDBC driver: install libpostgresql-jdbc-java (scripts/test does)")


def node_modules() -> Path:
    """node-postgres, installed into the cache directory once (npm, at setup)."""
    if not (NODE_MODULES / "pg").exists():
        done = subprocess.run(["npm", "install", "--prefix", str(NODE_MODULES.parent), "--no-save", "--no-audit",
                               "--no-fund", "pg@8"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"npm install pg failed: {done.stderr}")
    return NODE_MODULES


def jdbc(url: str, user: str, password: str, sql: str) -> list[str]:
    """Probe.java: `sql` (one int parameter) prepared and run ten times; the lines it printed."""
    done = subprocess.run([shutil.which("java") or "java", "-cp", jdbc_jar(), str(HERE / "Probe.java"), url, user,
                           password, sql], capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"the JDBC probe failed: {done.stderr}")
    return done.stdout.splitlines()


def node(port: int, user: str, password: str, queries: list[dict]) -> list:
    """probe.js: the queries through node-postgres; each one's rows."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "NODE_PATH": str(node_modules())}
    done = subprocess.run(["node", str(HERE / "probe.js"), "127.0.0.1", str(port), user, password],
                          input=json.dumps(queries), capture_output=True, text=True, env=env, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"the node-postgres probe failed: {done.stderr}")
    return json.loads(done.stdout)
