"""promptmask: a model call's prompt masked before it leaves for the provider.

After the decision (and any approval) and before the request is recorded and sent, the
body of an allowed model call is masked with the decision's masks, the same masks that
mask its completion on the way back: what the messages, system prompt, instructions,
tool results and earlier tool calls carry (addons/engine/llm.py `mask_request`). The
recorder then stores the prompt as it left. A prompt that cannot be masked (an image, token
ids) is refused (403 `masking_refused`); when masking cannot run, nothing is sent (502
`masking_unavailable`). What was masked (counts, never values) is kept on the context
under `prompt`.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from addons import context, failclosed
from addons.engine import llm
from addons.engine.errors import Error
from addons.engine.masks import MaskError
from addons.failclosed import guarded
from addons.maskpool import MaskPool, MaskUnavailable

logger = logging.getLogger(__name__)


class PromptMask:
    def __init__(self, pool: MaskPool) -> None:
        self.pool = pool

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        if c.protocol != "llm" or c.operation is None or c.decision is None or c.decision.effect != "allow":
            return
        content = f.request.get_content(strict=False) or b""
        if not c.decision.masks or not content:
            return
        name = c.operation.details.get("endpoint", llm.OTHER)
        try:
            body, report = await self.pool.mask(content, llm.content_type("request", name), c.decision.masks)
        except MaskError as e:
            failclosed.refuse(f, 403, f"the prompt cannot be masked: {e}; nothing was sent", error=Error.MASKING_REFUSED,
                              rules=c.decision.rules)
            return
        except MaskUnavailable as e:
            logger.error("custody: masking unavailable for the prompt of flow %s: %s", f.id, e)
            failclosed.refuse(f, 502, f"{e}; the prompt was not sent", error=Error.MASKING_UNAVAILABLE)
            return
        if report["masked"]:
            f.request.content = body
        c.masking = {**(c.masking or {}), "prompt": report}
