"""A real OpenSSH server for tests and benchmarks: its own config, host key, port and
authorized key (the key the gateway holds), run in the foreground (`sshd -D -e`)."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from examples.samples.processes import free_port, stop_process, wait_listening

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def keygen(path: Path, kind: str = "ed25519") -> Path:
    """A key pair at `path` (and `path`.pub), made once and then kept."""
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


class SshServer:
    """One sshd on 127.0.0.1 that accepts `user` with the key in `client_key`."""

    def __init__(self, directory: Path | None = None, port: int | None = None, keep: bool = False,
                 user: str | None = None, authorized_keys: str | None = None) -> None:
        if not os.path.exists(SSHD):
            raise RuntimeError("no sshd: install openssh-server (scripts/test does)")
        self.dir = Path(directory or tempfile.mkdtemp(prefix="custody-sshd-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.port = port or free_port()
        self.user = user or getpass.getuser()
        self.host_key = keygen(self.dir / "host_key")
        self.client_key = keygen(self.dir / "gateway_key")
        (self.dir / "authorized_keys").write_text((self.dir / "gateway_key.pub").read_text())
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {(self.dir / 'host_key.pub').read_text()}")
        config = self.dir / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}", f"PidFile {self.dir / 'pid'}",
            f"AuthorizedKeysFile {authorized_keys or self.dir / 'authorized_keys'}", "PubkeyAuthentication yes",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            "PermitRootLogin prohibit-password", "AllowTcpForwarding yes", "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE", "",
        ]))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
        self.log_file = self.dir / "sshd.log"
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=open(self.log_file, "wb"),
                                     stderr=subprocess.STDOUT)
        wait_listening(self.port, self.proc, "sshd", self.log)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def accepted(self) -> int:
        """How many logins sshd has accepted (each one the gateway's key)."""
        return self.log().count("Accepted publickey")

    def stop(self) -> None:
        stop_process(self.proc)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
