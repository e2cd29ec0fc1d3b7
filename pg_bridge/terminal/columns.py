"""What the masker needs to know about result columns, found on the server and in the SQL.

Column masks match names (addons/engine/sqlresults.py). A plain column says where it comes
from (RowDescription's table and column number): its `origin` is that table column's name,
whatever it is called in the result. A computed column has no origin; what its value may
be computed from is read from the statement (addons/classifiers/postgres/lineage.py), and
the whole rows it carries are expanded to their tables' column names here: its `sources`.
`keyed` marks a JSON column of whole rows as objects keyed by column name; `opaque` a
column whose statement cannot be read (a cursor or prepared statement the gateway did not
see declared): the masker then hides it whole.
"""

from __future__ import annotations

from addons.classifiers.postgres import lineage
from addons.engine.config import Connection
from pg_bridge.terminal.backend import Output
from pg_bridge.terminal.catalog import Catalogs

JSON_OIDS = (114, 3802)
UNREAD = object()
"""A result whose statement is not known (lineage cannot be read)."""


def plain(column: dict) -> bool:
    """Does the server say which table column this is? (A whole row of a table has the
    table's OID and column number 0: it is computed, not a column.)"""
    return bool(column["table_oid"] and column["column"])


class Columns:
    def __init__(self) -> None:
        self.catalogs = Catalogs()

    def close(self) -> None:
        self.catalogs.close()

    async def describe(self, conn: Connection, out: Output, statements: list, structural: bool) -> None:
        """When column masks apply, annotate every result column of `out` in place: `origin`
        for plain columns, `sources`/`keyed`/`opaque` for computed ones. `statements` are the
        SQL texts the results come from, in order (UNREAD when not known). Detection alone
        needs none of it."""
        if not structural:
            return
        columns = [c for r in out.results for c in r.get("columns", ())]
        origins = await self.catalogs.origins(conn, [(c["table_oid"], c["column"]) for c in columns if plain(c)])
        for c in columns:
            if plain(c):
                c["origin"] = origins[(c["table_oid"], c["column"])]
        pending = []
        for result, sql in zip(out.results, statements):
            if "columns" not in result:
                continue
            computed = [c for c in result["columns"] if not plain(c)]
            if not computed:
                continue
            read = lineage.lineage(sql) if isinstance(sql, str) else None
            if read is None:
                for c in computed:
                    c["opaque"] = True
                continue
            carried = read.columns([c["name"] for c in result["columns"]])
            pending += [(c, k) for c, k in zip(result["columns"], carried) if not plain(c)]
        tables = sorted({t for _, k in pending for t in k.tables | k.keyed})
        known = await self.catalogs.tables(conn, tables) if tables else {}
        for c, k in pending:
            keyed = bool(k.keyed) and c["type_oid"] in JSON_OIDS
            whole_rows = k.tables | (frozenset() if keyed else k.keyed)
            if any(known.get(t) is None for t in whole_rows):
                c["opaque"] = True  # rows of something the gateway cannot see into
                continue
            sources = set(k.names).union(*(known[t] for t in whole_rows))
            if sources:
                c["sources"] = sorted(sources)
            if keyed:
                c["keyed"] = True
