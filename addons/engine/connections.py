"""Which registered connection a host and port belong to.

A host entry without a port covers the web ports 80 and 443 only, so registering
`api.internal` does not open `api.internal:22` to anyone. `*.example.com` covers every
subdomain (not `example.com` itself). Exact entries win over wildcards.
"""

from __future__ import annotations

from collections.abc import Iterable

from addons.engine.config import Connection

WEB_PORTS = (80, 443)


def _split(entry: str) -> tuple[str, tuple[int, ...]]:
    host, sep, port = entry.rpartition(":")
    if sep and port.isdigit():
        return host, (int(port),)
    return entry, WEB_PORTS


class Registry:
    def __init__(self, connections: Iterable[Connection]) -> None:
        self.by_name: dict[str, Connection] = {}
        self._exact: dict[tuple[str, int], Connection] = {}
        self._wildcard: list[tuple[str, int, Connection]] = []
        for c in connections:
            self.by_name[c.name] = c
            for entry in c.hosts:
                host, ports = _split(entry.lower())
                for port in ports:
                    if host.startswith("*."):
                        self._wildcard.append((host[1:], port, c))
                    else:
                        self._exact[(host, port)] = c
        self._wildcard.sort(key=lambda w: -len(w[0]))

    def find(self, host: str, port: int) -> Connection | None:
        host = host.lower().rstrip(".")
        hit = self._exact.get((host, port))
        if hit is not None:
            return hit
        for suffix, p, c in self._wildcard:
            if p == port and host.endswith(suffix) and len(host) > len(suffix):
                return c
        return None
