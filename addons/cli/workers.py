"""`custody run --workers N`: N gateway processes on one port, so one host's cores are used.

One Python event loop is one core. The supervisor (this module) starts N `custody run`
workers with the same arguments, each a replica of its own (its own identity, lease and
store connections, over the one configured store), all listening on the same port with
SO_REUSEPORT: the kernel spreads new connections across them, and a connection (a bridge
session's link, an agent's keep-alive connection) stays with the worker that accepted it.

The supervisor holds no flow and decides nothing. It reserves the port (with `--listen-port
0` it picks one and keeps it bound, never listening), restarts a worker that dies (a new
replica: the others abandon what the dead one held), and on SIGTERM or SIGINT tells every
worker to stop (each finishes what is in flight, see addons/replica.py) and waits for them,
killing those still running after the grace period and a margin. A worker that exits right
after it started (a bad configuration) stops them all, with its exit status.

With `metrics.listen` configured, the supervisor serves the metrics of all its workers
there: each worker writes its samples into a directory the supervisor makes (Prometheus'
multiprocess mode, addons/engine/metrics.py), which it removes when it exits.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from addons.engine import metrics

STARTUP = 10.0
"""A worker that exits sooner than this after starting is taken for a configuration that
cannot work, not for a crash to recover from."""
MARGIN = 10.0
"""How long after the grace period the supervisor waits for a stopping worker before killing it."""


def reserve(host: str, port: int) -> socket.socket:
    """A bound SO_REUSEPORT socket holding the workers' port (never listening, so the kernel
    sends it no connections); with port 0, a free port is chosen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    return sock


class Supervisor:
    def __init__(self, argv: list[str], workers: int, host: str, port: int, grace: float,
                 metrics_listen: tuple[str, int] | None = None) -> None:
        self.argv, self.count, self.grace = argv, workers, grace
        self.metrics_listen = metrics_listen
        self.holder = reserve(host, port)
        self.port = self.holder.getsockname()[1]
        self.workers: dict[int, tuple[subprocess.Popen, float]] = {}
        self.stopping = False
        self.deadline = 0.0
        self.samples = tempfile.mkdtemp(prefix="custody-metrics-")
        """The workers' metric files (their environment names it before they import anything)."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "addons.cli.main", "run", *self.argv, "--listen-port", str(self.port),
                "--worker-of", str(os.getpid())]

    def spawn(self, slot: int) -> None:
        env = {**os.environ, metrics.MULTIPROCESS_DIR: self.samples}
        self.workers[slot] = (subprocess.Popen(self.command(), env=env), time.monotonic())

    def run(self) -> int:
        os.environ[metrics.MULTIPROCESS_DIR] = self.samples  # what the endpoint reads
        try:
            endpoint = metrics.Endpoint(self.metrics_listen) if self.metrics_listen else None
        except OSError as e:
            print(f"custody run: metrics.listen: cannot listen on {self.metrics_listen[0]}:{self.metrics_listen[1]}: "
                  f"{e.strerror}", file=sys.stderr)
            shutil.rmtree(self.samples, ignore_errors=True)
            return 1
        try:
            return self._supervise()
        finally:
            if endpoint is not None:
                endpoint.close()
            shutil.rmtree(self.samples, ignore_errors=True)

    def _supervise(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        print(f"custody run: {self.count} workers on port {self.port}", flush=True)
        for slot in range(self.count):
            self.spawn(slot)
        status = 0
        while self.workers and not (self.stopping and (status or time.monotonic() > self.deadline)):
            time.sleep(0.2)
            for slot, (proc, started) in list(self.workers.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self.workers[slot]
                metrics.worker_exited(proc.pid)
                if self.stopping:
                    continue
                if time.monotonic() - started < STARTUP and code != 0:
                    print(f"custody run: worker {proc.pid} exited with {code} at start; stopping", file=sys.stderr)
                    self._stop()
                    status = code
                else:
                    print(f"custody run: worker {proc.pid} exited with {code}; starting another", file=sys.stderr,
                          flush=True)
                    self.spawn(slot)
        self._reap()
        self.holder.close()
        return status

    def _stop(self, *_: object) -> None:
        if self.stopping:  # a second signal: stop now
            for proc, _started in self.workers.values():
                proc.kill()
            return
        self.stopping, self.deadline = True, time.monotonic() + self.grace + MARGIN
        for proc, _started in self.workers.values():
            proc.send_signal(signal.SIGTERM)

    def _reap(self) -> None:
        """Wait for the workers still running (until the deadline), then kill the rest."""
        for proc, _started in self.workers.values():
            try:
                proc.wait(max(self.deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
