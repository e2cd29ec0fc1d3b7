"""crew: CrewAI's own hooks and events fill in who is acting, so every request a tool
makes through the client helper, and every call to the model, says which agent (role),
model, crew run, task and tool caused it — and why: the task's description is the justification approvers see, unless
the code says otherwise (`Custody(..., justification=...)`, or `instrument(justify=...)`).

CrewAI runs event handlers on a thread pool, after the fact, so they cannot tag a tool's
requests; its `before_tool_call` and `before_llm_call` hooks run in the tool's (the model
call's) own thread and context, just before it, so the attributes are set there. The crew
run id comes from the CrewKickoffStarted event (the one event CrewAI waits for), keyed by
the crew. The gateway links a tool's requests to the model output that asked for them by
principal and run, so the model's calls must say the run too: `model()` gives CrewAI's own
OpenAI client (its native provider, the openai SDK) an HTTP client that carries the
attributes in force on every call (`Custody.live_httpx_client`).
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
        register_before_llm_call_hook,
        register_before_tool_call_hook,
        unregister_before_llm_call_hook,
        unregister_before_tool_call_hook,
    )

    runs: dict[str, str] = {}

    def kickoff(source: Any, event: Any) -> None:
        runs[str(source.id)] = event.event_id

    def acting(ctx: Any, **more: str) -> None:
        agent = ctx.agent
        llm = getattr(agent, "llm", None)
        stated = custody.defaults.get("justification")  # one given to Custody(...) itself wins
        custody.set_acting(
            agent=getattr(agent, "role", ""),
            model=getattr(llm, "model", "") if llm is not None and not isinstance(llm, str) else (llm or ""),
            run=runs.get(str(ctx.crew.id), str(ctx.crew.id)) if ctx.crew is not None else "",
            task=describe_task(ctx.task),
            justification=stated or justify(ctx.task),
            **more,
        )

    def before_tool(ctx: Any) -> None:
        acting(ctx, prompt=f"tool:{ctx.tool_name}")
        if environment:
            custody.install()
        return None  # never blocks: the gateway decides

    def before_llm(ctx: Any) -> None:
        acting(ctx)
        return None

    crewai_event_bus.on(CrewKickoffStartedEvent)(kickoff)
    register_before_tool_call_hook(before_tool)
    register_before_llm_call_hook(before_llm)
    if environment:
        custody.install()  # before any tool call: an MCP server's tools are listed when its agent starts

    def undo() -> None:
        unregister_before_tool_call_hook(before_tool)
        unregister_before_llm_call_hook(before_llm)
        crewai_event_bus.off(CrewKickoffStartedEvent, kickoff)

    return undo


def model(custody: Custody, model: str, base_url: str, function_calling: bool = True, **kwargs: Any) -> Any:
    """CrewAI's own OpenAI client (crewai's native OpenAI provider, on the openai SDK) for
    an OpenAI-compatible API reached through the gateway at `base_url`: every call carries
    the agent's current token (as the SDK's API key: the gateway holds the provider's) and
    the attributes in force (set by `instrument`'s hooks). Without `function_calling`,
    CrewAI asks for tools in its ReAct text format, as it does with models that have none."""
    from crewai.llms.providers.openai.completion import OpenAICompletion
    from openai import AsyncOpenAI, OpenAI

    class Governed(OpenAICompletion):
        """The native provider with the SDK's HTTP clients through the gateway."""

        def _build_sync_client(self) -> Any:
            return OpenAI(**{**self._get_client_params(), "http_client": custody.live_httpx_client()})

        def _build_async_client(self) -> Any:
            return AsyncOpenAI(**{**self._get_client_params(), "http_client": custody.live_httpx_client(True)})

        def supports_function_calling(self) -> bool:
            return function_calling and super().supports_function_calling()

    return Governed(model=model, base_url=base_url, api_key="held-by-the-gateway", **kwargs)
