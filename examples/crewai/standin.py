"""A deterministic local stand-in for an LLM, so the crew runs offline and the same way
every time: for each task (found by the "Task key:" line in its description) it plays a
fixed plan of tool calls in CrewAI's ReAct text format, then gives a final answer that
quotes the last observation (what the gateway answered). Swap in a real model with CREW_LLM=provider/model.
"""

from __future__ import annotations

import json
import re
from typing import Any

from crewai import BaseLLM

KEY = re.compile(r"Task key: ([\w-]+)")
TOOL = re.compile(r"Tool Name: (\S+)")
"""How CrewAI lists tools in the prompt; an MCP server's tools carry the server's name first."""


class StandIn(BaseLLM):
    plans: dict[str, list[tuple[str, dict[str, Any]]]] = {}

    def call(self, messages, tools=None, callbacks=None, available_functions=None, from_task=None,
             from_agent=None, response_model=None, **kwargs) -> str:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        text = "\n".join(str(m.get("content", "")) for m in messages)
        keys = KEY.findall(text)
        plan = self.plans.get(keys[-1] if keys else "", [])
        # CrewAI appends each action with its observation as one assistant message.
        done = [str(m.get("content", "")) for m in messages if m.get("role") == "assistant"]
        if len(done) < len(plan):
            tool, arguments = plan[len(done)]
            tool = next((t for t in TOOL.findall(text) if t == tool or t.endswith(f"_{tool}")), tool)
            return f"Thought: step {len(done) + 1} of my plan\nAction: {tool}\nAction Input: {json.dumps(arguments)}"
        last = done[-1].split("Observation:", 1)[-1].strip()[:400] if done else "nothing to do"
        return f"Thought: I now know the final answer\nFinal Answer: {last}"

    def supports_stop_words(self) -> bool:
        return False

    def get_context_window_size(self) -> int:
        return 16384

    def get_input_tokens_count(self, messages, tools=None, response_model=None) -> int:
        text = messages if isinstance(messages, str) else "".join(str(m.get("content", "")) for m in messages)
        return len(text) // 4
