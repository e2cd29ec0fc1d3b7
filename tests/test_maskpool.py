"""What the recorder stores of a request: its operation and its body, masked in one job of
the gateway's own detector when both are small (each job is a trip to a thread and back),
and each withheld on its own when it cannot be masked."""

from __future__ import annotations

import asyncio
import functools
import json

import pytest

from addons import maskpool
from addons.classifiers import ssh as shellops
from addons.context import Context
from addons.engine.model import Decision
from addons.maskpool import MaskPool

AWS = "AKIAIOSFODNN7EXAMPLE"


@functools.cache
def detector():
    from addons.engine.detectors import Detector  # Presidio

    return Detector(None)


def pool() -> MaskPool:
    p = MaskPool(None)
    p.detector = detector()
    return p


def context(line: str, masks: tuple) -> Context:
    return Context(session="s", operation=shellops.classify("prod-web", "exec", line),
                   decision=Decision("allow", masks=masks))


@pytest.fixture
def jobs(monkeypatch):
    """The trips to a thread the pool makes."""
    made = []
    real = asyncio.to_thread

    async def counted(fn, *args):
        made.append(fn.__name__)
        return await real(fn, *args)

    monkeypatch.setattr(maskpool.asyncio, "to_thread", counted)
    return made


BODY = json.dumps({"command": f"echo {AWS}"}).encode()


@pytest.mark.parametrize(
    "line, masks, body, stored_body, withheld, made",
    [
        # both masked, in one job
        (f"echo {AWS}", ("secrets",), (BODY, "application/json"), b'{"command":"echo [AWS_ACCESS_KEY_ID]"}', "",
         ["masked_bodies"]),
        # no body: the operation alone
        (f"echo {AWS}", ("secrets",), (None, "application/json"), None, "", ["masked_body"]),
        # no masks: stored as it is, no job
        (f"echo {AWS}", (), (BODY, "application/json"), BODY, "", []),
        # a body its masks cannot mask is withheld, and only it: the operation is still masked
        (f"echo {AWS}", ("secrets",), (b"\xff\xfe\x00binary", "application/octet-stream"), None,
         "withheld: the response body (application/octet-stream) is not text and cannot be masked", ["masked_bodies"]),
    ],
)
def test_a_requests_operation_and_body_are_masked_for_the_record_together(jobs, line, masks, body, stored_body,
                                                                          withheld, made):
    ctx = context(line, masks)
    recorded_masks, [(stored, reason)] = asyncio.run(pool().fix_record_with(ctx, body))
    assert (recorded_masks, stored, reason, jobs) == (masks, stored_body, withheld, made)
    line = ctx.recorded_operation.details["line"]
    assert line == (f"echo {AWS}" if not masks else "echo [AWS_ACCESS_KEY_ID]")
    assert ctx.operation.details["line"] == f"echo {AWS}"  # what policy saw is not changed


def test_the_operation_is_fixed_once_and_later_bodies_go_alone(jobs):
    ctx = context(f"echo {AWS}", ("secrets",))
    p = pool()
    asyncio.run(p.fix_record_with(ctx))
    first = ctx.recorded_operation
    _, [(stored, _)] = asyncio.run(p.fix_record_with(ctx, (BODY, "application/json")))
    assert ctx.recorded_operation is first and stored == b'{"command":"echo [AWS_ACCESS_KEY_ID]"}'
    assert jobs == ["masked_body", "masked_body"]


def test_a_failing_detector_withholds_both_and_says_why(jobs, monkeypatch):
    ctx = context(f"echo {AWS}", ("secrets",))

    def broken(masker, items):
        raise RuntimeError("detector exploded")

    monkeypatch.setattr(maskpool, "masked_bodies", broken)
    _, [(stored, reason)] = asyncio.run(pool().fix_record_with(ctx, (BODY, "application/json")))
    assert (stored, reason) == (None, "withheld: masking failed: RuntimeError: detector exploded")
    assert ctx.recorded_operation.details == {"withheld": "withheld: masking failed: RuntimeError: detector exploded"}
