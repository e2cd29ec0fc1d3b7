"""The gateway's Prometheus metrics: every metric Custody exports, defined here and only here.

The addons and services report into these objects (the metrics addon counts flows from
what the chain left in `flow.metadata`; the audit log, the masking pool, the token
verifier and the hold report what only they see); `serve` exposes them over HTTP.

Several workers (`custody run --workers N`) are counted together with prometheus_client's
multiprocess mode: the supervisor gives every worker the same PROMETHEUS_MULTIPROC_DIR
(which prometheus_client reads when it is first imported, so it must be in the worker's
environment from the start), each worker writes its samples to files there, and the
supervisor alone serves the sum (addons/cli/workers.py). Gauges are summed over the live
workers (`livesum`); a dead worker's counters stay counted, so totals never go backwards.
"""

from __future__ import annotations

import os
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
    start_http_server,
)

disable_created_metrics()  # `_created` series: a start time per label set, which the multiprocess mode cannot serve
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
REGISTRY = CollectorRegistry(auto_describe=True)
LATENCY = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter("custody_requests", "Requests the gateway finished, by connection, protocol and final effect "
                   "(allow, deny; none when the flow ended before a decision).",
                   ("connection", "protocol", "effect"), registry=REGISTRY)
DECISION_SECONDS = Histogram("custody_decision_seconds", "Time to evaluate the rules for one request.",
                             ("protocol",), buckets=LATENCY, registry=REGISTRY)
MASKING_SECONDS = Histogram("custody_masking_seconds", "Time to mask one body, in the gateway process (inline) "
                            "or in a masking worker (worker).", ("where",), buckets=LATENCY, registry=REGISTRY)
APPROVALS_HELD = Gauge("custody_approvals_held", "Requests held right now, waiting for approvers.",
                       registry=REGISTRY, multiprocess_mode="livesum")
AUDIT_WRITE_SECONDS = Histogram("custody_audit_write_seconds", "Time from handing events to the audit writer to "
                                "their commit (group commit included).", buckets=LATENCY, registry=REGISTRY)
AUDIT_QUEUE = Gauge("custody_audit_write_queue", "Audit writes waiting for their commit.",
                    registry=REGISTRY, multiprocess_mode="livesum")
STORE_ERRORS = Counter("custody_store_errors", "Operations on the audit store that failed (writes and reads).",
                       ("operation",), registry=REGISTRY)
JWKS_REFRESHES = Counter("custody_jwks_refreshes", "JWKS fetches from identity providers, by issuer and outcome "
                         "(ok, error).", ("issuer", "outcome"), registry=REGISTRY)
SINK_DELIVERED = Counter("custody_sink_delivered", "Audit events delivered to a sink.", ("sink",), registry=REGISTRY)
SINK_FAILURES = Counter("custody_sink_failures", "Deliveries to a sink that failed (and are retried).", ("sink",),
                        registry=REGISTRY)
SINK_BACKLOG = Gauge("custody_sink_backlog", "Audit events recorded but not yet delivered to a sink.", ("sink",),
                     registry=REGISTRY, multiprocess_mode="livemax")
SINK_LAG = Gauge("custody_sink_lag_seconds", "Age of the oldest audit event not yet delivered to a sink (0: none).",
                 ("sink",), registry=REGISTRY, multiprocess_mode="livemax")
RETENTION_PRUNED = Counter("custody_retention_pruned", "Audit events pruned by store.retention (behind a checkpoint).",
                           registry=REGISTRY)
RETENTION_FAILURES = Counter("custody_retention_failures", "Retention rounds that failed and removed nothing.",
                             registry=REGISTRY)


def multiprocess_mode() -> bool:
    """Are this process's samples written to the shared directory (a worker, or its supervisor)?"""
    return bool(os.environ.get(MULTIPROCESS_DIR))


def collected() -> CollectorRegistry:
    """What to serve: this process's registry, or in multiprocess mode every worker's files."""
    if not multiprocess_mode():
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


class Endpoint:
    """The metrics listener: prometheus_client's HTTP server on a thread of its own, off the
    event loop (a scrape never waits for a flow, nor a flow for a scrape)."""

    def __init__(self, listen: tuple[str, int]) -> None:
        self.server: WSGIServer
        self.thread: threading.Thread
        self.server, self.thread = start_http_server(listen[1], listen[0], registry=collected())
        self.port = self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def worker_exited(pid: int) -> None:
    """A worker died: its live gauges stop counting (its counters stay)."""
    multiprocess.mark_process_dead(pid)
