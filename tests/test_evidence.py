"""Audit evidence from a real gateway: replay, exports (JSONL, CSV, HAR, mitmproxy flows
opened by a real mitmweb), signed manifests and their verification, the compliance report
rendered in headless Chromium, and pruning behind a signed checkpoint."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from playwright.sync_api import sync_playwright

from addons.engine.store import Store
from addons.evidence.exports import CSV_COLUMNS
from tests.support.approvals import (
    REVIEW_RULES,
    Approver,
    make_gateway,
    pending_for,
    send,
    start,
    wait_for,
)
from tests.support.gateway import BIN
from tests.support.servers import free_port, stop_process

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN = "run-7f3a"
AGENT = {"X-Custody-Agent": "Inventory analyst", "X-Custody-Model": "stand-in-llm-1", "X-Custody-Run": RUN,
         "X-Custody-Task": "check stock"}
RULES = {
    **REVIEW_RULES,
    "masks.yaml": {"rules": [
        {"id": "profiles-masked", "match": {"connection": "api", "path": "/profiles/**", "action": "read",
                                            "principal": {"groups": ["analysts"]}},
         "effect": "allow", "masks": [{"detect": ["EMAIL_ADDRESS"]}]},
    ]},
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers):
    gateway = make_gateway(tmp_path_factory.mktemp("evidence"), servers)
    gateway.write_rules("masks.yaml", RULES["masks.yaml"])
    start(gateway)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def story(gw, keys, jwks):
    """One crew run: a masked read, a denial, a held write a manager approves."""

    def token(**claims) -> str:
        return keys["rsa"].token(jwks.issuer, **claims)

    analyst = gw.session(token(sub="crew-analyst", groups=["analysts"]))
    read = analyst.get("http://api.test/profiles/7", json={"contact": "ann.lee@example.com"}, headers=AGENT, timeout=30)
    denied = analyst.get("http://api.test/admin/users", headers=AGENT, timeout=30)
    manager = Approver(gw.approvals_url, token(sub="manager-1", groups=["managers"]))
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), "/restock",
                           {"item": 3, "quantity": 250, "marker": "evidence-1"}, **{**AGENT, "X-Custody-Task": "restock"})
        approval = pending_for(manager, "evidence-1")
        time.sleep(0.3)  # a measurable latency
        assert manager.vote(approval["id"], "approve", "stock is low").status_code == 200
        written = held.result(timeout=30)
    wait_for(lambda: gw.events("kind = 'response' AND flow = (SELECT flow FROM events WHERE approval = ? "
                               "AND kind = 'request')", [approval["id"]]))
    return {"read": read, "denied": denied, "written": written, "approval": approval["id"]}


def custody(gw, *args: str) -> subprocess.CompletedProcess:
    return gw.custody("audit", *args)


def test_the_story_happened_as_the_gateway_saw_it(story):
    assert story["read"].status_code == 200 and "ann.lee@example.com" not in story["read"].text
    assert story["denied"].status_code == 403 and story["denied"].json()["rules"] == ["admin-denied"]
    assert story["written"].status_code == 200


# replay


def test_replay_of_a_run_tells_the_whole_story_in_order(gw, story):
    out = custody(gw, "replay", "--run", RUN)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith(f"run {RUN}: ")
    order = [
        "REQUEST   crew-analyst agent=Inventory analyst model=stand-in-llm-1 run=run-7f3a task=check stock",
        "GET /profiles/7", "DECISION  allow · rules analysts-read,profiles-masked", "RESPONSE  200", '"EMAIL_ADDRESS": 1',
        "GET /admin/users", "DECISION  deny · rules admin-denied · admin endpoints are off-limits → 403",
        "REQUEST   crew-buyer agent=Inventory analyst model=stand-in-llm-1 run=run-7f3a task=restock",
        f"APPROVAL  {story['approval']}: held for review by group:managers (rules one-manager: restocking needs a manager)",
        f"APPROVAL  {story['approval']}: approved by manager-1 — stock is low",
        f"APPROVAL  {story['approval']}: executed",
        "DECISION  allow · rules one-manager · approved by manager-1: stock is low",
    ]
    at = 0
    for expected in order:
        found = text.find(expected, at)
        assert found >= 0, f"{expected!r} missing or out of order in:\n{text}"
        at = found
    assert "ann.lee@example.com" not in text  # responses are replayed as recorded: masked


def test_replay_of_one_session_and_json_lines(gw, story):
    session = gw.events("approval = ? AND kind = 'request'", [story["approval"]])[0]["session"]
    out = custody(gw, "replay", session, "--json")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert {e["session"] for e in events} == {session}
    steps = [e["detail"].get("step") for e in events if e["kind"] == "approval"]
    assert steps == ["requested", "approved", "executed"]


@pytest.mark.parametrize("args, error", [
    (("replay", "no-such-session"), "no events of session 'no-such-session'"),
    (("replay",), "name a session, or a crew run with --run (not both)"),
    (("replay", "x", "--run", "y"), "name a session, or a crew run with --run (not both)"),
])
def test_replay_refuses_what_it_cannot_replay(gw, story, args, error):
    out = custody(gw, *args)
    assert (out.returncode, out.stdout) == (1, "") and error in out.stderr


def test_replay_follow_prints_events_as_they_are_recorded(gw, story, token):
    run = "run-follow"
    proc = subprocess.Popen([str(BIN / "custody"), "audit", "replay", "--run", run, "--follow"],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "CUSTODY_CONFIG": str(gw.config_file), "PYTHONUNBUFFERED": "1"})
    try:
        time.sleep(1.0)
        agent = gw.session(token(sub="crew-analyst", groups=["analysts"]))
        assert agent.get("http://api.test/items/5", headers={**AGENT, "X-Custody-Run": run}, timeout=30).status_code == 200
        lines = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any("RESPONSE  200" in line for line in lines):
            lines.append(proc.stdout.readline())
        assert any("REQUEST   crew-analyst" in line for line in lines) and any("GET /items/5" in line for line in lines)
        assert any("RESPONSE  200" in line for line in lines)
    finally:
        stop_process(proc)


# exports


def export(gw, tmp_path, fmt: str, *filters: str):
    path = tmp_path / f"out.{fmt}"
    out = custody(gw, "export", "--format", fmt, "-o", str(path), *filters)
    assert out.returncode == 0, out.stderr
    return path


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("filters, expect", [
    ((), lambda e: True),
    (("--decision", "deny"), lambda e: e["kind"] in ("request", "decision", "response") and "/admin" in json.dumps(e)),
    (("--principal", "crew-buyer"), lambda e: e["subject"] == "crew-buyer" or e["kind"] == "approval"),
    (("--run", RUN, "--connection", "api"), lambda e: e["connection"] == "api"),
    (("--from", "2000-01-01", "--to", "2000-01-02"), None),
])
def test_export_jsonl_selects_and_every_row_re_hashes(gw, story, tmp_path, filters, expect):
    path = export(gw, tmp_path, "jsonl", *filters)
    events = jsonl(path)
    if expect is None:
        assert events == []
    else:
        assert events and all(expect(e) for e in events), events
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert manifest["events"] == len(events) and manifest["chain_head"]["seq"] >= max([e["seq"] for e in events] or [0])
    out = custody(gw, "verify", "--export", str(path))
    assert out.returncode == 0 and out.stdout.startswith(f"ok: {path}"), out.stdout
    if events:
        assert f"{len(events)} events re-hashed from their contents" in out.stdout
        assert f"{len(events)} events match the store" in out.stdout


def test_the_decision_filter_takes_whole_denied_flows(gw, story, tmp_path):
    events = jsonl(export(gw, tmp_path, "jsonl", "--decision", "deny", "--run", RUN))
    assert [e["kind"] for e in events] == ["request", "decision", "response"]
    assert events[1]["rules"] == ["admin-denied"] and events[2]["status"] == 403


def test_csv_has_the_documented_columns_and_names_the_agent(gw, story, tmp_path):
    path = export(gw, tmp_path, "csv", "--run", RUN)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    requests_ = [r for r in rows if r["kind"] == "request"]
    assert {(r["agent"], r["model"], r["run"], r["asserted"]) for r in requests_} == {
        ("Inventory analyst", "stand-in-llm-1", RUN, "agent;model;run;task")}
    vote = next(r for r in rows if r["step"] == "approved")
    assert (vote["approver"], vote["approval"], vote["rules"]) == ("manager-1", story["approval"], "one-manager")
    assert custody(gw, "verify", "--export", str(path)).returncode == 0


def test_har_entries_carry_decision_and_approval(gw, story, tmp_path):
    path = export(gw, tmp_path, "har", "--run", RUN)
    log = json.loads(path.read_text())["log"]
    assert log["version"] == "1.2" and log["_custody"]["chain_head"]["seq"] > 0
    by_path = {e["request"]["url"].split("api.test")[1]: e for e in log["entries"]}
    assert set(by_path) == {"/profiles/7", "/admin/users", "/restock"}
    assert by_path["/admin/users"]["response"]["status"] == 403
    assert by_path["/admin/users"]["comment"].startswith("custody: deny · rules admin-denied")
    restock = by_path["/restock"]
    assert restock["request"]["postData"]["text"] == json.dumps({"item": 3, "quantity": 250, "marker": "evidence-1"})
    assert f"approval {story['approval']} approved by manager-1 (approved" in restock["comment"]
    masked = by_path["/profiles/7"]["response"]["content"]["text"]
    assert "ann.lee@example.com" not in masked and "[EMAIL_ADDRESS]" in masked
    assert all(h["value"] == "[redacted]" for e in log["entries"] for h in e["request"]["headers"]
               if h["name"].lower() in ("proxy-authorization", "authorization"))
    assert custody(gw, "verify", "--export", str(path)).returncode == 0


@pytest.fixture
def mitmweb():
    procs = []

    def run(path) -> str:
        port, password = free_port(), "evidence"
        proc = subprocess.Popen([str(BIN / "mitmweb"), "-r", str(path), "--set", f"web_port={port}",
                                 "--set", "web_open_browser=false", "--set", f"web_password={password}",
                                 "--listen-port", str(free_port()), "--set", "server=false"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}/flows"

        def flows():
            try:
                r = requests.get(url, headers={"Authorization": f"Bearer {password}"}, timeout=2)
            except requests.ConnectionError:
                return None
            return r.json() if r.status_code == 200 and r.json() else None
        return wait_for(flows, timeout=30)

    yield run
    for p in procs:
        stop_process(p)


def test_flow_files_open_in_mitmweb_with_decisions_as_comments(gw, story, tmp_path, mitmweb):
    path = export(gw, tmp_path, "flows", "--run", RUN)
    flows = mitmweb(path)
    by_path = {f["request"]["path"]: f for f in flows}
    assert set(by_path) == {"/profiles/7", "/admin/users", "/restock"}
    denied = by_path["/admin/users"]
    assert denied["response"]["status_code"] == 403 and denied["marked"] == "✖"  # a symbol text fonts have, not an emoji
    assert "custody: deny · rules admin-denied · admin endpoints are off-limits" in denied["comment"]
    restock = by_path["/restock"]
    assert "custody: allow · rules one-manager" in restock["comment"]
    assert f"approval {story['approval']} approved by manager-1" in restock["comment"] and "stock is low" in restock["comment"]
    assert custody(gw, "verify", "--export", str(path)).returncode == 0


def tamper_body(path):
    lines = path.read_text().splitlines()
    row = json.loads(lines[0])
    row["subject"] = "somebody-else"
    lines[0] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


def tamper_rehash(path):
    """Change a row and fix up the manifest's digest: only the re-hash catches it."""
    import hashlib
    tamper_body(path)
    manifest_file = path.with_name(path.name + ".manifest.json")
    manifest = json.loads(manifest_file.read_text())
    manifest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_file.write_text(json.dumps(manifest))


def tamper_head(path):
    manifest_file = path.with_name(path.name + ".manifest.json")
    manifest = json.loads(manifest_file.read_text())
    manifest["chain_head"]["hash"] = "0" * 64
    manifest_file.write_text(json.dumps(manifest))


@pytest.mark.parametrize("tamper, problem", [
    (tamper_body, "the file's SHA-256 does not match its manifest: it was changed after export"),
    (tamper_rehash, "manifest signature: the signature does not match the document"),
    (tamper_head, "manifest signature: the signature does not match the document"),
])
def test_a_changed_bundle_does_not_verify(gw, story, tmp_path, tamper, problem):
    path = export(gw, tmp_path, "jsonl", "--run", RUN)
    tamper(path)
    out = custody(gw, "verify", "--export", str(path))
    assert out.returncode == 1 and out.stdout.startswith("BROKEN: ") and problem in out.stdout, out.stdout


def test_an_unsigned_rehashed_forgery_is_caught_by_its_hash(gw, story, tmp_path):
    path = export(gw, tmp_path, "jsonl", "--run", RUN)
    tamper_rehash(path)
    manifest_file = path.with_name(path.name + ".manifest.json")
    manifest = json.loads(manifest_file.read_text())
    del manifest["signature"]
    manifest_file.write_text(json.dumps(manifest))
    out = custody(gw, "verify", "--export", str(path))
    assert out.returncode == 1 and "contents do not match its hash" in out.stdout, out.stdout


def test_a_bundle_signed_by_another_key_is_refused_against_the_pinned_key(gw, story, tmp_path):
    path = export(gw, tmp_path, "jsonl", "--run", RUN)
    other = tmp_path / "other.key"
    out = custody(gw, "export", "--format", "jsonl", "-o", str(path), "--run", RUN, "--signing-key", str(other))
    assert out.returncode == 0 and "created the audit signing key" in out.stdout
    out = custody(gw, "verify", "--export", str(path))
    assert out.returncode == 1 and "not by the pinned key" in out.stdout
    pub = tmp_path / "other.pub"
    pub.write_text(subprocess.run([str(BIN / "custody"), "audit", "key", "--db", str(gw.db), "--signing-key", str(other)],
                                  capture_output=True, text=True, check=True).stdout)
    out = custody(gw, "verify", "--export", str(path), "--public-key", str(pub))
    assert out.returncode == 0, out.stdout


# report


def test_report_counts_and_renders_in_chromium(gw, story, tmp_path):
    base = tmp_path / "report"
    out = custody(gw, "report", "--from", "2000-01-01T00:00:00Z", "-o", str(base))
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["chain"]["ok"] is True
    by_agent = {r["name"]: r for r in doc["requests_by_agent"]}
    assert by_agent["Inventory analyst"]["denied"] == 1 and by_agent["Inventory analyst"]["held"] == 1
    assert {"name": "stand-in-llm-1"}.items() <= next(r for r in doc["requests_by_model"]
                                                      if r["name"] == "stand-in-llm-1").items()
    assert {"rule": "admin-denied", "denials": 1} in doc["denials_by_rule"]
    item = next(a for a in doc["approvals"]["items"] if a["id"] == story["approval"])
    assert (item["requester"], item["approvers"], item["outcome"], item["task"]) == (
        "crew-buyer", ["manager-1"], "approved", "restock")
    assert 0.3 <= item["latency_s"] < 60
    assert {"entity": "EMAIL_ADDRESS", "count": 1} in doc["masking_by_entity"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto((tmp_path / "report.html").as_uri())
        assert page.inner_text("#chain").startswith("Audit chain verified:")
        assert page.inner_text("#figure-requests b") == str(doc["totals"]["requests"])
        assert page.inner_text("#figure-denied b") == str(doc["totals"]["denied"])
        row = page.locator("#by-agent tr", has_text="Inventory analyst")
        assert row.locator("[data-col=denied]").inner_text() == "1"
        assert page.locator("#denials tr", has_text="admin-denied").locator("[data-col=denials]").inner_text() == "1"
        approval = page.locator("#approvals tr", has_text=story["approval"])
        assert approval.locator("[data-col=approvers]").inner_text() == "manager-1"
        assert approval.locator("[data-col=outcome]").inner_text() == "approved"
        assert page.locator("#masking tr", has_text="EMAIL_ADDRESS").locator("[data-col=count]").inner_text() == "1"
        browser.close()


@pytest.mark.parametrize("args, error", [
    (("report", "--from", "yesterday"), "--from: not a time: 'yesterday'"),
    (("report", "--from", "2030-01-02", "--to", "2030-01-01"), "--to must be after --from"),
    (("export", "--format", "jsonl", "-o", "/nonexistent/dir/x.jsonl"), "cannot write /nonexistent/dir/x.jsonl"),
    (("prune", "--before", "2999-01-01", "--no-archive"), "--before is in the future"),
    (("verify", "--public-key", "/nonexistent.pem"), "public key /nonexistent.pem: No such file or directory"),
])
def test_bad_arguments_are_named(gw, story, args, error):
    out = custody(gw, *args)
    assert out.returncode == 1 and error in out.stderr, out.stderr


# prune: a copy of the store, so the other tests keep theirs


@pytest.fixture
def copy(gw, story, tmp_path):
    db = tmp_path / "audit.db"
    src = Store(str(gw.db))
    src.conn.execute(f"VACUUM INTO '{db}'")
    src.close()
    shutil.copy(gw.dir / "audit-signing.key", tmp_path / "audit-signing.key") \
        if (gw.dir / "audit-signing.key").exists() else None
    return db


def cli(db, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "custody"), "audit", *args, "--db", str(db)], capture_output=True, text=True,
                          timeout=60)


def test_prune_archives_signs_and_the_rest_still_verifies(copy, tmp_path):
    store = Store(str(copy))
    rows = store.where("1", [])
    cut = rows[len(rows) // 2]
    store.close()
    archive = tmp_path / "archive.jsonl"
    out = cli(copy, "prune", "--before", repr(cut["ts"]), "--archive", str(archive))
    assert out.returncode == 0 and out.stdout.splitlines()[-1].startswith("pruned "), out.stdout + out.stderr
    store = Store(str(copy))
    remaining = store.where("1", [])
    assert remaining[0]["seq"] == store.checkpoint()["seq"] + 1 and remaining[-1]["kind"] == "prune"
    assert all(r["ts"] >= cut["ts"] for r in remaining if r["kind"] != "prune") or remaining[0]["seq"] <= cut["seq"]
    archived = jsonl(archive)
    assert [a["seq"] for a in archived] == list(range(1, store.checkpoint()["seq"] + 1))
    store.close()
    out = cli(copy, "verify")
    assert out.returncode == 0 and "checkpoint: events 1–" in out.stdout and "pruned" in out.stdout, out.stdout
    out = cli(copy, "verify", "--export", str(archive))
    assert out.returncode == 0 and "is the store's signed checkpoint" in out.stdout, out.stdout


def forge_checkpoint(db):
    store = Store(str(db))
    doc = json.loads(store.conn.execute("SELECT document FROM checkpoints").fetchone()[0])
    doc["pruned"] += 1
    store.conn.execute("UPDATE checkpoints SET document = ?", [json.dumps(doc)])
    store.close()


def drop_checkpoint(db):
    store = Store(str(db))
    store.conn.execute("DELETE FROM checkpoints")
    store.close()


def delete_after_checkpoint(db):
    store = Store(str(db))
    first = store.conn.execute("SELECT MIN(seq) FROM events").fetchone()[0]
    store.conn.execute("DELETE FROM events WHERE seq = ?", [first])
    store.close()


@pytest.mark.parametrize("tamper, problem", [
    (forge_checkpoint, "BROKEN: checkpoint at event"),
    (drop_checkpoint, "BROKEN at event"),
    (delete_after_checkpoint, "(the first after the checkpoint) is missing"),
])
def test_a_tampered_pruned_store_does_not_verify(copy, tamper, problem):
    cut = Store(str(copy)).where("1", [])[5]["ts"]
    assert cli(copy, "prune", "--before", repr(cut), "--no-archive").returncode == 0
    tamper(copy)
    out = cli(copy, "verify")
    assert out.returncode == 1 and problem in out.stdout, out.stdout


def test_prune_refuses_a_broken_chain_and_keeps_everything(copy):
    store = Store(str(copy))
    store.conn.execute("UPDATE events SET reason = 'edited' WHERE seq = 2")
    count = store.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    store.close()
    out = cli(copy, "prune", "--before", repr(time.time() - 0.001), "--no-archive")
    assert out.returncode == 1 and "prune refused: the chain is broken at event 2" in out.stderr, out.stderr
    store = Store(str(copy))
    assert store.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == count
    assert store.checkpoints() == []


def test_pruning_nothing_says_so(copy):
    out = cli(copy, "prune", "--before", "2000-01-01", "--no-archive")
    assert out.returncode == 0 and out.stdout.startswith("nothing recorded before 2000-01-01T00:00:00.000Z")
