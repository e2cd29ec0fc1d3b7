"""A real PostgreSQL server for tests, benchmarks and the sample: initdb and pg_ctl on an
ephemeral port with its own data directory and password (SCRAM) authentication.

PostgreSQL refuses to run as root; as root the server runs as the `postgres` system user
(which Debian's packages create), in a directory that user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from examples.samples.processes import free_port


def bindir() -> Path:
    """The newest PostgreSQL server binaries: Debian's /usr/lib/postgresql/N/bin, or PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl): install postgresql (scripts/test does)")


class PostgresServer:
    """One server, started on construction; `stop()` removes it and its data."""

    def __init__(self, password: str, *, superuser: str = "custody_admin", directory: Path | None = None,
                 log_statements: bool = True, port: int | None = None) -> None:
        self.bin = bindir()
        self.superuser, self.password = superuser, password
        self.port = port or free_port()
        self.dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="custody-pg-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = self.dir / "data"
        self.user = None
        if os.geteuid() == 0:
            self.user = pwd.getpwnam("postgres")
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        pwfile = self.dir / "pw"
        pwfile.write_text(password + "\n")
        self._own(pwfile)
        if not (self.data / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data), "-U", superuser, "--pwfile", str(pwfile), "-A", "scram-sha-256",
                      "-E", "UTF8", "--no-locale", "--no-sync")
        pwfile.unlink()
        self.log_statements = log_statements
        self.start()

    def start(self) -> None:
        """Start the server (again, after `halt`: same data, same port)."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c synchronous_commit=off -c full_page_writes=off"
                  + (" -c log_statement=all -c log_connections=on" if self.log_statements else ""), "start")

    def halt(self) -> None:
        """Stop the server at once (its clients' connections break), keeping its data."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def _own(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _run(self, program: str, *args: str) -> None:
        cmd = [str(self.bin / program), *args]
        if self.user is not None:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.dir)
        if done.returncode != 0:
            log = (self.dir / "server.log").read_text(errors="replace") if (self.dir / "server.log").exists() else ""
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stdout}{done.stderr}{log}")

    def log(self) -> str:
        """The server's log: with log_statements, every statement and connection it saw."""
        return (self.dir / "server.log").read_text(errors="replace")

    def dsn(self, database: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        return (f"host=127.0.0.1 port={self.port} dbname={database} user={user or self.superuser} "
                f"password={password or self.password}")

    def connect(self, database: str = "postgres", **kwargs) -> psycopg.Connection:
        return psycopg.connect(self.dsn(database), autocommit=True, **kwargs)

    def execute(self, sql: str, database: str = "postgres") -> None:
        with self.connect(database) as conn:
            conn.execute(sql)

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():  # not already halted
                self.halt()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
