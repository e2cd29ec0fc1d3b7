"""SQL text as the masker reads it: where its values are, and which column each belongs to.

A statement's text carries values: string literals (in any of PostgreSQL's spellings:
'…', E'…' with backslash escapes, U&'…', $tag$…$tag$) and the parameters that travel
beside it. To mask a statement like a document, the masker needs each literal's span in
the text, its value as the server reads it (an E'\\t' is a tab, so detection must see the
tab), and the column it is compared with or assigned to: `password = '…'`, `SET password
= '…'`, `INSERT INTO t (password) VALUES ('…')`, `password IN ('…')`, and `$2` bound the
same way. PostgreSQL's own scanner and parser (pglast) say where literals are and what
they mean; nothing here guesses from quotes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import pglast
from pglast.parser import parse_sql_json, scan

STRING_TOKENS = ("SCONST", "USCONST")
VALUE_TOKENS = ("SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST")


@dataclass(frozen=True)
class Literal:
    start: int
    end: int
    """Its span in the text (character offsets, end exclusive)."""
    value: str | None
    """The string as the server reads it; None for numbers and bit strings."""
    column: str = ""
    escaped: bool = False
    """Written with escapes (E'…', U&'…'): its text is not its value."""
    """The column (or setting) it is compared with or assigned to, if any."""


def _node(value: Any) -> tuple[str, dict]:
    """A parse tree node of libpg_query's JSON as (type, fields); ("", {}) for anything else."""
    if isinstance(value, dict) and len(value) == 1:
        ((kind, fields),) = value.items()
        if kind[:1].isupper() and isinstance(fields, dict):  # node types are capitalised, fields not
            return kind, fields
    return "", {}


def _unwrap(value: Any) -> tuple[str, dict]:
    kind, fields = _node(value)
    while kind in ("TypeCast", "CollateClause"):
        kind, fields = _node(fields.get("arg"))
    return kind, fields


def _column(value: Any) -> str:
    kind, fields = _unwrap(value)
    names = [f["String"]["sval"] for f in fields.get("fields", ()) if "String" in f] if kind == "ColumnRef" else []
    return names[-1] if names else ""


class _Bindings:
    """Walks the tree: constants (by byte location) and parameters ($n) next to a column."""

    def __init__(self) -> None:
        self.at: dict[int, str] = {}
        self.params: dict[int, str] = {}
        self.values: dict[int, str] = {}

    def bind(self, value: Any, column: str) -> None:
        kind, fields = _unwrap(value)
        if not column:
            return
        if kind == "A_Const" and "location" in fields:
            self.at[fields["location"]] = column
        elif kind == "ParamRef":
            self.params[fields["number"]] = column
        elif kind in ("List", "A_ArrayExpr"):
            for item in fields.get("items", fields.get("elements", ())):
                self.bind(item, column)

    def walk(self, value: Any) -> None:
        if isinstance(value, list):
            for item in value:
                self.walk(item)
            return
        kind, fields = _node(value)
        if kind == "A_Const" and "sval" in fields and "location" in fields:
            self.values[fields["location"]] = fields["sval"].get("sval", "")
        elif kind == "A_Expr":
            self.bind(fields.get("rexpr"), _column(fields.get("lexpr")))
            self.bind(fields.get("lexpr"), _column(fields.get("rexpr")))
        elif kind == "ResTarget" and fields.get("name"):  # UPDATE … SET password = …, SELECT … AS password
            self.bind(fields.get("val"), fields["name"])
        elif kind == "InsertStmt":
            names = [_node(c)[1].get("name", "") for c in fields.get("cols", ())]
            for row in _node(fields.get("selectStmt"))[1].get("valuesLists", ()):
                for name, item in zip(names, _node(row)[1].get("items", ())):
                    self.bind(item, name)
        elif kind == "VariableSetStmt":  # SET app.password = …
            for item in fields.get("args", ()):
                self.bind(item, fields.get("name", "").rpartition(".")[2])
        for child in (fields or value).values() if isinstance(value, dict) else ():
            self.walk(child)


@functools.lru_cache(maxsize=1024)
def _bindings(sql: str) -> _Bindings:
    found = _Bindings()
    try:
        found.walk(json.loads(parse_sql_json(sql)).get("stmts", []))
    except pglast.parser.ParseError:
        pass
    return found


@functools.lru_cache(maxsize=1024)
def literals(sql: str) -> tuple[Literal, ...]:
    """Every constant in `sql`, in order. Text that does not scan (an unterminated string)
    has none: the masker then reads it as plain text."""
    try:
        tokens = scan(sql)  # character offsets
    except pglast.parser.ParseError:
        return ()
    found = _bindings(sql)
    out = []
    for t in tokens:
        if t.name not in VALUE_TOKENS:
            continue
        at = len(sql[:t.start].encode())  # the parse tree's locations are byte offsets
        value = found.values.get(at, sql[t.start:t.end + 1]) if t.name in STRING_TOKENS else None
        escaped = t.name == "USCONST" or sql[t.start:t.start + 1] in "eE"
        out.append(Literal(t.start, t.end + 1, value, found.at.get(at, ""), escaped))
    return tuple(out)


def parameters(sql: str) -> dict[int, str]:
    """$n → the column it is compared with or assigned to."""
    return dict(_bindings(sql).params)


def quoted(value: str) -> str:
    """A value as a standard SQL string literal."""
    return "'" + value.replace("'", "''") + "'"
