"""The example's deterministic stand-in for a model: what it answers a conversation.

For each task (found by the "Task key:" line in the conversation) it plays a fixed plan:
one tool call per step, then a final answer that quotes the last tool result (what the
gateway let through). A step is `[tool, arguments]`, or `{"say": text}` for a turn that
only talks. It asks for tools the way it was offered them: as function calls when the
call offers tools, else in CrewAI's ReAct text (`Action:` / `Action Input:`). Served over
HTTPS by examples/sample_model.py, and in process by examples/crewai/standin.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

KEY = re.compile(r"Task key: ([\w-]+)")
TOOL = re.compile(r"Tool Name: (\S+)")
"""How CrewAI lists tools in a ReAct prompt; an MCP server's tools carry the server's name first."""
MODEL = "custody-standin/scripted-1"

CREW_PLANS: dict[str, list] = {
    "stock-check": [["inventory_api", {"method": "GET", "path": "/items"}],
                    ["sql", {"query": "SELECT item, sum(quantity) FROM orders GROUP BY item"}]],
    "restock": [["inventory_api", {"method": "POST", "path": "/orders", "body": {"item": 1, "quantity": 500}}]],
    "tidy-schema": [["sql", {"query": "DROP TABLE orders"}], ["kubectl", {"args": "get pods -n shop"}]],
    "triage": [["search_tickets", {"query": "VPN"}]],  # the MCP server's tool, as CrewAI names it
}
"""The example crew's plans (examples/crewai/crew.py)."""


@dataclass(frozen=True)
class Turn:
    """One answer: text, or a tool call (name and arguments) with the text before it."""

    text: str
    tool: str = ""
    arguments: dict[str, Any] | None = None
    react: bool = False


def reply(plans: dict[str, list], conversation: str, done: int, last_result: str, offered: list[str]) -> Turn:
    """The next turn of the plan the conversation's task key names. `done` is how many
    steps were taken (tool results seen); `offered` the function tools the call offers
    (none: the agent reads tools from the prompt, in ReAct form)."""
    keys = KEY.findall(conversation)
    plan = plans.get(keys[-1] if keys else "", [])
    if done < len(plan):
        step = plan[done]
        if isinstance(step, dict):
            return Turn(step["say"])
        tool, arguments = step
        names = offered or TOOL.findall(conversation)
        tool = next((t for t in names if t == tool or t.endswith(f"_{tool}")), tool)
        if offered:
            return Turn(f"step {done + 1} of my plan", tool, arguments)
        return Turn(f"Thought: step {done + 1} of my plan\nAction: {tool}\nAction Input: {json.dumps(arguments)}",
                    tool, arguments, react=True)
    answer = last_result.split("Observation:", 1)[-1].strip()[:400] if last_result else "nothing to do"
    return Turn(answer if offered else f"Thought: I now know the final answer\nFinal Answer: {answer}")
