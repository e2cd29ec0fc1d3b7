"""Which table columns a result column's value is computed from.

Column masks hide a column by its name, and the server says where a plain column comes
from (RowDescription's table and column number, which the terminal turns into the
column's name: `SELECT password AS p` is still `password`). A value can reach a result
another way: a whole-row reference (`SELECT u FROM users u`, `u::text`, `format('%s', u)`),
an aggregate or array constructor (`array_agg(password)`, `ARRAY[password]`), any
expression (`lower(password)`, `password || ''`), a subquery, a CTE or a function in FROM
that renames it. For those the server gives no origin, so this module reads the statement:
for each result column, the column names its value may be computed from, the tables
whose whole rows it carries, and the tables whose rows it carries as JSON objects keyed
by column name (`row_to_json(u)`, `json_agg(u)`, `to_jsonb(u)`), where the masker can
hide just the masked keys.

The reading over-approximates on purpose: names are resolved across the whole statement
(an alias anywhere stands for every expression given that name; a computed column a
subquery leaves unnamed may be any column of it), so a value is never thought clean
because a name was resolved to the wrong scope. Masking a column too many is the price.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pglast
from pglast import ast

JSON_ROW_FUNCTIONS = frozenset({"row_to_json", "to_json", "to_jsonb", "json_agg", "jsonb_agg",
                                "array_to_json", "json_agg_strict", "jsonb_agg_strict"})
"""Functions that turn a row into a JSON object keyed by its column names."""


@dataclass(frozen=True)
class Carried:
    """What one result column may carry."""

    names: frozenset[str] = frozenset()
    """Column names (table columns, or aliases resolved to what they stand for) it is computed from."""
    tables: frozenset[str] = frozenset()
    """Tables whose whole rows it carries, as quoted identifiers ("public"."users")."""
    keyed: frozenset[str] = frozenset()
    """Tables whose whole rows it carries only as JSON objects keyed by column name."""

    def __or__(self, other: Carried) -> Carried:
        return Carried(self.names | other.names, self.tables | other.tables, self.keyed | other.keyed)


NOTHING = Carried()


@dataclass(frozen=True)
class Target:
    """One entry of a select list: an expression (one column), or a `*` (any number)."""

    carried: Carried
    star: bool = False

@dataclass
class _Item:
    """A FROM item: a table (by name), or a derived one: the select lists of a subquery or
    CTE, the call of a function in FROM, the sides of a named join."""

    table: str = ""
    exprs: list = field(default_factory=list)
    parts: list = field(default_factory=list)


@dataclass
class _Refs:
    """What an expression refers to directly."""

    names: set = field(default_factory=set)
    items: set = field(default_factory=set)  # whole rows


def _children(node):
    for name in node.__slots__:
        value = getattr(node, name)
        if isinstance(value, ast.Node):
            yield value
        elif isinstance(value, tuple):
            stack = list(value)
            while stack:
                v = stack.pop(0)
                if isinstance(v, ast.Node):
                    yield v
                elif isinstance(v, tuple):
                    stack[:0] = list(v)


def _walk(node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(_children(n))


def _select_lists(node) -> list[tuple]:
    """The select lists of a query (both arms of a UNION; each row of VALUES; RETURNING),
    as (name, expression) pairs; the name is "" where the server names the column."""
    if isinstance(node, ast.SelectStmt):
        if node.op.name != "SETOP_NONE":
            return _select_lists(node.larg) + _select_lists(node.rarg)
        if node.valuesLists:
            return [tuple(("", v) for v in row) for row in node.valuesLists]
        return [tuple((t.name or "", t.val) for t in node.targetList or ())]
    if isinstance(node, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)):
        clause = getattr(node, "returningClause", None)
        return [tuple((t.name or "", t.val) for t in (clause.exprs or ()) if clause is not None)]
    return []


def _quoted(name: str) -> str:
    """An identifier as the server reads it back (to_regclass folds what is not quoted)."""
    return '"' + name.replace('"', '""') + '"'


def _func_name(call) -> str:
    return call.funcname[-1].sval if call.funcname and isinstance(call.funcname[-1], ast.String) else ""


def _star(expr) -> bool:
    return (isinstance(expr, ast.ColumnRef) and isinstance(expr.fields[-1], ast.A_Star)) or (
        isinstance(expr, ast.A_Indirection) and any(isinstance(i, ast.A_Star) for i in expr.indirection))


class _Statement:
    """The names of one statement, gathered across all its scopes."""

    def __init__(self, stmt: ast.Node) -> None:
        self.aliases: dict[str, list] = {}  # a name → the expressions it was given for
        self.items: dict[str, _Item] = {}  # a FROM item's name (alias, table or CTE name) → what it is
        self.unnamed: list = []  # computed columns of derived items the statement leaves unnamed
        self.ctes = {n.ctename for n in _walk(stmt) if isinstance(n, ast.CommonTableExpr)}
        for node in _walk(stmt):
            self._gather(node)

    def _item(self, name: str) -> _Item:
        return self.items.setdefault(name, _Item())

    def _gather(self, node) -> None:
        if isinstance(node, ast.CommonTableExpr):
            self._derived(node.ctename, node.ctequery, node.aliascolnames)
        elif isinstance(node, ast.RangeSubselect) and node.alias:
            self._derived(node.alias.aliasname, node.subquery, node.alias.colnames)
        elif isinstance(node, ast.RangeFunction):
            calls = [f[0] for f in node.functions or () if f and f[0] is not None]
            names = {node.alias.aliasname if node.alias else ""} | {_func_name(c) for c in calls} | {
                c.colname for c in node.coldeflist or ()} | {c.sval for c in (node.alias.colnames if node.alias else
                                                                               None) or ()}
            for n in names - {""}:  # a function's columns have names only the server knows
                self._item(n).exprs.extend(calls)
                self.aliases.setdefault(n, []).extend(calls)
            self.unnamed.extend(calls)
        elif isinstance(node, ast.RangeVar):
            self._table(node)
        elif isinstance(node, ast.JoinExpr) and (node.alias or node.join_using_alias):
            alias = node.alias or node.join_using_alias
            self._item(alias.aliasname).parts.extend(self._names(side) for side in (node.larg, node.rarg))
        elif isinstance(node, ast.ResTarget) and node.name and node.val is not None:
            self.aliases.setdefault(node.name, []).append(node.val)

    def _names(self, node) -> str:
        """The name a FROM item is known by."""
        if isinstance(node, ast.RangeVar):
            return node.alias.aliasname if node.alias else node.relname
        alias = getattr(node, "alias", None) or getattr(node, "join_using_alias", None)
        return alias.aliasname if alias else ""

    def _derived(self, name: str, query, colnames) -> None:
        item = self._item(name)
        lists = _select_lists(query)
        for values in lists:
            item.exprs.extend(v for _, v in values)
            self.unnamed.extend(v for n, v in values if not n and not isinstance(v, ast.ColumnRef))  # array_agg…
        for position, col in enumerate(colnames or ()):
            exprs = [values[position][1] for values in lists if position < len(values)]
            self.aliases.setdefault(col.sval, []).extend(exprs or item.exprs)

    def _table(self, node: ast.RangeVar) -> None:
        name = ".".join(_quoted(n) for n in (node.schemaname, node.relname) if n)
        alias = node.alias.aliasname if node.alias else ""
        if node.relname in self.ctes and not node.schemaname:
            if alias:
                self._item(alias).parts.append(node.relname)
            return
        for n in {node.relname, name, alias} - {""}:
            item = self._item(n)
            item.table = item.table or name
        for col in (node.alias.colnames if node.alias else None) or ():  # users AS u(a, b, c): renamed
            self.aliases.setdefault(col.sval, []).append(ast.ColumnRef(fields=(ast.String(sval=alias),)))

    # what an expression carries

    def refs(self, node, out: _Refs | None = None) -> _Refs:
        """Column names and whole rows an expression refers to, a subquery's included (its
        filters too: a value a secret chose is the secret's)."""
        out = out if out is not None else _Refs()
        for n in _walk(node) if isinstance(node, ast.Node) else ():
            if not isinstance(n, ast.ColumnRef):
                continue
            fields = n.fields
            if isinstance(fields[-1], ast.A_Star):
                qualifier = fields[-2].sval if len(fields) > 1 and isinstance(fields[-2], ast.String) else ""
                out.items.update([qualifier] if qualifier else self.items)
                continue
            out.names.add(fields[-1].sval)
            if len(fields) == 1 and fields[0].sval in self.items:
                out.items.add(fields[0].sval)  # `u` alone is u's whole row
        return out

    def close(self, refs: _Refs) -> Carried:
        """Everything the references stand for: aliases to what they name, whole rows to
        the columns of what they are rows of."""
        names, items, tables = set(), set(), set()
        todo_names, todo_items = list(refs.names), list(refs.items)
        unnamed_done = False
        while todo_names or todo_items:
            if todo_names:
                name = todo_names.pop()
                if name in names:
                    continue
                names.add(name)
                exprs = list(self.aliases.get(name, ()))
                if not unnamed_done:
                    exprs, unnamed_done = exprs + self.unnamed, True
            else:
                name = todo_items.pop()
                item = self.items.get(name)
                if name in items or item is None:
                    continue
                items.add(name)
                if item.table:
                    tables.add(item.table)
                exprs = list(item.exprs)
                todo_items.extend(item.parts)
            for expr in exprs:
                found = self.refs(expr)
                todo_names.extend(found.names - names)
                todo_items.extend(found.items - items)
        return Carried(frozenset(names), frozenset(tables))

    def target(self, expr) -> Target:
        if isinstance(expr, ast.FuncCall) and _func_name(expr) in JSON_ROW_FUNCTIONS and expr.args and all(
                self._base_row(a) for a in expr.args):
            return Target(Carried(keyed=frozenset(self._base_row(a) for a in expr.args)))
        if _star(expr):
            return Target(NOTHING, star=True)
        return Target(self.close(self.refs(expr)))

    def _base_row(self, node) -> str:
        """The table a whole-row reference (`u`, `u.*`) is a row of, when it is a table."""
        if isinstance(node, ast.ColumnRef) and isinstance(node.fields[0], ast.String):
            fields = node.fields
            if len(fields) == 1 or (len(fields) == 2 and isinstance(fields[1], ast.A_Star)):
                return self.items.get(fields[0].sval, _Item()).table
        return ""

    def named(self, name: str) -> Carried:
        """What a result column of this name stands for (a column a `*` expanded)."""
        return self.close(_Refs(names={name}))


@dataclass(frozen=True)
class Lineage:
    """What the columns of one statement's result may carry."""

    statement: _Statement = field(repr=False, compare=False)
    lists: tuple[tuple[Target, ...], ...]
    """Each select list of the result (one per arm of a UNION, per row of VALUES)."""

    def columns(self, names: list[str]) -> list[Carried]:
        """What each result column (named as the result names them) may carry. A `*`
        stands for the columns of what it expands, which the server names: such a column
        carries what its own name stands for. A list that cannot be lined up with the
        result (two `*`s) gives every column what any entry carries."""
        out = [NOTHING] * len(names)
        for targets in self.lists:
            stars = sum(t.star for t in targets)
            width = len(names) - (len(targets) - stars)
            if stars > 1 or (not stars and width != 0) or width < 0:
                anything = functools.reduce(lambda a, b: a | b, (t.carried for t in targets), NOTHING)
                out = [o | anything | self.statement.named(n) for o, n in zip(out, names)]
                continue
            position = 0
            for t in targets:
                for n in names[position:position + (width if t.star else 1)]:
                    out[position] |= self.statement.named(n) if t.star else t.carried
                    position += 1
        return out


RUNS_ANOTHER = (ast.ExecuteStmt, ast.FetchStmt, ast.CallStmt)
"""Statements whose rows are another statement's (a prepared one, a cursor's, a procedure's)."""


def of(stmt: ast.Node) -> Lineage | None:
    """The lineage of a statement's result; None for one whose rows are another
    statement's (EXECUTE, FETCH: the caller reads the statement they run; CALL)."""
    if isinstance(stmt, (ast.DeclareCursorStmt, ast.PrepareStmt)):
        stmt = stmt.query
    if isinstance(stmt, RUNS_ANOTHER):
        return None
    statement = _Statement(stmt)
    if not isinstance(stmt, (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)):
        return Lineage(statement, ())  # SHOW, EXPLAIN, the rest: no values of tables in their rows
    return Lineage(statement, tuple(tuple(statement.target(v) for _, v in values) for values in _select_lists(stmt)))


@functools.lru_cache(maxsize=1024)
def lineage(sql: str) -> Lineage | None:
    """The lineage of the one statement `sql`; None when it is not one statement, does
    not parse, or returns another statement's rows."""
    try:
        parsed = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return None
    return of(parsed[0].stmt) if len(parsed) == 1 else None
