"""The audit store: the hash chain detects editing, deleting and reordering any event."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from addons.engine.model import Decision, Operation, Principal
from addons.engine.store import GENESIS, Event, Store, chain_hash

BIN = Path(sys.executable).parent


def populate(path: Path, n: int = 5) -> None:
    store = Store(str(path))
    for i in range(n):
        store.append([
            Event(id=f"e{i}", kind="request", session="s1", flow=f"f{i}",
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
        (["UPDATE events SET body = NULL WHERE seq = 3"], None, None),
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
