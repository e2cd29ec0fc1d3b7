"""Audit streaming: each sink against a real receiver, with an outage and a gateway restart
in the middle. What is promised, and asserted: every event recorded reaches the sink
(none lost), in the chain's order, and an event is delivered again only by restarting from
the cursor (at-least-once: a re-delivery goes back, never skips ahead); the data path never
waits for a sink, and backlog, lag and failures are metrics."""

from __future__ import annotations

import json

import psycopg
import pytest
import yaml

from tests.conftest import standard_gateway
from tests.support.approvals import wait_for
from tests.support.gateway import Gateway
from tests.support.servers import free_port
from tests.support.sinks import FileReceiver, OtlpReceiver, SyslogReceiver, WebhookReceiver
from tests.test_metrics import scrape, value
from tests.test_replicas import database, environment, pg, replica  # noqa: F401  (fixtures: a real PostgreSQL)

BATCH = 3


def receiver(kind: str, tmp_path, ca):
    if kind == "syslog":
        return SyslogReceiver(), lambda r: {"type": "syslog", "address": f"127.0.0.1:{r.port}"}
    if kind == "syslog-tls":
        return (SyslogReceiver(tls=ca.issue("localhost")),
                lambda r: {"type": "syslog", "address": f"localhost:{r.port}", "tls": {"ca_file": str(ca.cert_file)}})
    if kind == "otlp":
        return OtlpReceiver(), lambda r: {"type": "otlp", "url": r.url}
    if kind == "webhook":
        return WebhookReceiver(), lambda r: {"type": "webhook", "url": r.url, "token": "env:SINK_TOKEN"}
    return FileReceiver(tmp_path / "audit.jsonl"), lambda r: {"type": "file", "path": str(r.path)}


def streaming(tmp_path, servers, sink: dict) -> Gateway:
    gw = standard_gateway(tmp_path / "gw", servers, env={"TEST_API_TOKEN": "x", "SINK_TOKEN": "sink-secret"})
    port = free_port()
    gw.config.update(sinks=[{"name": "siem", "batch": BATCH, "interval": "100ms", "timeout": "2s", **sink}],
                     metrics={"listen": f"127.0.0.1:{port}"})
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    gw.metrics_url = f"http://127.0.0.1:{port}/metrics"
    return gw


def recorded(gw: Gateway) -> list[int]:
    return [e["seq"] for e in gw.events()]


def caught_up(gw: Gateway, got) -> bool:
    return set(got.seqs) >= set(recorded(gw))


def traffic(gw: Gateway, agent_token: str, tag: str, count: int = 4) -> None:
    """Requests the data path answers whatever the sink is doing."""
    agent = gw.session(agent_token)
    assert [agent.get(f"http://api.test/items/{tag}-{n}", timeout=10).status_code for n in range(count)] == [200] * count


def assert_at_least_once_in_order(received: list[int], expected: list[int]) -> None:
    assert set(received) == set(expected)  # none lost, nothing else
    first = list(dict.fromkeys(received))
    assert first == sorted(expected)  # in the chain's order
    for before, after in zip(received, received[1:]):
        assert after == before + 1 or after <= before  # a re-delivery restarts from the cursor, never skips


@pytest.mark.parametrize("kind", ["syslog", "syslog-tls", "otlp", "webhook", "file"])
def test_a_sink_gets_every_event_in_order_through_an_outage_and_a_restart(tmp_path, servers, ca, keys, jwks, kind):
    got, sink = receiver(kind, tmp_path, ca)
    gw = streaming(tmp_path, servers, sink(got))
    token = keys["rsa"].token(jwks.issuer, groups=["analysts"])
    gw.start()
    try:
        traffic(gw, token, "before")
        assert wait_for(lambda: caught_up(gw, got))
        got.down()
        traffic(gw, token, "outage")  # answered while the sink is down
        assert wait_for(lambda: value(scrape(gw), "custody_sink_failures_total", sink="siem") >= 1)
        # every retry reads the backlog again: the 4 requests of the outage, 2 events each at least
        assert wait_for(lambda: value(scrape(gw), "custody_sink_backlog", sink="siem") >= 8)
        assert value(scrape(gw), "custody_sink_lag_seconds", sink="siem") > 0
        gw.stop()
        gw.start()  # the cursor is in the store: the new process resumes from it
        traffic(gw, token, "restarted")
        got.up()
        assert wait_for(lambda: caught_up(gw, got), timeout=60)
        assert wait_for(lambda: value(scrape(gw), "custody_sink_backlog", sink="siem") == 0)
        assert value(scrape(gw), "custody_sink_lag_seconds", sink="siem") == 0
    finally:
        gw.stop()
        if hasattr(got, "stop"):
            got.stop()
    assert_at_least_once_in_order(got.seqs, recorded(gw))
    assert not getattr(got, "bad", [])


def test_what_each_sink_carries(tmp_path, servers, ca, keys, jwks):
    """The event as the store holds it (its hash included, the body by digest), in each format."""
    syslog, otlp, hook = SyslogReceiver(), OtlpReceiver(), WebhookReceiver()
    gw = standard_gateway(tmp_path / "gw", servers, env={"TEST_API_TOKEN": "x", "SINK_TOKEN": "sink-secret"})
    gw.config["sinks"] = [{"name": "s", "type": "syslog", "address": f"127.0.0.1:{syslog.port}", "interval": "100ms"},
                          {"name": "o", "type": "otlp", "url": otlp.url, "interval": "100ms"},
                          {"name": "w", "type": "webhook", "url": hook.url, "token": "env:SINK_TOKEN",
                           "interval": "100ms"},
                          {"type": "stdout", "interval": "100ms"}]
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    gw.start()
    try:
        denied = gw.session(keys["rsa"].token(jwks.issuer, sub="ana", groups=["analysts"])).get(
            "http://api.test/admin/x")
        assert denied.status_code == 403
        event_id = denied.json()["event_id"]
        decision = gw.event(event_id)
        wait_for(lambda: all(decision["seq"] in r.seqs for r in (syslog, otlp, hook)))
        stdout = wait_for(lambda: [json.loads(line) for line in gw.log().splitlines()
                                   if line.startswith('{"seq":') and event_id in line])
    finally:
        gw.stop()
        otlp.stop()
        hook.stop()
    message = next(m for m in syslog.messages if m["id"] == event_id)
    assert (message["pri"], message["msgid"], message["app"]) == (13 * 8 + 4, "decision", "custody")  # warning
    assert message["hash"] == decision["hash"] and message["event"]["principal"]["subject"] == "ana"
    record = next(r for r in otlp.records if json.loads(r["body"]["stringValue"])["id"] == event_id)
    assert (record["severityNumber"], record["severityText"], record["eventName"]) == (13, "WARN", "custody.decision")
    attributes = {a["key"]: a["value"] for a in record["attributes"]}
    assert attributes["custody.hash"] == {"stringValue": decision["hash"]}
    assert attributes["custody.seq"] == {"intValue": str(decision["seq"])}
    assert {"key": "service.name", "value": {"stringValue": "custody"}} in otlp.resources[0]["attributes"]
    shipped = next(e for batch in hook.received for e in batch["events"] if e["id"] == event_id)
    assert shipped["effect"] == "deny" and shipped["rules"] == ["admin-denied"] and "body" not in shipped
    assert stdout[0] == shipped
    assert not syslog.bad and not otlp.bad


@pytest.mark.parametrize("sink, error", [
    ({"type": "file"}, "path"),
    ({"type": "syslog", "address": "siem"}, "address"),
    ({"type": "otlp", "url": "collector:4318"}, "url"),
    ({"type": "kafka", "url": "http://x"}, "type"),
    ({"type": "webhook", "url": "http://x", "token": "literal-secret"}, "token"),
    ({"type": "webhook", "url": "http://x", "token": "env:UNSET_SINK_TOKEN"}, "UNSET_SINK_TOKEN is not set"),
])
def test_a_sink_that_cannot_work_stops_the_gateway_at_start(tmp_path, servers, sink, error):
    gw = standard_gateway(tmp_path, servers)
    gw.config["sinks"] = [sink]
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    status, output = gw.run_to_exit()
    assert status == 1
    assert "sinks" in output and error in output


def test_two_sinks_may_not_share_a_cursor(tmp_path, servers):
    gw = standard_gateway(tmp_path, servers)
    gw.config["sinks"] = [{"type": "stdout"}, {"type": "stdout"}]
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    status, output = gw.run_to_exit()
    assert status == 1 and "two sinks named alike" in output


def test_replicas_on_one_postgresql_store_ship_a_sink_once_and_hand_it_over(tmp_path, servers, pg, keys, jwks):
    """Two replicas share the sink's cursor in the store (schema version 7): one ships at a
    time, and when it stops the other takes over from the cursor within the lease."""
    hook, url = WebhookReceiver(), database(pg)
    replicas = [replica(tmp_path / name, servers, url) for name in ("a", "b")]
    for gw in replicas:
        gw.config["sinks"] = [{"name": "siem", "type": "webhook", "url": hook.url, "interval": "100ms", "batch": BATCH}]
        gw.config_file.write_text(yaml.safe_dump(gw.config))
        gw.start()
    token = keys["rsa"].token(jwks.issuer, groups=["analysts"])
    try:
        for gw in replicas:
            traffic(gw, token, f"both-{gw.dir.name}")
        assert wait_for(lambda: caught_up(replicas[0], hook))
        assert len(hook.seqs) == len(set(hook.seqs))  # one shipper: each event once
        replicas[0].stop()
        traffic(replicas[1], token, "handed-over")
        assert wait_for(lambda: caught_up(replicas[1], hook), timeout=60)
        assert_at_least_once_in_order(hook.seqs, recorded(replicas[1]))
    finally:
        for gw in replicas:
            gw.stop()
        hook.stop()
    with psycopg.connect(pg.dsn(url.rsplit("/", 1)[1])) as conn:
        assert conn.execute("SELECT value FROM custody_meta WHERE key = 'schema_version'").fetchone()[0] == "7"
