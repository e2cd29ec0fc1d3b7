"""The addon manager of `custody run` and of mitmdump with the chain (addons/chain.py
`Hooks`): each event's hooks are resolved once per addon tree, and again whenever an addon
is registered or removed or options change, so what runs is always what mitmproxy's own
manager would run."""

from __future__ import annotations

import asyncio

import pytest
from mitmproxy import addonmanager, exceptions, master, options
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from addons.chain import Hooks


class Seen:
    """An addon that logs its hooks as they run; `then` what the hook does after logging:
    nothing, raise an error (mitmproxy logs it and goes on with the next top-level addon)
    or halt the event (AddonHalt: no addon after it sees the event)."""

    def __init__(self, name: str, log: list, hooks: tuple[str, ...] = ("request",), then: str = "") -> None:
        self.name, self.log, self.then = name, log, then
        for hook in hooks:
            setattr(self, hook, lambda f, hook=hook: self._seen(hook))

    def _seen(self, hook: str) -> None:
        self.log.append((self.name, hook))
        if self.then == "raise":
            raise ValueError(f"{self.name} failed")
        if self.then == "halt":
            raise exceptions.AddonHalt()


class Parent:
    """An addon managing sub-addons, the way mitmproxy's script loader does: it reorders
    them in `configure` when an option changes, with no call to the manager."""

    def __init__(self, *children) -> None:
        self.addons = list(children)

    def configure(self, updated: set[str]) -> None:
        if "showhost" in updated:
            self.addons = self.addons[::-1]


def _managers():
    """Masters with the lean runner's manager, with mitmproxy's adopted (as under mitmdump),
    and with mitmproxy's own, which the other two must agree with."""
    out = []
    for kind in (Hooks, "adopted", addonmanager.AddonManager):
        m = master.Master(options.Options())
        if kind == "adopted":
            Hooks.adopt(m.addons)
        else:
            m.addons = kind(m)
        out.append(m)
    return out


async def _fire(m: master.Master, *events) -> None:
    for event in events:
        await m.addons.trigger_event(event)


class Unresolvable:
    """A hook name bound to something that is not callable: mitmproxy logs an error for this
    addon and still runs the others."""

    request = "not a hook"


def _invoke_unregistered(m: master.Master, log: list) -> None:
    """mitmproxy's `script.run` invokes a fresh, never registered module's hooks directly;
    fresh objects may reuse an earlier one's id."""
    for i in range(6):
        m.addons.invoke_addon_sync(Seen(f"run{i}", log), HttpRequestHook(tflow.tflow()))


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
                                                                   Seen("c", log), Seen("f", log)))),
    ("the parent registers e", lambda m, log: _adopt(m, Seen("e", log, ("request",)))),
    ("the parent removes c", lambda m, log: _disown(m, m.addons.get("c"))),
    ("options change: the parent reorders", lambda m, log: m.options.update(showhost=True)),
    ("remove a", lambda m, log: m.addons.remove(m.addons.get("a"))),
    ("add d", lambda m, log: m.addons.add(Seen("d", log, ("response",)))),
    ("add g, whose request hook fails, and h", lambda m, log: m.addons.add(Seen("g", log, then="raise"),
                                                                            Seen("h", log))),
    ("add i, whose response hook halts, and j", lambda m, log: m.addons.add(Seen("i", log, ("response",), "halt"),
                                                                             Seen("j", log, ("response",)))),
    ("add an addon whose request is not callable, and l", lambda m, log: m.addons.add(Unresolvable(),
                                                                                       Seen("l", log))),
    ("invoke unregistered addons directly, as script.run does", lambda m, log: _invoke_unregistered(m, log)),
    ("clear", lambda m, log: m.addons.clear()),
    ("add k", lambda m, log: m.addons.add(Seen("k", log))),
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

    ours, adopted, theirs = asyncio.run(run())
    assert ours == adopted == theirs
    assert ours  # something ran: the comparison is not of two empty logs
