"""metrics: counts every finished request and serves the gateway's Prometheus metrics.

Listed last in the chain, so a flow's response and error hooks reach it after every other
addon had its say (a late refusal by masking or the recorder is a deny here too). It reads
only what the chain left in the flow's context: the connection, the protocol and the
decision. Health probes are not counted, as they are not recorded. The services that see
what a flow cannot (the audit writer, masking, the token verifier, the hold) report into
the same registry themselves (addons/engine/metrics.py).

With `metrics.listen` set it serves /metrics there; under `custody run --workers` the
supervisor serves every worker's sum instead, and this addon only counts.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from addons import context
from addons.engine import metrics
from addons.failclosed import guarded
from addons.settings import Settings
from addons.wellknown import PROBE

logger = logging.getLogger(__name__)
COUNTED = "custody-counted"
"""flow.metadata: the flow is counted (an error after the response must not count it twice)."""


def labels(ctx: context.Context) -> tuple[str, str, str]:
    """The request's connection, protocol and final effect, as the counter labels them."""
    effect = ctx.decision.effect if ctx.decision is not None else "none"
    return ctx.connection or "none", ctx.protocol or "none", effect


class Metrics:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.listen: tuple[str, int] | None = None
        self.endpoint: metrics.Endpoint | None = None

    def configure(self, updated: set[str]) -> None:
        if not self.settings.changed(updated):
            return
        listen = self.settings.require().observability.metrics_listen
        if listen == self.listen:
            return
        self.done()
        self.listen = listen
        if listen is None or metrics.multiprocess_mode():
            return
        try:
            self.endpoint = metrics.Endpoint(listen)
        except OSError as e:
            self.listen = None
            self.settings.invalid(f"metrics.listen: cannot listen on {listen[0]}:{listen[1]}: {e.strerror}")
            return
        logger.info("custody: metrics at http://%s:%d/metrics", listen[0], self.endpoint.port)

    def done(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None

    @guarded
    def response(self, f: http.HTTPFlow) -> None:
        self._count(f)

    @guarded
    def error(self, f: http.HTTPFlow) -> None:
        self._count(f)

    def _count(self, f: http.HTTPFlow) -> None:
        if f.metadata.get(PROBE) or f.metadata.get(COUNTED):
            return
        f.metadata[COUNTED] = True
        metrics.REQUESTS.labels(*labels(context.of(f))).inc()
