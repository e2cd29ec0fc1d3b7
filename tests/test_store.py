"""The audit store: the hash chain detects editing, deleting and reordering any event."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from addons.engine.model import Decision, Operation, Principal
from addons.engine.store import GENESIS, Event, Store, chain_hash

BIN = Path(sys.executable).parent


def populate(path: Path, n: int = 5, prefix: str = "e") -> None:
    store = Store(str(path))
    for i in range(n):
        store.append([
            Event(id=f"{prefix}{i}", kind="request", session="s1", flow=f"f{i}",
                  principal=Principal("crew", "idp", ("a",), agent={"model": "m"}),
                  operation=Operation("http", "api", "read", f"/items/{i}", 10, f"GET /items/{i} on api"),
                  decision=Decision("allow", ("r",), "ok"),
                  status=200, body=f"body {i}".encode()),
        ])
    store.close()


def sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    for s in statements:
        conn.execute(s)
    conn.commit()
    conn.close()


def rehash(path: Path, seq: int) -> str:
    """What an attacker with write access does after editing a row: fix its own hash."""
    store = Store(str(path))
    row = store.where("seq = ?", [seq])[0]
    new = chain_hash(row["prev_hash"], row)
    store.close()
    sql(path, f"UPDATE events SET hash = '{new}' WHERE seq = {seq}")
    return new


def test_intact_chain_verifies(tmp_path):
    db = tmp_path / "a.db"
    populate(db)
    result = Store(str(db)).verify()
    assert result.ok and result.count == 5
    rows = Store(str(db)).where("1", [])
    assert rows[0]["prev_hash"] == GENESIS
    assert all(rows[i]["prev_hash"] == rows[i - 1]["hash"] for i in range(1, 5))


@pytest.mark.parametrize(
    "tamper, broken_at, problem",
    [
        (["UPDATE events SET reason = 'approved' WHERE seq = 2"], 2, "event contents do not match its hash"),
        (["UPDATE events SET subject = 'someone-else' WHERE seq = 4"], 4, "event contents do not match its hash"),
        (["UPDATE events SET ts = ts + 60 WHERE seq = 1"], 1, "event contents do not match its hash"),
        (["UPDATE events SET body = CAST('edited' AS BLOB) WHERE seq = 3"], 3, "body does not match its digest"),
        (["DELETE FROM bodies WHERE digest = (SELECT body_digest FROM events WHERE seq = 3)"], None, None),
        (["DELETE FROM events WHERE seq = 2"], 3, "event 2 is missing (found 3)"),
        (["UPDATE events SET seq = 100 WHERE seq = 2", "UPDATE events SET seq = 2 WHERE seq = 3",
          "UPDATE events SET seq = 3 WHERE seq = 100"], 2, "previous-hash link does not match"),
        (["DELETE FROM events WHERE seq = 5"], 5, "chain head says 5 events but the log ends at 4"),
        (["DELETE FROM events"], 1, "chain head says 5 events but the log ends at 0"),
    ],
)
def test_tampering_is_detected(tmp_path, tamper, broken_at, problem):
    db = tmp_path / "a.db"
    populate(db)
    sql(db, *tamper)
    result = Store(str(db)).verify()
    if problem is None:
        # dropping a body keeps the chain intact: the digest stays, which is how
        # `store.bodies: digest` records look
        assert result.ok
        return
    assert not result.ok
    assert result.broken_at == broken_at
    assert result.problem.startswith(problem)


def test_rehashing_an_edited_event_breaks_the_next_link(tmp_path):
    db = tmp_path / "a.db"
    populate(db)
    sql(db, "UPDATE events SET effect = 'deny' WHERE seq = 3")
    rehash(db, 3)
    result = Store(str(db)).verify()
    assert (result.ok, result.broken_at) == (False, 4)
    assert result.problem.startswith("previous-hash link does not match")


def test_cli_verify_reports_the_first_broken_link(tmp_path):
    db = tmp_path / "a.db"
    populate(db)
    ok = subprocess.run([BIN / "custody", "audit", "verify", "--db", str(db)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 5 events, chain head ")
    sql(db, "UPDATE events SET resource = '/admin' WHERE seq = 2")
    bad = subprocess.run([BIN / "custody", "audit", "verify", "--db", str(db)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stdout.strip() == "BROKEN at event 2: event contents do not match its hash"


WRITER = """
import sys
from addons.engine.store import Event, Store
store = Store(sys.argv[1])
for i in range(200):
    store.append([Event(id=f"{sys.argv[2]}-{i}", kind="request", detail={"i": i})])
"""


def test_two_writers_do_not_fork_the_chain(tmp_path):
    db = tmp_path / "a.db"
    Store(str(db)).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), name]) for name in ("a", "b")]
    assert [p.wait(60) for p in procs] == [0, 0]
    result = Store(str(db)).verify()
    assert result.ok and result.count == 400


def test_event_row_flattens_principal_operation_and_decision():
    row = Event(id="x", kind="decision",
                principal=Principal("s", "i", agent={"model": "m"}, asserted={"agent": "a", "model": "spoof"}),
                operation=Operation("http", "c", "read", "/r", 10, "GET /r on c"),
                decision=Decision("allow", ("r1",), "ok")).row()
    assert (row["subject"], row["agent"], row["model"]) == ("s", "a", "m")  # verified claims win
    assert (row["connection"], row["action"], row["effect"], row["rules"]) == ("c", "read", "allow", '["r1"]')


def test_a_store_from_another_schema_version_is_refused(tmp_path):
    from addons.engine.store import SCHEMA_VERSION, StoreError

    db = tmp_path / "a.db"
    populate(db, 1)
    sql(db, "PRAGMA user_version = 0")
    with pytest.raises(StoreError, match=f"schema version 0, but this gateway writes version {SCHEMA_VERSION}"):
        Store(str(db))


# bodies: once per content, deflated, read back whole


def test_a_body_is_kept_once_and_read_back_whole(tmp_path):
    db = tmp_path / "a.db"
    store = Store(str(db))
    big = b'{"items": [' + b",".join(b'{"id": %d, "name": "bolt M6"}' % i for i in range(200)) + b"]}"
    store.append([Event(id=f"e{i}", kind="response", body=big) for i in range(50)]
                 + [Event(id="tiny", kind="response", body=b"x")])
    kept = store.conn.execute("SELECT COUNT(*), SUM(LENGTH(data)) FROM bodies").fetchone()
    assert kept[0] == 2 and kept[1] < len(big) // 4  # fifty copies of one body: kept once, deflated
    assert store.conn.execute("SELECT COUNT(*) FROM events WHERE body IS NOT NULL").fetchone()[0] == 0
    assert {r["body"] for r in store.where("1", [])} == {big, b"x"}
    assert store.verify().ok


LEGACY = """
import hashlib, sys
import sqlite_utils
from addons.engine.store import BODY_COLUMNS, CHECKPOINT_COLUMNS, COLUMNS, APPROVAL_COLUMNS, GENESIS, chain_hash
path, version = sys.argv[1], int(sys.argv[2])
db = sqlite_utils.Database(path)
db["events"].create({c: t for c, t in COLUMNS.items() if c != "replica"}, pk="seq")
db["chain_head"].create({"id": int, "seq": int, "hash": str}, pk="id")
db["checkpoints"].create(CHECKPOINT_COLUMNS, pk="seq")
db["approvals"].create({c: t for c, t in APPROVAL_COLUMNS.items() if c != "replica"}, pk="id")
if version == 2:
    db["anchors"].create(CHECKPOINT_COLUMNS, pk="seq")
    db["bodies"].create(BODY_COLUMNS, pk="digest")
prev = GENESIS
for seq in range(1, 4):
    row = {c: None for c in COLUMNS if c != "replica"}
    body = f"body {seq - 1}".encode()
    row.update(seq=seq, id=f"old{seq}", ts=1700000000.0 + seq, kind="request", prev_hash=prev,
               body_digest=hashlib.sha256(body).hexdigest(), body_size=len(body), body=body if version == 1 else None)
    row["hash"] = prev = chain_hash(prev, row)
    db["events"].insert(row)
    if version == 2:
        db["bodies"].insert({"digest": row["body_digest"], "size": len(body), "encoding": "identity", "data": body})
db["chain_head"].insert({"id": 1, "seq": 3, "hash": prev})
db.execute(f"PRAGMA user_version = {version}")
"""


@pytest.mark.parametrize("version", [1, 2])
def test_a_version_1_or_2_store_is_upgraded_and_still_verifies(tmp_path, version):
    """Version 1 kept bodies inline, version 2 hashed no replica; upgraded, their events stay
    as they were (version 1's bodies inline) and the chain is unchanged."""
    from addons.engine.store import SCHEMA_VERSION, UPGRADABLE

    db = tmp_path / "a.db"
    subprocess.run([sys.executable, "-c", LEGACY, str(db), str(version)], check=True)
    assert version in UPGRADABLE
    store = Store(str(db))
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert [r["body"] for r in store.where("1", [])] == [b"body 0", b"body 1", b"body 2"]
    assert [r["replica"] for r in store.where("1", [])] == [None, None, None]
    store.append([Event(id="new", kind="response", body=b"after the upgrade")])
    assert store.verify().ok and store.verify().count == 4
    assert store.where("id = 'new'", [])[0]["replica"] == store.replica


@pytest.mark.parametrize(
    "tamper, problem",
    [
        ("UPDATE bodies SET data = X'00'", "body does not match its digest"),
        ("UPDATE bodies SET encoding = 'identity'", "body does not match its digest"),
    ],
)
def test_a_kept_body_that_was_changed_is_detected(tmp_path, tamper, problem):
    db = tmp_path / "a.db"
    store = Store(str(db))
    store.append([Event(id="e", kind="response", body=b"the original body " * 20)])
    store.close()
    sql(db, tamper)
    result = Store(str(db)).verify()
    assert not result.ok and result.broken_at == 1 and result.problem == problem


# verifying a live store, and from a signed anchor


LIVE_WRITER = """
import sys
from addons.engine.store import Event, Store
store = Store(sys.argv[1])
for i in range(3000):
    store.append([Event(id=f"w-{i}-{j}", kind="request", body=b"x" * (i % 50)) for j in range(3)])
"""


def test_verifying_a_store_being_written_never_reports_tampering(tmp_path):
    """Events and the chain head are read in one snapshot, however busy the writer is."""
    db = tmp_path / "a.db"
    Store(str(db)).close()
    writer = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(db)])
    results = []
    try:
        while writer.poll() is None or not results:
            results.append(Store(str(db)).verify())
    finally:
        writer.wait(120)
    assert writer.returncode == 0
    assert [r.problem for r in results if not r.ok] == []
    assert len({r.count for r in results}) > 1  # it really ran while events were being added


def verify(db: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "custody", "audit", "verify", "--db", str(db), *args], capture_output=True, text=True)


def signing_key(db: Path) -> None:
    from addons.engine.signing import Signer

    Signer.open(str(db.parent / "audit-signing.key"))


def test_a_verification_starts_where_the_last_one_got_to(tmp_path):
    db = tmp_path / "a.db"
    populate(db, 5)
    signing_key(db)
    first = verify(db)
    assert first.returncode == 0 and first.stdout.startswith("ok: 5 events, chain head ")
    populate(db, 2, "more")  # two more requests
    second = verify(db)
    assert second.returncode == 0, second.stdout
    assert second.stdout.startswith("ok: events 6–7 after the signed anchor at event 5 (")
    third = verify(db)
    assert third.stdout.startswith("ok: no new events after the signed anchor at event 7 (")
    assert verify(db, "--full").stdout.startswith("ok: 7 events, chain head ")


@pytest.mark.parametrize(
    "tamper, incremental_says, full_says",
    [
        # after the anchor: found by the incremental walk itself
        (["UPDATE events SET resource = '/admin' WHERE seq = 7"], "BROKEN at event 7: event contents do not match",
         "BROKEN at event 7: event contents do not match"),
        (["DELETE FROM events WHERE seq = 6"], "BROKEN at event 7: event 6 is missing (found 7)",
         "BROKEN at event 7: event 6 is missing (found 7)"),
        # the anchored event itself: found at once
        (["UPDATE events SET hash = 'x' WHERE seq = 5"],
         "BROKEN at event 5: event 5 is not the one the signed anchor names", "BROKEN at event 5: "),
        (["DELETE FROM events WHERE seq = 5"],
         "BROKEN at event 5: event 5 is not the one the signed anchor names", "BROKEN at event 6: event 5 is missing"),
        # a forged or edited anchor: its signature says so (a full walk does not use anchors)
        (["UPDATE anchors SET document = replace(document, '\"seq\":5', '\"seq\":4')"],
         "BROKEN: anchor at event 4: ", None),
        # before the anchor: only a full walk reads it again
        (["UPDATE events SET resource = '/admin' WHERE seq = 2"], None, "BROKEN at event 2: event contents do not match"),
    ],
)
def test_tampering_is_found_from_the_anchor_or_by_a_full_walk(tmp_path, tamper, incremental_says, full_says):
    db = tmp_path / "a.db"
    populate(db, 5)
    signing_key(db)
    assert verify(db).returncode == 0
    populate(db, 2, "more")
    sql(db, *tamper)
    for result, says in ((verify(db), incremental_says), (verify(db, "--full"), full_says)):
        if says is None:
            assert result.returncode == 0 and result.stdout.startswith("ok: "), result.stdout
        else:
            assert result.returncode == 1 and result.stdout.startswith(says), result.stdout


def test_a_version_3_store_gains_grants_and_the_approver_directory(tmp_path):
    """Version 3 (before time-boxed grants and SSO) is upgraded in place: the new tables
    appear, what was recorded stays and still verifies."""
    from addons.engine.store import SCHEMA_VERSION, UPGRADABLE, Listing

    path = str(tmp_path / "a.db")
    old = Store(path)
    old.append([Event(id="before", kind="request")])
    old.conn.executescript("DROP TABLE grants; DROP TABLE approver_directory; DROP INDEX idx_approvals_updated; "
                           "PRAGMA user_version = 3;")
    old.close()
    assert 3 in UPGRADABLE
    store = Store(path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
    assert store.grants() == [] and store.directory("alice@example.com") is None
    store.commit([([Event(id="signin", kind="signin")], None)],
                 [Listing("Alice@Example.com", "alice", "https://idp", ("managers",), "oidc")])
    assert store.directory("alice@example.com")["subject"] == "alice"
    assert store.verify().ok and store.verify().count == 2


def test_a_version_4_store_gains_the_tool_calls_of_completions(tmp_path):
    """Version 4 (before provenance across replicas) is upgraded in place: the tool calls
    table appears, kept in the transaction of a completion's event, and read back newest
    first by principal and run."""
    from addons.engine.provenance import Asked
    from addons.engine.store import SCHEMA_VERSION, UPGRADABLE, ToolCall

    path = str(tmp_path / "a.db")
    old = Store(path)
    old.append([Event(id="before", kind="request")])
    old.conn.executescript("DROP TABLE tool_calls; PRAGMA user_version = 4;")
    old.close()
    assert 4 in UPGRADABLE
    store = Store(path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
    key = ("https://idp", "crew-1", "run-1")
    assert store.tool_calls(key, 10) == []
    calls = [Asked(event="done", flow="f1", connection="models", model="m", call=f"call_{n}", tool="sql",
                   arguments={"query": f"SELECT {n}"}, text=f"sql(SELECT {n})", form="function", at=5.0, expires=9.0)
             for n in range(3)]
    store.commit([([Event(id="done", kind="completion")], None)], [ToolCall(key, n, a) for n, a in enumerate(calls)])
    assert store.tool_calls(key, 10) == calls[::-1] and store.tool_calls(key, 2) == calls[:0:-1]
    assert store.tool_calls(("https://idp", "crew-1", "run-2"), 10) == []
    assert store.verify().ok and store.verify().count == 2


def test_prune_removes_the_tool_calls_that_expired_before_its_cutoff(tmp_path):
    from addons.engine.provenance import Asked
    from addons.engine.store import ToolCall

    store = Store(str(tmp_path / "a.db"))
    key = ("https://idp", "crew-1", "run-1")
    calls = [Asked(event=f"c{n}", flow="f", connection="models", model="m", call=f"call_{n}", tool="sql",
                   arguments={}, text="sql({})", form="function", at=float(n), expires=expires)
             for n, expires in enumerate([50.0, 99.0, 100.0, 5000.0])]
    store.commit([([Event(id="old", kind="completion", ts=10.0)], None)], [ToolCall(key, 0, a) for a in calls])
    store.append([Event(id="new", kind="request", ts=200.0)])
    assert store.prune(100.0, lambda doc: {"key_id": "k", "signature": "s"}, None) is not None
    assert [a.call for a in store.tool_calls(key, 10)] == ["call_3", "call_2"]  # at the cutoff or later stay
    assert store.verify().ok


def test_a_version_5_store_gains_web_sessions_sign_ins_and_slack_requests(tmp_path):
    """Version 5 (approvers' sessions in each replica's memory) is upgraded in place: the
    tables every replica shares sign-ins through appear, what was recorded still verifies."""
    from addons.engine.store import SCHEMA_VERSION, UPGRADABLE

    path = str(tmp_path / "a.db")
    old = Store(path)
    old.append([Event(id="before", kind="request")])
    old.conn.executescript("DROP TABLE web_sessions; DROP TABLE signins; DROP TABLE slack_seen; "
                           "PRAGMA user_version = 5;")
    old.close()
    assert 5 in UPGRADABLE
    store = Store(path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.web_session("0" * 64) is None and store.take_signin("state", "oidc", 0.0) is None
    assert store.verify().ok and store.verify().count == 1


def test_a_session_is_kept_by_the_hash_of_its_cookie_and_started_only_with_its_sign_in(tmp_path):
    import hashlib

    from addons.engine.store import SessionRow
    from addons.engine.websession import Sessions

    store = Store(str(tmp_path / "a.db"))
    cookie, row = Sessions(None, 3600.0).start(Principal("alice", "https://idp", ("managers",)), "oidc", "a@x")
    store.commit([([Event(id="signin", kind="signin")], None)], [row])
    assert isinstance(row, SessionRow) and row.key == hashlib.sha256(cookie.encode()).hexdigest()
    found = store.web_session(row.key)
    assert (found["subject"], found["principal"]["groups"], found["csrf"]) == ("alice", ["managers"], row.csrf)
    dump = "\n".join(store.conn.iterdump())
    assert cookie not in dump and row.key in dump  # the cookie itself is nowhere in the store
    store.end_web_session(row.key)
    assert store.web_session(row.key) is None


@pytest.mark.parametrize("method, taken_as, expires, first, second", [
    ("oidc", "oidc", 2e9, {"nonce": "n"}, None),  # used once
    ("oidc", "saml", 2e9, None, {"nonce": "n"}),  # a SAML response cannot take an OIDC sign-in (it is left alone)
    ("oidc", "oidc", 1.0, None, None),  # expired: taken, and worth nothing
])
def test_a_sign_in_in_progress_is_taken_once(tmp_path, method, taken_as, expires, first, second):
    store = Store(str(tmp_path / "a.db"))
    store.begin_signin("state-1", method, {"nonce": "n"}, expires)
    assert store.take_signin("state-1", taken_as, 100.0) == first
    assert store.take_signin("state-1", method, 100.0) == second


def test_a_sign_in_taken_by_many_threads_at_once_is_taken_by_one(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    path = str(tmp_path / "a.db")
    Store(path).begin_signin("state-1", "oidc", {"nonce": "n"}, 2e9)
    stores = [Store(path) for _ in range(8)]  # a connection each, as replicas' workers have
    with ThreadPoolExecutor(8) as pool:
        taken = list(pool.map(lambda s: s.take_signin("state-1", "oidc", 100.0), stores))
    assert taken.count({"nonce": "n"}) == 1 and taken.count(None) == 7


def test_a_slack_request_is_new_once_and_forgotten_once_expired(tmp_path):
    import time

    store = Store(str(tmp_path / "a.db"))
    assert [store.first_seen("k1", time.time() + 600), store.first_seen("k1", time.time() + 600)] == [True, False]
    store.first_seen("old", time.time() - 1)
    store.first_seen("k2", time.time() + 600)  # each note sweeps what expired
    assert [k for (k,) in store.conn.execute("SELECT key FROM slack_seen ORDER BY key")] == ["k1", "k2"]


def test_a_version_6_store_gains_the_sinks_cursors(tmp_path):
    """Version 6 (before audit sinks) is upgraded in place: `sink_cursors` appears, what was
    recorded stays and still verifies, and a sink starts from the beginning."""
    from addons.engine.store import SCHEMA_VERSION, UPGRADABLE

    path = str(tmp_path / "a.db")
    old = Store(path)
    old.append([Event(id="before", kind="request")])
    old.conn.executescript("DROP TABLE sink_cursors; PRAGMA user_version = 6;")
    old.close()
    assert 6 in UPGRADABLE
    store = Store(path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
    assert store.sink_cursors() == {} and store.claim_sink("siem", "me", 10) == 0
    assert [r["id"] for r in store.after(0, 10)] == ["before"]
    assert store.verify().ok and store.verify().count == 1


def test_pruning_the_whole_log_keeps_the_sequence_going(tmp_path):
    """Everything pruned: the next event still follows the head (SQLite would restart an
    emptied table's rowids at 1, and the chain would no longer verify)."""
    from addons.engine.signing import Signer

    store = Store(str(tmp_path / "a.db"))
    store.append([Event(id=f"e{n}", kind="request") for n in range(3)])
    signer = Signer.open(str(tmp_path / "key"))
    doc = store.prune(time.time() + 1, lambda d: signer.sign(d).as_dict(), None)
    assert doc["seq"] == 3
    store.append([Event(id="after", kind="request")])
    assert [(r["seq"], r["kind"]) for r in store.where("1", [])] == [(4, "prune"), (5, "request")]
    assert store.verify().ok


def test_a_sink_is_shipped_by_one_replica_at_a_time_from_its_cursor(tmp_path):
    """The cursor and lease of an audit sink (addons/sinks.py): whoever holds the lease
    ships and moves the cursor; another replica gets the sink once it is handed over."""
    store = Store(str(tmp_path / "a.db"))
    store.append([Event(id=f"e{n}", kind="request") for n in range(5)])
    assert store.claim_sink("siem", "a", 60) == 0
    assert store.claim_sink("siem", "b", 60) is None  # a's lease runs
    assert [r["seq"] for r in store.after(0, 3)] == [1, 2, 3]
    assert store.advance_sink("siem", "a", 3)
    assert not store.advance_sink("siem", "b", 5)  # not b's to move
    assert not store.advance_sink("siem", "a", 2)  # never backwards
    store.release_sinks("a")
    assert store.claim_sink("siem", "b", 60) == 3
    assert store.claim_sink("siem", "a", 60) is None
    assert store.sink_cursors() == {"siem": 3}
