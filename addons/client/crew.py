"""crew: CrewAI's own hooks and events fill in who is acting, so every request a tool
makes through the client helper says which agent (role), model, crew run, task and tool
caused it — and why: the task's description is the justification approvers see, unless
the code says otherwise (`Custody(..., justification=...)`, or `instrument(justify=...)`).

CrewAI runs event handlers on a thread pool, after the fact, so they cannot tag a tool's
requests; its `before_tool_call` hook runs in the tool's own thread and context, just
before the tool, so the attributes are set there. The crew run id comes from the
CrewKickoffStarted event (the one event CrewAI waits for), keyed by the crew.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from addons.client import Custody


def describe_task(task: Any) -> str:
    if task is None:
        return ""
    return task.name or (task.description or "").strip().split("\n")[0][:120]


def task_justification(task: Any) -> str:
    """Why a tool acts, by default: what its task asks for (description, then expected output)."""
    if task is None:
        return ""
    text = " ".join((task.description or "").split())
    expected = " ".join((getattr(task, "expected_output", "") or "").split())
    return f"{text} (expected: {expected})" if text and expected else text or expected


def instrument(custody: Custody, environment: bool = False,
               justify: Callable[[Any], str] = task_justification) -> Callable[[], None]:
    """Tag every tool call of every crew in this process; returns a function that undoes it.
    With `environment`, each tool call also finds the gateway, the current token and these
    attributes in the proxy environment (`Custody.install`): for clients that read only the
    environment, such as the MCP client of CrewAI's `mcps=` (one per tool call)."""
    from crewai.events import CrewKickoffStartedEvent, crewai_event_bus
    from crewai.hooks import (
        register_before_tool_call_hook,
        unregister_before_tool_call_hook,
    )

    runs: dict[str, str] = {}

    def kickoff(source: Any, event: Any) -> None:
        runs[str(source.id)] = event.event_id

    def before_tool(ctx: Any) -> None:
        agent = ctx.agent
        llm = getattr(agent, "llm", None)
        stated = custody.defaults.get("justification")  # one given to Custody(...) itself wins
        custody.set_acting(
            agent=getattr(agent, "role", ""),
            model=getattr(llm, "model", "") if llm is not None and not isinstance(llm, str) else (llm or ""),
            run=runs.get(str(ctx.crew.id), str(ctx.crew.id)) if ctx.crew is not None else "",
            task=describe_task(ctx.task),
            prompt=f"tool:{ctx.tool_name}",
            justification=stated or justify(ctx.task),
        )
        if environment:
            custody.install()
        return None  # never blocks: the gateway decides

    crewai_event_bus.on(CrewKickoffStartedEvent)(kickoff)
    register_before_tool_call_hook(before_tool)
    if environment:
        custody.install()  # before any tool call: an MCP server's tools are listed when its agent starts

    def undo() -> None:
        unregister_before_tool_call_hook(before_tool)
        crewai_event_bus.off(CrewKickoffStartedEvent, kickoff)

    return undo
