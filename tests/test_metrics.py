"""Prometheus metrics: a real gateway, real traffic through it, a real scrape of its
endpoint parsed with prometheus_client's own parser, and the counts asserted exactly.

Also: one scrape covering every worker of `custody run --workers 2`, the held-approvals
gauge while a request waits for approvers, a bad `metrics.listen` refused at start, and
the Grafana dashboard using only names the gateway exports.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import STANDARD_RULES, standard_gateway
from tests.support.approvals import Approver, make_gateway, pending_for, send, start, wait_for
from tests.support.gateway import ROOT, Gateway
from tests.support.servers import Route, free_port

DASHBOARD = ROOT / "deploy" / "grafana" / "custody.json"
RULES = {
    **STANDARD_RULES,
    "masks.yaml": {"rules": [
        {"id": "users-masked", "match": {"connection": "api", "path": "/users/**", "action": "read"},
         "effect": "allow", "masks": [{"fields": ["$.users[*].email"]}]},
    ]},
}


def with_metrics(gw: Gateway, **config) -> Gateway:
    port = free_port()
    gw.config.update(metrics={"listen": f"127.0.0.1:{port}"}, **config)
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    gw.metrics_url = f"http://127.0.0.1:{port}/metrics"
    return gw


def scrape(gw: Gateway) -> dict[tuple[str, tuple], float]:
    """Every sample of one scrape: (name, sorted labels) -> value."""
    r = requests.get(gw.metrics_url, timeout=10)
    assert r.status_code == 200, r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sample's value; 0 when the gateway has not exported it (a counter never incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers, upstream):
    upstream.routes["/users/list"] = Route("application/json", b'{"users": [{"email": "dana@example.com"}]}')
    gateway = with_metrics(standard_gateway(tmp_path_factory.mktemp("metrics"), servers, rules=RULES)).start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def traffic(gw, keys, jwks):
    """Real clients through the gateway: what each one should count."""
    analyst = keys["rsa"].token(jwks.issuer, groups=["analysts"])
    wait_for(lambda: gw.session(analyst).get("http://api.test/users/list").status_code == 200, timeout=90)
    before = scrape(gw)
    reads = [gw.session(analyst).get(f"http://api.test/items/{n}") for n in range(3)]
    masked = [gw.session(analyst).get("http://api.test/users/list") for _ in range(2)]
    denied = [gw.curl(analyst, "http://api.test/admin/users") for _ in range(2)]
    unidentified = gw.curl(None, "http://api.test/items/1")
    probe = gw.curl(None, "http://custody.gateway/healthz")
    assert [r.status_code for r in reads + masked] == [200] * 5
    assert "dana@example.com" not in masked[0].text
    assert [r.status for r in denied] == [403, 403] and unidentified.status == 407 and probe.status == 200
    return before, scrape(gw)


def grew(traffic, name: str, **labels) -> float:
    before, after = traffic
    return total(after, name, **labels) - total(before, name, **labels)


@pytest.mark.parametrize("labels, count", [
    ({"connection": "api", "protocol": "http", "effect": "allow"}, 5),
    ({"connection": "api", "protocol": "http", "effect": "deny"}, 2),
    ({"connection": "none", "protocol": "http", "effect": "deny"}, 1),  # refused before it was identified
    ({"connection": "custody"}, 0),  # health probes are not counted (nor recorded)
])
def test_requests_are_counted_by_connection_protocol_and_effect(traffic, labels, count):
    assert grew(traffic, "custody_requests_total", **labels) == count


@pytest.mark.parametrize("name, labels, count", [
    ("custody_decision_seconds_count", {"protocol": "http"}, 7),  # every request the rules decided
    ("custody_masking_seconds_count", {}, 4),  # two masked reads: each response, and its operation on record
    ("custody_jwks_refreshes_total", {"outcome": "error"}, 0),
])
def test_latency_histograms_count_every_observation(traffic, name, labels, count):
    assert grew(traffic, name, **labels) == count


def test_audit_writes_are_timed_and_none_wait(traffic):
    """Every recorded request is a request write and a response write (the unidentified one too:
    its refusal is on record); none is left waiting once the clients have their answers."""
    _, after = traffic
    assert grew(traffic, "custody_audit_write_seconds_count") >= 2 * 8
    assert value(after, "custody_audit_write_queue") == 0
    assert total(after, "custody_store_errors_total") == 0


def test_jwks_fetches_are_counted_per_issuer(traffic, jwks):
    _, after = traffic
    assert value(after, "custody_jwks_refreshes_total", issuer=jwks.issuer, outcome="ok") >= 1


def test_a_failed_store_write_is_counted_and_refused(tmp_path, servers, keys, jwks, upstream):
    """The store refuses one commit (tests/support/faults.py): the request is refused with 503
    audit_unavailable, never forwarded, and the failure is counted once; the next one heals."""
    gw = with_metrics(standard_gateway(tmp_path, servers, scripts=(str(ROOT / "tests" / "support" / "faults.py"),)))
    gw.start()
    try:
        agent = gw.session(keys["rsa"].token(jwks.issuer, groups=["analysts"]))
        refused = agent.get("http://api.test/items/metrics-store-fault", headers={"x-test-fault": "store"})
        assert (refused.status_code, refused.json()["error"]) == (503, "audit_unavailable")
        assert not [g for g in upstream.received if g.path == "/items/metrics-store-fault"]
        assert agent.get("http://api.test/items/metrics-store-healed").status_code == 200
        samples = scrape(gw)
        assert value(samples, "custody_store_errors_total", operation="write") == 1
        assert value(samples, "custody_requests_total", connection="api", protocol="http", effect="deny") == 1
    finally:
        gw.stop()


def test_held_requests_are_a_gauge(tmp_path, servers, people_tokens):
    gw = start(with_metrics(make_gateway(tmp_path, servers)))
    try:
        manager = Approver(gw.approvals_url, people_tokens["manager"])
        held = threading.Thread(target=send, args=(gw, people_tokens["buyer"], "/restock", {"tag": "gauge"}))
        held.start()
        approval = pending_for(manager, "gauge")
        assert wait_for(lambda: value(scrape(gw), "custody_approvals_held") == 1)
        assert manager.vote(approval["id"], "approve").status_code == 200
        held.join(30)
        assert value(scrape(gw), "custody_approvals_held") == 0
        assert value(scrape(gw), "custody_requests_total", connection="api", protocol="http", effect="allow") == 1
    finally:
        gw.stop()


@pytest.fixture
def people_tokens(keys, jwks):
    return {"manager": keys["rsa"].token(jwks.issuer, sub="mia", groups=["managers"]),
            "buyer": keys["rsa"].token(jwks.issuer, sub="ben", groups=["buyers"])}


def test_every_worker_is_counted_in_one_scrape(tmp_path, servers, keys, jwks):
    """`custody run --workers 2`: the supervisor serves the sum over both workers; every
    request is counted once, whichever worker took its connection."""
    gw = with_metrics(standard_gateway(tmp_path, servers, runner="custody", port=free_port(),
                                       run_args=("--workers", "2")))
    gw.start()
    try:
        analyst = keys["rsa"].token(jwks.issuer, groups=["analysts"])
        wait_for(lambda: gw.session(analyst).get("http://api.test/items/0").status_code == 200)
        wait_for(lambda: len(worker_ids(gw, analyst)) == 2, timeout=30)  # both workers answer
        before = scrape(gw)
        for n in range(20):  # a new connection each: the kernel spreads them over the workers
            assert gw.session(analyst).get(f"http://api.test/items/{n}").status_code == 200
        after = scrape(gw)
        labels = {"connection": "api", "protocol": "http", "effect": "allow"}
        assert total(after, "custody_requests_total", **labels) - total(before, "custody_requests_total", **labels) == 20
    finally:
        gw.stop()


def worker_ids(gw: Gateway, token: str) -> set[str]:
    """The replicas that answered a handful of fresh connections' readiness checks."""
    return {gw.session(token).get("http://custody.gateway/readyz").json()["replica"] for _ in range(8)}


def test_a_metrics_address_in_use_stops_the_gateway_at_start(tmp_path, servers):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    gw = standard_gateway(tmp_path, servers)
    gw.config["metrics"] = {"listen": f"127.0.0.1:{port}"}
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    try:
        status, output = gw.run_to_exit()
    finally:
        taken.close()
    assert status == 1
    assert f"metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use" in output


@pytest.mark.parametrize("listen", ["metrics.example:9464", "127.0.0.1:", "all"])
def test_a_metrics_address_that_is_not_one_is_refused(tmp_path, servers, listen):
    gw = standard_gateway(tmp_path, servers)
    gw.config["metrics"] = {"listen": listen}
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    status, output = gw.run_to_exit()
    assert status == 1
    assert "metrics.listen" in output


def expressions(node) -> list[str]:
    """Every PromQL expression in the dashboard (each panel target's `expr`)."""
    if isinstance(node, dict):
        own = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return own + [e for v in node.values() for e in expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in expressions(v)]
    return []


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported(gw: Gateway) -> set[str]:
    """Every series name one scrape declares, samples or not (a labelled counter that never
    counted has no sample yet, but its TYPE line names it)."""
    text = requests.get(gw.metrics_url, timeout=10).text
    return {f.name + suffix for f in text_string_to_metric_families(text) for suffix in SUFFIXES.get(f.type, ("",))}


def test_the_dashboard_uses_only_exported_metrics(gw, traffic):
    dashboard = json.loads(DASHBOARD.read_text())
    found = expressions(dashboard)
    assert len(found) >= 10
    names = exported(gw)
    used = {name for e in found for name in re.findall(r"\bcustody_[a-z_]+\b", e)}
    assert used - names == set()
    families = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in names if n.startswith("custody_")}
    assert families - {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used} == set()  # every one is on it
