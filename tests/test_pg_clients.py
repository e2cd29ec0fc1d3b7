"""Standard client libraries through pg_bridge, against the real PostgreSQL: asyncpg (types
with arrays and ranges, prepared statements, cursors, its pool), the PostgreSQL JDBC driver
(a prepared statement ten times: binary transfer from the sixth), node-postgres and
psycopg; each with masks (an analyst: credential columns, PII and secrets masked) and
without (a reader no mask applies to). Every value read through the gateway is compared
with the same query run directly: a client must never get other data than the server's,
masked values apart."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import psycopg
import pytest

from tests.support import clients
from tests.test_postgres import APP_PASSWORD, bridge, connect, gw, pg, tokens  # noqa: F401  (the same fixtures)

KINDS = """
CREATE TABLE kinds (
  id int PRIMARY KEY, i2 int2, i4 int4, i8 int8, num numeric(12,3), f4 float4, f8 float8, b bool, t text,
  vc varchar(20), ch char(4), d date, tm time, tmtz timetz, ts timestamp, tstz timestamptz, iv interval, u uuid,
  by bytea, j json, jb jsonb, ia int4[], ta text[], r int4range, tr tstzrange, nr numrange, ip inet, m money,
  o oid, x xml, na numeric[]);
INSERT INTO kinds VALUES
 (1, -2, 100000, 9007199254740993, 12345.678, 1.5, 0.1, true, 'hello', 'var', 'ab', '2024-02-29', '13:14:15.123456',
  '13:14:15+02', '2024-02-29 13:14:15.5', '2024-02-29 13:14:15.5+01', '1 year 2 mons 3 days 04:05:06.7',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff10', '{"a": [1, "x"]}', '{"b": {"c": null}}', '{1,NULL,3}',
  '{"x y","z",NULL}', '[1,10)', '[2024-01-01,2024-02-01)', '(1.5,2.5]', '10.0.0.1', '12.34', 42, '<a>b</a>',
  '{1.5,-2}'),
 (2, NULL, NULL, NULL, -0.5, 'Infinity', '-Infinity', false, '', NULL, NULL, 'infinity', NULL, NULL, '-infinity',
  NULL, '-1 days', NULL, '', 'null', '[]', '{}', '{}', 'empty', NULL, NULL, '::1', NULL, NULL, NULL, '{}')
"""
COLUMNS = ["id", "i2", "i4", "i8", "num", "f4", "f8", "b", "t", "vc", "ch", "d", "tm", "tmtz", "ts", "tstz", "iv",
           "u", "by", "j", "jb", "ia", "ta", "r", "tr", "nr", "ip", "m", "o", "x", "na"]
MASKED = {"analyst": {"ip"}, "reader": set()}  # inet holds IP addresses: PII, masked as text
WHO = ["analyst", "reader"]


@pytest.fixture(scope="module")
def kinds(pg):
    with psycopg.connect(pg.dsn("shop", "app", APP_PASSWORD), autocommit=True) as c:
        c.execute(KINDS)


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module, so asyncpg connections can outlive one test."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


def asyncpg_connect(port: int, user: str, password: str):
    return asyncpg.connect(host="127.0.0.1", port=port, user=user, password=password, database="shop", ssl=False)


@pytest.fixture(scope="module")
def direct(pg, kinds, loop):
    c = loop(asyncpg_connect(pg.port, "app", APP_PASSWORD))
    yield c
    loop(c.close())


@pytest.fixture(scope="module")
def via(gw, bridge, tokens, kinds, loop):
    connections = {who: loop(asyncpg_connect(gw.bridge_port, "agent", tokens[who])) for who in WHO}
    yield connections
    for c in connections.values():
        loop(c.close())


def same(a, b) -> bool:
    """Equal as the client sees them (repr: Decimal('NaN') is not equal to itself)."""
    return repr(a) == repr(b)


# asyncpg


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("column", COLUMNS)
def test_asyncpg_reads_every_type_as_the_server_sends_it(loop, via, direct, who, column):
    sql = f"SELECT {column} FROM kinds ORDER BY id"
    got, want = loop(via[who].fetch(sql)), loop(direct.fetch(sql))
    if column in MASKED[who]:
        assert [r[0] for r in got] == ["[IP_ADDRESS]", "[IP_ADDRESS]"]
    else:
        assert same(got, want)


@pytest.mark.parametrize("who", WHO)
def test_asyncpg_prepared_statement_ten_times(loop, via, direct, who):
    sql = "SELECT id, i4, num, tstz, ia, ta, r, jb, u FROM kinds WHERE id = $1"
    mine, theirs = loop(via[who].prepare(sql)), loop(direct.prepare(sql))
    for n in range(10):
        assert same(loop(mine.fetch(n % 2 + 1)), loop(theirs.fetch(n % 2 + 1)))


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize(
    "sql, args",
    [
        ("SELECT $1::int[] AS a", ([1, None, 3],)),
        ("SELECT $1::text[] AS a", (["x y", "", None],)),
        ("SELECT $1::int4range AS r", (asyncpg.Range(1, 5),)),
        ("SELECT $1::numrange AS r", (asyncpg.Range(None, 2, upper_inc=True),)),
        ("SELECT $1::jsonb AS j", ('{"k": [1, 2]}',)),
        ("SELECT $1::timestamptz AS t", (__import__("datetime").datetime(2024, 1, 2, 3, 4, 5, 6,
                                                                          __import__("datetime").timezone.utc),)),
        ("SELECT $1::bytea AS b", (b"\x00\xffbinary",)),
        ("SELECT $1::numeric AS n", (__import__("decimal").Decimal("-12.50"),)),
    ],
)
def test_asyncpg_parameters_of_introspected_types(loop, via, direct, who, sql, args):
    """Arrays, ranges and the like make asyncpg introspect the types first (with its
    set_config('jit', 'off') query) before it can send them."""
    assert same(loop(via[who].fetch(sql, *args)), loop(direct.fetch(sql, *args)))


@pytest.mark.parametrize("who", WHO)
def test_asyncpg_cursor_forward_and_fetch(loop, via, direct, who):
    async def walk(c):
        out = []
        async with c.transaction():
            cur = await c.cursor("SELECT id, i4, t FROM kinds, generate_series(1, 5) g ORDER BY g, id")
            out.append(await cur.fetch(3))
            await cur.forward(4)
            out.append(await cur.fetch(2))
            out.append(await cur.fetchrow())
            async for row in c.cursor("SELECT g FROM generate_series(1, 7) g", prefetch=3):
                out.append(row)
        return out

    assert same(loop(walk(via[who])), loop(walk(direct)))


@pytest.mark.parametrize("who", WHO)
def test_asyncpg_pool_keeps_its_connections(loop, gw, tokens, who):
    """The pool resets a connection it gets back (pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL) and hands the same one out again."""
    async def use():
        pool = await asyncpg.create_pool(host="127.0.0.1", port=gw.bridge_port, user="agent", password=tokens[who],
                                         database="shop", ssl=False, min_size=1, max_size=1)
        try:
            pids = []
            for _ in range(5):
                async with pool.acquire() as c:
                    pids.append(await c.fetchval("SELECT pg_backend_pid()"))
                    assert await c.fetchval("SELECT $1::int[]", [1, 2]) == [1, 2]
            return pids
        finally:
            await pool.close()

    assert len(set(loop(use()))) == 1


def test_asyncpg_reads_masked_values_in_the_format_it_asked_for(loop, via):
    """Binary results with masks: an int4 stays an int4, a masked column arrives as text."""
    row = loop(via["analyst"].fetchrow("SELECT 1000::int4 AS n, password, email, id FROM users WHERE id = 1"))
    assert tuple(row) == (1000, "[REDACTED]", "[EMAIL_ADDRESS]", 1)


# JDBC


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("sql", ["SELECT * FROM kinds WHERE id = ?",
                                 "SELECT id, name, password, email, score FROM users WHERE id = ?"])
def test_jdbc_prepared_statement_ten_times_with_binary_transfer(gw, bridge, pg, tokens, kinds, who, sql):
    through = clients.jdbc(f"jdbc:postgresql://127.0.0.1:{gw.bridge_port}/shop", "agent", tokens[who], sql)
    server = clients.jdbc(f"jdbc:postgresql://127.0.0.1:{pg.port}/shop", "app", APP_PASSWORD, sql)
    assert len(through) == len(server) == 10
    hidden = MASKED[who] | ({"password", "email"} if who == "analyst" else set())
    for mine, theirs in zip(through, server):
        for got, want in zip(mine.split(";"), theirs.split(";")):
            name = got.partition("=")[0].partition(":")[2] or got.partition("=")[0]
            assert got == want or (name in hidden and got.endswith(("[REDACTED]", "[IP_ADDRESS]", "[EMAIL_ADDRESS]")))
    requests = [json.loads(r["body"]) for r in gw.events("kind = 'request' AND body_digest IS NOT NULL")]
    asked = [b.get("result_formats") for b in requests if b.get("sql") == sql.replace("?", "$1")]
    assert [0, 1] <= sorted({f for formats in asked if formats for f in formats})  # binary for some columns


# node-postgres


NODE_QUERIES = [
    {"text": "SELECT * FROM kinds WHERE id = $1", "values": [1]},
    {"text": "SELECT * FROM kinds ORDER BY id"},
    {"text": "SELECT id, t, ia FROM kinds WHERE id = $1", "values": [2], "name": "named-1"},
    {"text": "SELECT id, t, ia FROM kinds WHERE id = $1", "values": [1], "name": "named-1"},
    {"text": "SELECT i4, f8, b, u FROM kinds ORDER BY id", "binary": True},
    {"text": "SELECT id, name, password FROM users WHERE id = $1", "values": [1]},
]


@pytest.mark.parametrize("who", WHO)
def test_node_postgres_reads_what_the_server_sends(gw, bridge, pg, tokens, kinds, who):
    through = clients.node(gw.bridge_port, "agent", tokens[who], NODE_QUERIES)
    server = clients.node(pg.port, "app", APP_PASSWORD, NODE_QUERIES)
    hidden = MASKED[who] | ({"password"} if who == "analyst" else set())
    for mine, theirs in zip(through, server):
        assert len(mine) == len(theirs)
        for got, want in zip(mine, theirs):
            assert {k: v for k, v in got.items() if k not in hidden} == {k: v for k, v in want.items() if k not in hidden}
            assert all(got[k] in ("[IP_ADDRESS]", "[REDACTED]") for k in hidden & got.keys())


# psycopg


PSYCOPG_COLUMNS = [c for c in COLUMNS if c not in ("d", "ts")]  # psycopg cannot load 'infinity' dates


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg_reads_every_type_as_the_server_sends_it(gw, bridge, pg, tokens, kinds, who, binary):
    sql = f"SELECT {', '.join(PSYCOPG_COLUMNS)} FROM kinds ORDER BY id"
    with connect(gw, tokens[who]) as c:
        through = c.execute(sql, binary=binary).fetchall()
    with psycopg.connect(pg.dsn("shop", "app", APP_PASSWORD)) as c:
        server = c.execute(sql, binary=binary).fetchall()
    for mine, theirs in zip(through, server):
        for name, got, want in zip(PSYCOPG_COLUMNS, mine, theirs):
            assert (got == "[IP_ADDRESS]") if name in MASKED[who] else same(got, want), name


# SQLAlchemy on asyncpg


@pytest.mark.parametrize("who", WHO)
def test_sqlalchemy_on_asyncpg_reflects_and_reads(loop, gw, bridge, tokens, kinds, who):
    """SQLAlchemy's asyncpg dialect introspects the server on connect (version,
    current_schema, standard_conforming_strings, its JSON codecs) before the first query."""
    import sqlalchemy
    from sqlalchemy.ext.asyncio import create_async_engine

    async def use():
        engine = create_async_engine(f"postgresql+asyncpg://agent:{tokens[who]}@127.0.0.1:{gw.bridge_port}/shop",
                                     connect_args={"ssl": False})
        try:
            async with engine.connect() as conn:
                tables = await conn.run_sync(lambda c: sorted(sqlalchemy.inspect(c).get_table_names()))
                rows = (await conn.execute(sqlalchemy.text("SELECT id, jb, ia FROM kinds ORDER BY id"))).all()
            return tables, rows
        finally:
            await engine.dispose()

    tables, rows = loop(use())
    assert {"kinds", "notes", "users"} <= set(tables)
    assert [tuple(r) for r in rows] == [(1, {"b": {"c": None}}, [1, None, 3]), (2, [], [])]
