"""The masking workers: content detection in processes, off mitmproxy's event loop.

Detection is CPU work, and a thread would still stall every other flow through the GIL,
so bodies are masked in a process pool. Each worker builds its Presidio recognizers once
(at start, in the background; until then masking is "not ready" and masked responses are
refused). Bodies of at most INLINE bytes (a SQL row, a small JSON answer) are masked in a
thread of the gateway with its own detector: they take tens of microseconds, where a trip
to a worker process costs about a millisecond; a detector that hangs there is dropped and
the workers take over. Streams and WebSocket frames are
masked with that detector too (addons/masking.py). A job that fails, times out or loses its worker raises MaskUnavailable, and a
pool that timed out or broke is replaced, so one bad body cannot wedge the gateway.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from addons.engine import mcp
from addons.engine.config import MaskingConfig
from addons.engine.masks import Masker, MaskError, Report, parse_all
from addons.settings import Settings

logger = logging.getLogger(__name__)

_state: dict[str, Any] = {}  # per worker process
INLINE = 1024


class MaskUnavailable(Exception):
    """Masking could not run (not ready, timed out, worker died): refuse, never pass on."""


def _detector(ner_model: str | None):
    from addons.engine.detectors import Detector  # Presidio: imported off the event loop

    return Detector(ner_model)


def _init(hash_key: bytes, ner_model: str | None) -> None:
    _state["detector"] = _detector(ner_model)
    _state["key"] = hash_key


@functools.lru_cache(maxsize=256)
def _masker(masks_json: str) -> Masker:
    return Masker(parse_all(json.loads(masks_json)), _state["detector"], _state["key"])


def _ping() -> int:
    import os

    return os.getpid()


def masked_body(masker: Masker, content: bytes, content_type: str) -> tuple[bytes, Report]:
    """A body masked as what it is: MCP messages message by message, anything else by type."""
    if content_type == mcp.MCP_MESSAGES:
        return mcp.mask_body(masker, content)
    return masker.body(content, content_type)


def _mask(content: bytes, content_type: str, masks_json: str) -> tuple[bytes, dict]:
    out, report = masked_body(_masker(masks_json), content, content_type)
    return out, report.as_dict()


def masks_json(masks: tuple) -> str:
    return json.dumps(list(masks), sort_keys=True)


class MaskPool:
    """A shared service (like the audit log): the masking addon, the recorder and the
    approval addon all mask through it. Started when the gateway runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.masking = MaskingConfig()
        self.executor: ProcessPoolExecutor | None = None
        self.ready: asyncio.Future | None = None
        self.detector = None
        self.inline = True
        self._loading: asyncio.Future | None = None

    def configure(self, updated: set[str]) -> None:
        if "custody_config" in updated:
            self.masking = self.settings.require().masking
            MaskPool._local.cache_clear()
            if self.executor is not None:
                self.restart("the configuration changed")

    def running(self) -> None:
        self.start()
        self._loading = asyncio.ensure_future(self._load_detector())

    async def _load_detector(self) -> None:
        self.detector = await asyncio.to_thread(_detector, self.masking.ner_model)

    @functools.lru_cache(maxsize=256)
    def _local(self, masks: str) -> Masker:
        return Masker(parse_all(json.loads(masks)), self.detector, self.masking.hash_key)

    def masker(self, masks: tuple) -> Masker:
        """A masker in this process, for records masked as they stream (MaskError when it
        needs detection and the detector is not loaded yet)."""
        return self._local(masks_json(masks))

    def done(self) -> None:
        self.close()

    def start(self) -> None:
        self.executor = ProcessPoolExecutor(
            self.masking.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init,
            initargs=(self.masking.hash_key, self.masking.ner_model),
        )
        self.ready = asyncio.ensure_future(self._warm(self.executor))

    async def _warm(self, executor: ProcessPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(executor, _ping) for _ in range(self.masking.workers)))
        logger.info("custody: %d masking worker(s) ready", self.masking.workers)

    def close(self) -> None:
        if self.executor is not None:
            for process in list(getattr(self.executor, "_processes", {}).values()):
                process.kill()
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None
        if self.ready is not None:
            self.ready.cancel()

    def restart(self, why: str) -> None:
        logger.error("custody: restarting the masking workers: %s", why)
        self.close()
        self.start()

    async def mask(self, content: bytes, content_type: str, masks: tuple) -> tuple[bytes, dict]:
        """The masked body and its report; MaskError for bodies that cannot be masked."""
        timeout = self.masking.timeout
        if len(content) <= INLINE and self.detector is not None and self.inline:
            masker = self._local(masks_json(masks))
            try:
                out, report = await asyncio.wait_for(asyncio.to_thread(masked_body, masker, content, content_type),
                                                     timeout)
            except MaskError:
                raise
            except TimeoutError:
                self.inline = False  # a detector that hung here stays out of this process
                logger.error("custody: masking in the gateway process hung; using the workers only from now on")
                raise MaskUnavailable(f"masking did not finish within {timeout:g}s") from None
            except Exception as e:
                raise MaskUnavailable(f"masking failed: {type(e).__name__}: {e}") from None
            return out, report.as_dict()
        try:
            await asyncio.wait_for(asyncio.shield(self.ready), timeout)
        except (TimeoutError, asyncio.CancelledError):
            raise MaskUnavailable("masking is not ready") from None
        except Exception as e:
            self.restart(f"workers failed to start: {e}")
            raise MaskUnavailable(f"masking workers failed to start: {type(e).__name__}") from None
        executor = self.executor
        job = asyncio.get_running_loop().run_in_executor(executor, _mask, content, content_type, masks_json(masks))
        try:
            return await asyncio.wait_for(job, timeout)
        except MaskError:
            raise
        except TimeoutError:
            self.restart("a job timed out")
            raise MaskUnavailable(f"masking did not finish within {timeout:g}s") from None
        except BrokenProcessPool:
            if executor is self.executor:
                self.restart("a worker died")
            raise MaskUnavailable("a masking worker died") from None
        except Exception as e:
            raise MaskUnavailable(f"masking failed: {type(e).__name__}: {e}") from None

    async def for_record(self, content: bytes | None, content_type: str, masks: tuple) -> tuple[bytes | None, str]:
        """A body as it may be stored: masked, or withheld (None) with the reason why."""
        if not content or not masks:
            return content, ""
        try:
            masked, _ = await self.mask(content, content_type, masks)
        except (MaskError, MaskUnavailable) as e:
            return None, f"withheld: {e}"
        return masked, ""
