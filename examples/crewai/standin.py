"""The deterministic stand-in model (examples/samples/standin.py) in process, as a CrewAI
LLM, so the crew runs offline and the same way every time without a model server. It
speaks CrewAI's ReAct text format. examples/sample_model.py serves the same stand-in over
HTTPS as an OpenAI- and Anthropic-compatible API, which crew.py uses with CREW_MODEL_URL.
"""

from __future__ import annotations

from typing import Any

from crewai import BaseLLM

from examples.samples import standin


class StandIn(BaseLLM):
    plans: dict[str, list[tuple[str, dict[str, Any]]]] = {}

    def call(self, messages, tools=None, callbacks=None, available_functions=None, from_task=None,
             from_agent=None, response_model=None, **kwargs) -> str:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        text = "\n".join(str(m.get("content", "")) for m in messages)
        # CrewAI appends each action with its observation as one assistant message.
        done = [str(m.get("content", "")) for m in messages if m.get("role") == "assistant"]
        return standin.reply(self.plans, text, len(done), done[-1] if done else "", []).text

    def supports_stop_words(self) -> bool:
        return False

    def get_context_window_size(self) -> int:
        return 16384

    def get_input_tokens_count(self, messages, tools=None, response_model=None) -> int:
        text = messages if isinstance(messages, str) else "".join(str(m.get("content", "")) for m in messages)
        return len(text) // 4
