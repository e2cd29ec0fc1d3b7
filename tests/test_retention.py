"""Retention: `store.retention` prunes a real gateway's audit log by itself, behind a signed
checkpoint, archiving first; the chain still verifies (`custody audit verify`, and the
archive against the checkpoint), and nothing a sink has not delivered is ever pruned."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import standard_gateway
from tests.support.approvals import wait_for
from tests.support.gateway import Gateway
from tests.support.sinks import WebhookReceiver
from tests.test_sinks import assert_at_least_once_in_order, recorded, traffic

RETENTION = {"retention": "1s", "prune_every": "300ms"}


def retained(tmp_path, servers, store: dict, sinks: list | None = None) -> Gateway:
    gw = standard_gateway(tmp_path / "gw", servers, store=store)
    if sinks:
        gw.config["sinks"] = sinks
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    return gw


def checkpoint(gw: Gateway) -> dict | None:
    store = gw.store()
    try:
        return store.checkpoint()
    finally:
        store.close()


def test_old_events_are_archived_then_pruned_and_the_chain_still_verifies(tmp_path, servers, keys, jwks):
    gw = retained(tmp_path, servers, {**RETENTION, "archive": "archive"}).start()
    token = keys["rsa"].token(jwks.issuer, groups=["analysts"])
    try:
        traffic(gw, token, "old")
        old = recorded(gw)
        wait_for(lambda: (doc := checkpoint(gw)) is not None and doc["seq"] >= old[-1])  # all of them, in rounds
        assert not set(old) & set(recorded(gw))
        traffic(gw, token, "new")
    finally:
        gw.stop()
    doc = checkpoint(gw)
    archives = sorted((gw.dir / "archive").glob("custody-audit-*.jsonl"))
    archived = [json.loads(line)["seq"] for a in archives for line in a.read_text().splitlines()]
    assert archived == list(range(1, doc["seq"] + 1))  # every pruned event, once, in order
    kept = recorded(gw)
    assert kept[0] == doc["seq"] + 1
    assert [e["kind"] for e in gw.events() if e["kind"] == "prune"]  # each prune is on record
    out = gw.custody("audit", "verify")
    assert out.returncode == 0 and f"checkpoint: events 1–" in out.stdout, out.stdout + out.stderr
    out = gw.custody("audit", "verify", "--export", str(archives[0]))
    assert out.returncode == 0 and "is the store's signed checkpoint" in out.stdout, out.stdout + out.stderr


def test_nothing_a_sink_has_not_delivered_is_pruned(tmp_path, servers, keys, jwks):
    """The sink is down: however old the events, they stay; once it is back and has them,
    they go, and the sink got every one of them."""
    hook = WebhookReceiver(failing=True)
    gw = retained(tmp_path, servers, RETENTION,
                  [{"name": "siem", "type": "webhook", "url": hook.url, "interval": "100ms"}]).start()
    token = keys["rsa"].token(jwks.issuer, groups=["analysts"])
    try:
        traffic(gw, token, "held")
        # five failed deliveries: backing off 0.2 s, 0.4 s, 0.8 s, 1.6 s, past the retention several rounds over
        wait_for(lambda: hook.attempts >= 5, timeout=30)
        assert checkpoint(gw) is None and recorded(gw)[0] == 1
        hook.failing = False
        doc = wait_for(lambda: checkpoint(gw), timeout=30)
        assert doc["seq"] <= max(hook.seqs)  # only what the sink had
    finally:
        gw.stop()
        hook.stop()
    out = gw.custody("audit", "verify")
    assert out.returncode == 0, out.stdout + out.stderr
    seen = set(hook.seqs)
    assert set(range(1, doc["seq"] + 1)) <= seen  # every pruned event reached the sink first


@pytest.mark.parametrize("store, error", [
    ({"retention": "ninety days"}, "retention"),
    ({"prune_every": "-1s"}, "prune_every"),
])
def test_a_retention_that_is_not_one_is_refused(tmp_path, servers, store, error):
    gw = retained(tmp_path, servers, store)
    status, output = gw.run_to_exit()
    assert status == 1 and error in output
