"""Where result columns come from: (table OID, column number) → the table column's name.

Column masks match names, and a result column can be renamed (`SELECT password AS p`);
its RowDescription still says which table column it is. The names are looked up on one
connection per database connection of the gateway's own (a session's connection may be in
a failed transaction), cached briefly so a renamed column is seen again soon. A lookup
that fails raises: masking cannot be sure, so the result is not sent.
"""

from __future__ import annotations

import time

from addons.engine.config import Connection
from pg_bridge.terminal.backend import Backend, BackendError, conninfo, failure

TTL = 60.0
QUERY = ("SELECT a.attrelid, a.attnum, a.attname FROM pg_catalog.pg_attribute a "
         "JOIN unnest($1::oid[], $2::int2[]) AS k(rel, num) ON a.attrelid = k.rel AND a.attnum = k.num")
TABLE_QUERY = ("SELECT k.name, a.attname FROM unnest($1::text[]) AS k(name) LEFT JOIN pg_catalog.pg_attribute a "
               "ON a.attrelid = pg_catalog.to_regclass(k.name) AND a.attnum > 0 AND NOT a.attisdropped")


def _quoted(name: str) -> str:
    """An element of a text[] literal."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Catalogs:
    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}
        self.names: dict[tuple[str, int, int], tuple[str, float]] = {}
        self.columns: dict[tuple[str, str], tuple[list[str] | None, float]] = {}

    async def origins(self, conn: Connection, keys: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
        now = time.monotonic()
        wanted = {k for k in keys if (hit := self.names.get((conn.name, *k))) is None or now - hit[1] > TTL}
        if wanted:
            await self._lookup(conn, sorted(wanted), now)
        out = {}
        for k in keys:
            hit = self.names.get((conn.name, *k))
            out[k] = hit[0] if hit else ""  # a system column (ctid, xmin, …) has no attribute row
        return out

    async def _backend(self, conn: Connection) -> Backend:
        backend = self.backends.get(conn.name)
        if backend is None or backend.pg.status != 0 or backend.lost:
            backend = self.backends[conn.name] = await Backend.connect(conninfo(
                conn.upstream.host, conn.upstream.port, conn.upstream.database, conn.credential.header,
                conn.credential.value, conn.ca_file, {"application_name": "custody catalog"}))
        return backend

    async def _lookup(self, conn: Connection, keys: list[tuple[int, int]], now: float) -> None:
        backend = await self._backend(conn)
        out = await backend.execute(
            QUERY, extended=True, params=["{" + ",".join(str(r) for r, _ in keys) + "}",
                                          "{" + ",".join(str(n) for _, n in keys) + "}"],
            max_bytes=1 << 20)
        result = out.results[0] if out.results else {}
        if "rows" not in result:
            raise BackendError(failure("58000", "custody: could not look up result columns for masking; "
                                                "the result was not sent"))
        for rel, num, name in result["rows"]:
            self.names[(conn.name, int(rel), int(num))] = (name, now)

    async def tables(self, conn: Connection, names: list[str]) -> dict[str, list[str] | None]:
        """The column names of tables (as a statement names them, resolved the way the
        session resolves them: its search_path cannot be changed); None for a name that is
        not a table the gateway's role can see."""
        now = time.monotonic()
        wanted = [n for n in names if (hit := self.columns.get((conn.name, n))) is None or now - hit[1] > TTL]
        if wanted:
            out = await (await self._backend(conn)).execute(
                TABLE_QUERY, extended=True, params=["{" + ",".join(_quoted(n) for n in wanted) + "}"],
                max_bytes=1 << 20)
            result = out.results[0] if out.results else {}
            if "rows" not in result:
                raise BackendError(failure("58000", "custody: could not look up tables for masking; "
                                                    "the result was not sent"))
            found: dict[str, list[str] | None] = {n: None for n in wanted}
            for name, column in result["rows"]:
                if column is not None:
                    found[name] = (found[name] or []) + [column]
            for name, columns in found.items():
                self.columns[(conn.name, name)] = (columns, now)
        return {n: self.columns[(conn.name, n)][0] for n in names}

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.backends.clear()
