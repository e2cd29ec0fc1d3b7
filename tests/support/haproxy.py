"""A real load balancer in front of gateway replicas: Debian's haproxy, in TCP mode.

TCP mode is what a forward proxy needs (agents' CONNECT tunnels pass through whole), and it
keeps each client connection on one replica for its life, as any TCP load balancer does.
Health checks ask each replica's `/readyz` through its proxy port (an absolute-form
request, as a proxy expects), so a replica that is stopping or has lost its store is taken
out; a connection a replica refuses (its listener already closed) is retried on another
(`option redispatch`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from examples.samples.processes import free_port, stop_process, wait_listening

CHECK = ("option httpchk\n"
         "    http-check send meth GET uri http://custody.gateway/readyz ver HTTP/1.1 hdr host custody.gateway\n"
         "    http-check expect status 200\n")


class Haproxy:
    """haproxy with one frontend per name, each balancing over its (host, port) backends;
    `checked` frontends' backends are health-checked through `check_ports` (the replicas'
    proxy ports, in the same order)."""

    def __init__(self, directory: Path, frontends: dict[str, list[int]], check_ports: list[int]) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in frontends}
        sections = ["global\n    log stdout format raw local0 info\n",
                    "defaults\n    mode tcp\n    log global\n    option tcplog\n    timeout connect 2s\n"
                    "    timeout client 120s\n    timeout server 120s\n    retries 3\n    option redispatch 1\n"
                    "    default-server inter 200ms fall 1 rise 2\n"]
        for name, ports in frontends.items():
            servers = "".join(f"    server r{n} 127.0.0.1:{port} check port {check_ports[n]}\n"
                              for n, port in enumerate(ports))
            sections.append(f"frontend {name}\n    bind 127.0.0.1:{self.ports[name]}\n    default_backend {name}_replicas\n")
            sections.append(f"backend {name}_replicas\n    balance roundrobin\n    {CHECK}{servers}")
        self.config = self.dir / "haproxy.cfg"
        self.config.write_text("\n".join(sections))
        self.log_file = self.dir / "haproxy.log"
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        for port in self.ports.values():
            wait_listening(port, self.proc, "haproxy", self.log)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
