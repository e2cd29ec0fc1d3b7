"""Model APIs for tests: the example's stand-in model served over HTTPS
(examples/sample_model.py) as a real process, and the real SDKs (openai, anthropic)
reaching it through a real gateway."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai

from tests.support.gateway import ROOT, Gateway
from tests.support.servers import stop_process

SAMPLE = ROOT / "examples" / "sample_model.py"


class ModelServer:
    """examples/sample_model.py on a free port, with more plans; `received()` is what
    reached it (one request per entry: method, path, headers, body)."""

    def __init__(self, directory: Path, plans: dict[str, list] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.log_file = directory / "received.jsonl"
        self.log_file.write_text("")
        (directory / "plans.json").write_text(json.dumps(plans or {}))
        self.output = open(directory / "server.out", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(SAMPLE), "--port", "0", "--dir", str(directory), "--plans",
             str(directory / "plans.json"), "--log", str(self.log_file)],
            stdout=subprocess.PIPE, stderr=self.output, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line.startswith("sample model on "):
            raise RuntimeError(f"the sample model did not start: {line}{(directory / 'server.out').read_text()}")
        self.port = int(line.rsplit(":", 1)[1])
        self.url = f"https://localhost:{self.port}"
        self.ca = directory / "ca.pem"
        self.key = (directory / "api.key").read_text().strip()

    def received(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_file.read_text().splitlines() if line]

    def stop(self) -> None:
        stop_process(self.proc)
        self.output.close()


def http_client(gw: Gateway, library=httpx, **kw):
    """An httpx client through the gateway as a proxy (the agent's token goes as the API
    key); the anthropic SDK uses httpx's successor, httpx2, with the same interface."""
    return library.Client(proxy=gw.proxy_url(None), verify=ssl.create_default_context(cafile=str(gw.ca)),
                          trust_env=False, timeout=60, **kw)


def openai_client(gw: Gateway, token: str, host: str, prefix: str = "", **headers: str) -> openai.OpenAI:
    """The openai SDK through the gateway: the agent's token is its API key (the gateway
    holds the provider's)."""
    return openai.OpenAI(base_url=f"https://{host}{prefix}/v1", api_key=token, max_retries=0,
                         http_client=http_client(gw, headers=headers))


def anthropic_client(gw: Gateway, token: str, host: str, **headers: str) -> anthropic.Anthropic:
    """The anthropic SDK through the gateway, its token as a bearer (`auth_token`)."""
    return anthropic.Anthropic(base_url=f"https://{host}", auth_token=token, max_retries=0,
                               http_client=http_client(gw, httpx2, headers=headers))
