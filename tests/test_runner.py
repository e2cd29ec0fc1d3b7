"""The lean runner's addon manager (addons/cli/run.py `Hooks`): each event's hooks are
resolved once per addon tree, and resolved again whenever an addon is registered or removed,
so what runs is always what mitmproxy's own manager would run."""

from __future__ import annotations

import asyncio

import pytest
from mitmproxy import addonmanager, master, options
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from addons.cli.run import Hooks


class Seen:
    def __init__(self, name: str, log: list, hooks: tuple[str, ...] = ("request",)) -> None:
        self.name, self.log = name, log
        for hook in hooks:
            setattr(self, hook, lambda f, hook=hook: self.log.append((self.name, hook)))


class Parent:
    def __init__(self, *children) -> None:
        self.addons = list(children)


def _managers():
    """The lean runner's manager and mitmproxy's own, on masters of their own."""
    out = []
    for kind in (Hooks, addonmanager.AddonManager):
        m = master.Master(options.Options())
        m.addons = kind(m)
        out.append(m)
    return out


async def _fire(m: master.Master, *events) -> None:
    for event in events:
        await m.addons.trigger_event(event)


def _adopt(m: master.Master, child) -> None:
    """What mitmproxy asks of an addon that manages sub-addons: add it, then register it."""
    m.addons.get("parent").addons.append(child)
    m.addons.register(child)


def _disown(m: master.Master, child) -> None:
    """...and to remove one: from its own `addons`, then from the manager."""
    m.addons.get("parent").addons.remove(child)
    m.addons.remove(child)


STEPS = [
    ("add a", lambda m, log: m.addons.add(Seen("a", log))),
    ("add a parent of b and c", lambda m, log: m.addons.add(Parent(Seen("b", log, ("request", "response")),
                                                                   Seen("c", log)))),
    ("the parent registers e", lambda m, log: _adopt(m, Seen("e", log, ("request",)))),
    ("the parent removes c", lambda m, log: _disown(m, m.addons.get("c"))),
    ("remove a", lambda m, log: m.addons.remove(m.addons.get("a"))),
    ("add d", lambda m, log: m.addons.add(Seen("d", log, ("response",)))),
]


@pytest.mark.parametrize("upto", range(1, len(STEPS) + 1), ids=[s[0] for s in STEPS])
def test_the_hooks_that_run_are_mitmproxys_after_every_change_of_the_tree(upto):
    async def run():
        logs = []
        for m in _managers():
            log = []
            for i, (_, step) in enumerate(STEPS[:upto]):
                step(m, log)
                await _fire(m, HttpRequestHook(tflow.tflow()), HttpResponseHook(tflow.tflow(resp=True)))
                log.append(f"after step {i}")
            logs.append(log)
        return logs

    ours, theirs = asyncio.run(run())
    assert ours == theirs
    assert ours  # something ran: the comparison is not of two empty logs
