"""What the audit store costs on disk per request, and how fast it appends.

The same flows (a request, its decision and its response, as the recorder writes them for
agents reading an inventory API: small JSON requests, JSON answers of 2–20 KB that agents
fetch again and again) written two ways in one run:

- baseline: schema version 1's layout, every body inline in its event row;
- Custody: bodies kept once per content, deflated (addons/engine/store.py).

Prints bytes on disk per flow and per event, and flows appended per second, for both.

    .venv/bin/python bench/store.py [--flows 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from addons.engine.model import Decision, Operation, Principal  # noqa: E402
from addons.engine.store import Event, Store  # noqa: E402


def flows(n: int, rng: random.Random) -> list[list[Event]]:
    items = [{"id": i, "name": f"part {i}", "quantity": rng.randrange(5000), "supplier_email": f"s{i}@example.com"}
             for i in range(400)]
    pages = [json.dumps(items[k * 40:(k + rng.randrange(1, 10)) * 40]).encode() for k in range(10)]
    out = []
    for i in range(n):
        who = Principal(f"crew-{i % 12}", "https://idp", ("analysts",), {"agent": "researcher", "model": "gpt-4o"})
        page = rng.randrange(10)
        op = Operation("http", "inventory", "read", f"/items?page={page}", 10, f"GET /items?page={page} on inventory")
        flow = f"f{i}"
        out.append([
            Event(id=f"q{i}", kind="request", flow=flow, session=f"s{i % 40}", principal=who, operation=op,
                  detail={"method": "GET", "url": f"https://inventory/items?page={page}",
                          "headers": [["accept", "application/json"], ["user-agent", "python-requests/2.32"]]},
                  body=json.dumps({"page": page}).encode()),
            Event(id=f"d{i}", kind="decision", flow=flow, session=f"s{i % 40}", principal=who, operation=op,
                  decision=Decision("allow", ("analysts-read",), "analysts read inventory")),
            Event(id=f"r{i}", kind="response", flow=flow, session=f"s{i % 40}", principal=who, operation=op, status=200,
                  detail={"headers": [["content-type", "application/json"]], "elapsed_ms": 3.1},
                  body=pages[page]),
        ])
    return out


class InlineStore(Store):
    """Schema version 1's layout: the body in the event row itself (and no replica)."""

    def _chain(self, tx, events):
        from addons.engine.store import chain_hash

        seq, prev = self._head(tx)
        rows = []
        for event in events:
            seq += 1
            row = event.row()
            row["seq"], row["prev_hash"] = seq, prev
            row["hash"] = prev = chain_hash(prev, row)
            rows.append([row.get(c) for c in self._cols])
        tx.many(self._insert, rows)
        tx.run("INSERT INTO chain_head (id, seq, hash) VALUES (1, ?, ?) "
               "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash", (seq, prev))
        return list(range(seq - len(rows) + 1, seq + 1))


def measure(cls, path: Path, batches: list[list[Event]]) -> tuple[float, float]:
    store = cls(str(path))
    start = time.perf_counter()
    for batch in batches:
        store.append(batch)
    elapsed = time.perf_counter() - start
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("VACUUM")
    conn.close()
    return os.path.getsize(path), len(batches) / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flows", type=int, default=3000)
    args = p.parse_args()
    batches = flows(args.flows, random.Random(7))
    events = sum(len(b) for b in batches)
    with tempfile.TemporaryDirectory() as tmp:
        base_size, base_rate = measure(InlineStore, Path(tmp) / "v1.db", batches)
        ours_size, ours_rate = measure(Store, Path(tmp) / "v2.db", batches)
    print(f"{args.flows} flows ({events} events); load average {os.getloadavg()[0]:.2f}")
    for name, size, rate in (("baseline: bodies inline (schema 1)", base_size, base_rate),
                             ("custody: bodies once, deflated", ours_size, ours_rate)):
        print(f"{name:<38} {size / args.flows:9.0f} B/flow  {size / events:8.0f} B/event  "
              f"{size / 1e6:7.2f} MB per {args.flows}  {rate:8.0f} flows/s appended")
    print(f"ratio: {base_size / ours_size:.1f}x smaller, {ours_rate / base_rate:.2f}x the append rate")


if __name__ == "__main__":
    main()
