"""The real kubectl, configured only by a kubeconfig that `custody kubeconfig` wrote."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support.gateway import Gateway

KUBECTL = shutil.which("kubectl") or "kubectl"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any proxy settings: the kubeconfig alone says where to go."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("KUBE")}
    return {**env, **extra}


class Kubectl:
    """kubectl as one agent: its token in a file, its kubeconfig from the real CLI."""

    def __init__(self, gw: Gateway, directory: Path, token: str | None, *, connection: str = "prod-k8s",
                 direct: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.token_file = directory / "agent.jwt"
        self.token_file.write_text(token or "not-a-token")
        self.kubeconfig = directory / "kubeconfig"
        args = ["kubeconfig", "--connection", connection, "--token-file", str(self.token_file),
                "--ca", str(gw.ca), "-o", str(self.kubeconfig)]
        args += ["--direct"] if direct else ["--proxy-url", gw.proxy_url(None)]
        gw.custody(*args, check=True)
        self.env = clean_env(KUBECONFIG=str(self.kubeconfig), KUBECACHEDIR=str(directory / "cache"))

    def run(self, *args: str, input: str | None = None, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([KUBECTL, *args], capture_output=True, text=True, input=input, timeout=timeout,
                              env={**self.env, **env})

    def start(self, *args: str) -> subprocess.Popen:
        """A long-running kubectl (-w, logs -f, exec): read its stdout line by line."""
        return subprocess.Popen([KUBECTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, bufsize=1)
