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
import dataclasses
import functools
import gc
import json
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from addons.context import Context
from addons.engine import llm, mcp, metrics
from addons.engine.config import MaskingConfig
from addons.engine.masks import (
    FRAMING_HEADERS,
    OPERATION,
    Masker,
    MaskError,
    Report,
    parse_all,
)
from addons.engine.model import Operation, canonical_json
from addons.settings import Settings

logger = logging.getLogger(__name__)

_state: dict[str, Any] = {}  # per worker process
INLINE = 1024
RECORD_MASKS = ("secrets",)
"""Applied to every recorded header, on top of the flow's own masks."""


class MaskUnavailable(Exception):
    """Masking could not run (not ready, timed out, worker died): refuse, never pass on."""


def _detector(ner_model: str | None):
    from addons.engine.detectors import (
        Detector,  # Presidio: imported off the event loop
    )

    return Detector(ner_model)


def _init(hash_key: bytes, ner_model: str | None, parent: int) -> None:
    threading.Thread(target=_outlive_no_parent, args=(parent,), name="custody-parent-watch", daemon=True).start()
    _state["detector"] = _detector(ner_model)
    _state["key"] = hash_key
    gc.freeze()  # Presidio's objects, for good: a full collection during a large body walked them all (pauses of 100+ ms)


def _outlive_no_parent(parent: int) -> None:
    """A worker ends when the gateway that started it is gone (killed with -9, say):
    nothing else would tell it, and it would run on, orphaned."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


@functools.lru_cache(maxsize=256)
def _masker(masks_json: str) -> Masker:
    return Masker(parse_all(json.loads(masks_json)), _state["detector"], _state["key"])


def _ping() -> int:
    return os.getpid()


def masked_body(masker: Masker, content: bytes, content_type: str) -> tuple[bytes, Report]:
    """A body masked as what it is: MCP messages message by message, a model call's prompt
    or completion part by part, anything else by type."""
    if content_type == mcp.MCP_MESSAGES:
        return mcp.mask_body(masker, content)
    if content_type.startswith(llm.TYPE_PREFIX):
        return llm.mask_body(masker, content, content_type)
    return masker.body(content, content_type)


def masked_bodies(masker: Masker, items: list[tuple[bytes, str]]) -> list[tuple[bytes, Report] | MaskError]:
    """Several bodies, one after the other; one that cannot be masked gives its MaskError."""
    out: list[tuple[bytes, Report] | MaskError] = []
    for content, content_type in items:
        try:
            out.append(masked_body(masker, content, content_type))
        except MaskError as e:
            out.append(e)
    return out


def _mask(content: bytes, content_type: str, masks_json: str) -> tuple[bytes, dict]:
    out, report = masked_body(_masker(masks_json), content, content_type)
    return out, report.as_dict()


def operation_doc(op: Operation, masks: tuple) -> bytes | None:
    """What of an operation is masked for its record (its details, and each part's when it
    has several); None when nothing is to be masked."""
    if not masks:
        return None
    recorded = op.parts if len(op.parts) > 1 else ()  # one statement is its operation (Operation.as_dict)
    return canonical_json({"details": op.details, "parts": [p.details for p in recorded]}).encode()


def recorded_operation(op: Operation, masked: bytes | None, withheld: str) -> Operation:
    """The operation with `operation_doc` masked back in, or its details withheld."""
    recorded = op.parts if len(op.parts) > 1 else ()
    if masked is None:
        doc = {"details": {"withheld": withheld}, "parts": [{"withheld": withheld} for _ in recorded]}
    else:
        doc = json.loads(masked)
    parts = tuple(dataclasses.replace(p, details=d) for p, d in zip(recorded, doc["parts"]))
    return dataclasses.replace(op, details=doc["details"], parts=parts or op.parts[:0])


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
        if self.settings.changed(updated):
            self.masking = self.settings.require().masking
            MaskPool._local.cache_clear()
            if self.executor is not None:
                self.restart("the configuration changed", self.executor)

    def running(self) -> None:
        self.start()
        self._loading = asyncio.ensure_future(self._load_detector())

    async def _load_detector(self) -> None:
        self.detector = await asyncio.to_thread(_detector, self.masking.ner_model)

    async def loaded(self) -> bool:
        """Wait (up to the masking timeout) for this process's detector, which frames and
        streams are masked with; False if it is not there by then."""
        if self.detector is None and self._loading is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._loading), self.masking.timeout)
            except (TimeoutError, asyncio.CancelledError, Exception):
                return False
        return self.detector is not None

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
            initargs=(self.masking.hash_key, self.masking.ner_model, os.getpid()),
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

    def restart(self, why: str, executor: ProcessPoolExecutor | None) -> None:
        """Replace the pool `executor`, unless that already happened: jobs that fail together
        (they time out or lose their worker at once) restart it once, not once each."""
        if executor is not self.executor:
            return
        logger.error("custody: restarting the masking workers: %s", why)
        self.close()
        self.start()

    async def mask(self, content: bytes, content_type: str, masks: tuple) -> tuple[bytes, dict]:
        """The masked body and its report; MaskError for bodies that cannot be masked. Timed
        by where it is sent: this process's detector (inline) or the workers."""
        where = "inline" if len(content) <= INLINE and self._here() else "worker"
        with metrics.MASKING_SECONDS.labels(where).time():
            return await self._dispatch(content, content_type, masks)

    async def _dispatch(self, content: bytes, content_type: str, masks: tuple) -> tuple[bytes, dict]:
        timeout = self.masking.timeout
        deadline = time.monotonic() + timeout
        if len(content) <= INLINE and self._here():
            return await self._mask_here(content, content_type, masks, deadline)
        for attempt in (1, 2):  # a pool found broken is replaced, and the job tried on the new one
            if attempt == 2 and self._here() and self.ready is not None and not self.ready.done():
                # the new workers are still loading: this process's detector masks meanwhile
                return await self._mask_here(content, content_type, masks, deadline)
            executor = await self._ready(deadline)
            try:
                job = asyncio.get_running_loop().run_in_executor(
                    executor, _mask, content, content_type, masks_json(masks))
                return await asyncio.wait_for(job, max(0.0, deadline - time.monotonic()))
            except MaskError:
                raise
            except TimeoutError:
                self.restart("a job timed out", executor)
                raise MaskUnavailable(f"masking did not finish within {timeout:g}s") from None
            except BrokenProcessPool:
                self.restart("a worker died", executor)
                if attempt == 2:
                    raise MaskUnavailable("a masking worker died") from None
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise  # this flow's own task is being cancelled: not masking's to answer
                # the pool was replaced under this job (another job restarted it): try the new one
                if attempt == 2:
                    raise MaskUnavailable("the masking workers were restarted during the job") from None
            except Exception as e:
                raise MaskUnavailable(f"masking failed: {type(e).__name__}: {e}") from None
        raise MaskUnavailable("masking could not run")

    def _here(self) -> bool:
        """Whether this process's own detector may mask (loaded, and never found hung)."""
        return self.detector is not None and self.inline

    async def _mask_here(self, content: bytes, content_type: str, masks: tuple, deadline: float) -> tuple[bytes, dict]:
        out, report = await self._here_job(masked_body, (content, content_type), masks, deadline)
        return out, report.as_dict()

    async def _here_job(self, job, args: tuple, masks: tuple, deadline: float):
        """`job(masker, *args)` in a thread of this process, within the deadline."""
        timeout = self.masking.timeout
        masker = self._local(masks_json(masks))
        try:
            return await asyncio.wait_for(asyncio.to_thread(job, masker, *args), max(0.0, deadline - time.monotonic()))
        except MaskError:
            raise
        except TimeoutError:
            self.inline = False  # a detector that hung here stays out of this process
            logger.error("custody: masking in the gateway process hung; using the workers only from now on")
            raise MaskUnavailable(f"masking did not finish within {timeout:g}s") from None
        except Exception as e:
            raise MaskUnavailable(f"masking failed: {type(e).__name__}: {e}") from None

    async def _ready(self, deadline: float) -> ProcessPoolExecutor:
        """The pool once its workers answer; restarted when it failed to start."""
        executor = self.executor
        try:
            await asyncio.wait_for(asyncio.shield(self.ready), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise MaskUnavailable("masking is not ready") from None
        except asyncio.CancelledError:
            if (task := asyncio.current_task()) is not None and task.cancelling():
                raise
            raise MaskUnavailable("masking is not ready (the workers are being restarted)") from None
        except Exception as e:
            self.restart(f"workers failed to start: {e}", executor)
            raise MaskUnavailable(f"masking workers failed to start: {type(e).__name__}") from None
        if executor is not self.executor or self.executor is None:
            raise MaskUnavailable("masking is not ready (the workers are being restarted)")
        return executor

    def headers_for_record(self, headers: Any, masks: tuple) -> list[tuple[str, str]]:
        """Headers as they may be stored: the flow's masks and secret detection applied,
        whatever the rules said (a secret never reaches disk through a header); values
        withheld while the detector is not loaded."""
        fields = list(headers.items(multi=True))
        if self.detector is None:
            return [(k, v if k.lower() in FRAMING_HEADERS else "[withheld: masking is not ready]") for k, v in fields]
        return self._local(masks_json(tuple(masks) + RECORD_MASKS)).headers(fields, Report())

    async def fix_record(self, ctx: Context) -> tuple:
        """Fix the masks of the flow's record and what its operation looks like on record,
        once: every event of the flow then shows the same masked text, even after a late
        refusal dropped the decision's masks. The masks."""
        masks, _ = await self.fix_record_with(ctx)
        return masks

    async def fix_record_with(self, ctx: Context, *bodies: tuple[bytes | None, str]
                              ) -> tuple[tuple, list[tuple[bytes | None, str]]]:
        """`fix_record`, and `bodies` (content, type) as they may be stored (`for_record`),
        masked together with the operation: a request's operation and its body are one job,
        not two trips to a thread."""
        if ctx.record_masks is None:
            ctx.record_masks = tuple(ctx.decision.masks) if ctx.decision else ()
        masks = ctx.record_masks
        pending = ctx.recorded_operation is None and ctx.operation is not None
        doc = operation_doc(ctx.operation, masks) if pending else None
        stored = await self.for_records([*bodies, (doc, OPERATION)], masks)
        if pending:
            ctx.recorded_operation = recorded_operation(ctx.operation, *stored[-1]) if doc else ctx.operation
        return masks, stored[:-1]

    async def for_records(self, items: list[tuple[bytes | None, str]], masks: tuple) -> list[tuple[bytes | None, str]]:
        """`for_record` of each item; small ones in one job of this process's detector."""
        out = [(content, "") for content, _ in items]
        todo = [i for i, (content, _) in enumerate(items) if content and masks]
        if len(todo) < 2 or not self._here() or any(len(items[i][0]) > INLINE for i in todo):
            for i in todo:
                out[i] = await self.for_record(*items[i], masks)
            return out
        try:
            with metrics.MASKING_SECONDS.labels("inline").time():
                done = await self._here_job(masked_bodies, ([items[i] for i in todo],), masks,
                                            time.monotonic() + self.masking.timeout)
        except MaskUnavailable as e:
            return [(None, f"withheld: {e}") if i in todo else out[i] for i in range(len(items))]
        for i, result in zip(todo, done):
            out[i] = (None, f"withheld: {result}") if isinstance(result, MaskError) else (result[0], "")
        return out

    async def for_record(self, content: bytes | None, content_type: str, masks: tuple) -> tuple[bytes | None, str]:
        """A body as it may be stored: masked, or withheld (None) with the reason why."""
        if not content or not masks:
            return content, ""
        try:
            masked, _ = await self.mask(content, content_type, masks)
        except (MaskError, MaskUnavailable) as e:
            return None, f"withheld: {e}"
        return masked, ""
