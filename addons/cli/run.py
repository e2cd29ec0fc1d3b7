"""The lean runner behind `custody run`: the chain on a master with only what it needs.

mitmdump loads some 34 built-in addons and dispatches every hook (and an `update` after
each one) through all of them. Custody needs eight: option plumbing (core), the listeners
(proxyserver), protocol detection (next_layer), certificates (tlsconfig), client address
blocking (block), refusing h2c upgrades (disable_h2c), startup error checks (errorcheck)
and the terminal log. Everything else (replay, map-remote, anticache, the flow printer ...)
is either irrelevant to a gateway or a way around its decisions. Its addon manager is the
chain's `Hooks`, which resolves each event's hooks once. `bench/http_overhead.py` measures
the difference.

SIGTERM (or SIGINT) stops the gateway gracefully: no new connections, requests in flight
finished within `gateway.grace`, held requests refused with their approvals abandoned
(addons/replica.py); a second signal stops it at once. With `--workers N`, a supervisor
runs N of these on one port (addons/cli/workers.py); each worker's listeners share the
port with SO_REUSEPORT (`ReusePortLoop`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from mitmproxy import exceptions, hooks, master, options
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    proxyserver,
    tlsconfig,
)

from addons import chain
from addons.engine import config
from addons.gate import Gate


class Builtins:
    """mitmproxy's own addons that the gateway needs, held by one parent (see chain.Chain)."""

    def __init__(self) -> None:
        self.addons = [
            core.Core(),
            block.Block(),
            proxyserver.Proxyserver(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            disable_h2c.DisableH2C(),
            errorcheck.ErrorCheck(repeat_errors_on_stderr=True),
        ]


class Gateway(master.Master):
    """Three top-level addons: mitmproxy's, Custody's chain, and the gate on its own, so
    that nothing that goes wrong inside the other two can skip it."""

    def __init__(self, opts: options.Options) -> None:
        super().__init__(opts, with_termlog=True)
        chain.Hooks.adopt(self.addons)
        self.chain = chain.Chain()
        self.addons.add(Builtins(), self.chain, Gate())
        self.addons.handle_lifecycle = self._handle_lifecycle

    async def _handle_lifecycle(self, event: hooks.Hook) -> None:
        """mitmproxy follows every flow event with an `update` event for flow views; this
        master has no view and no addon that listens to `update`, so it is not sent."""
        await self.addons.trigger_event(event)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="custody run", description="Run the Custody gateway.")
    p.add_argument("--config", help="configuration file (default: $CUSTODY_CONFIG, ./custody.yaml)")
    p.add_argument("--listen-host", default="", help="address to listen on (default: all)")
    p.add_argument("--listen-port", type=int, default=8080)
    p.add_argument("--mode", action="append", default=[], help="mitmproxy mode spec, repeatable (default: regular)")
    p.add_argument("--confdir", help="mitmproxy confdir: where the gateway CA lives (default: ~/.mitmproxy)")
    p.add_argument("--set", dest="setoptions", action="append", default=[], metavar="OPTION=VALUE",
                   help="any other mitmproxy option, repeatable")
    p.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    p.add_argument("--workers", type=int, default=1,
                   help="gateway processes sharing the listening port (default 1; one per core to use them all)")
    p.add_argument("--worker-of", type=int, default=0, help=argparse.SUPPRESS)  # the supervisor's pid
    return p


class ReusePortLoop(asyncio.SelectorEventLoop):
    """A worker's event loop: every listener it opens shares its port with the other
    workers' (SO_REUSEPORT), and the kernel spreads new connections across them."""

    async def create_server(self, *args, **kwargs):
        kwargs.setdefault("reuse_port", True)
        return await super().create_server(*args, **kwargs)


async def _run(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(logging.INFO)
    opts = options.Options()
    try:
        # Deferred: applied when the addon that declares the option is added.
        early = [f"custody_config={config.find(args.config)}"]
        early += ["termlog_verbosity=error"] if args.quiet else []
        opts.set(*early, defer=True)
        gateway = Gateway(opts)
        specs = [f"listen_host={args.listen_host}", f"listen_port={args.listen_port}"]
        specs += [f"mode={m}" for m in args.mode]
        specs += [f"confdir={args.confdir}"] if args.confdir else []
        opts.set(*specs, *args.setoptions)
        # Configure every addon once with every option, as mitmproxy does for a script; an
        # unusable configuration or rule set has been said (one line per problem) by now.
        gateway.addons.trigger(hooks.ConfigureHook(set(opts.keys())))
    except (config.ConfigError, exceptions.OptionsError) as e:
        print(f"custody run: {e}", file=sys.stderr)
        return 1
    if gateway.chain.settings.failed:
        return 1
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []

    def stop() -> None:
        if stopping:  # asked again: stop now
            gateway.shutdown()
        else:
            stopping.append(asyncio.ensure_future(_drain(gateway)))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    if args.worker_of:
        asyncio.ensure_future(_orphaned(args.worker_of, stop))
    await gateway.run()
    return 0


async def _drain(gateway: Gateway) -> None:
    try:
        await gateway.chain.replica.stop()
    finally:
        gateway.shutdown()


async def _orphaned(supervisor: int, stop) -> None:
    """A worker whose supervisor died (even by SIGKILL) stops too."""
    while os.getppid() == supervisor:
        await asyncio.sleep(1)
    stop()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.workers > 1:
        from addons.cli.workers import Supervisor

        try:
            loaded = config.load(config.find(args.config), secrets=False)
        except config.ConfigError as e:
            print(f"custody run: {e}", file=sys.stderr)
            return 1
        rest = _without_workers(argv if argv is not None else sys.argv[2:])
        return Supervisor(rest, args.workers, args.listen_host, args.listen_port, loaded.replica.grace,
                          loaded.observability.metrics_listen).run()
    return asyncio.run(_run(args), loop_factory=ReusePortLoop if args.worker_of else None)


def _without_workers(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out
