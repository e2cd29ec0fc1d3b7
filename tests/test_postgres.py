"""PostgreSQL through pg_bridge: a real PostgreSQL (initdb/pg_ctl), the real gateway, the
bridge process, the shipped sample rules (rules/postgres.yaml), and real clients: psql,
psycopg 3 and SQLAlchemy. "Nothing reached the backend" is read from the server's own
statement log (log_statement = all)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import psycopg
import pytest
import sqlalchemy
import yaml

from examples.samples.postgres import PostgresServer
from tests.conftest import standard_identity
from tests.support.approvals import Approver, listening, wait_for
from tests.support.gateway import ROOT, Gateway
from tests.support.pgbridge import BridgeProcess, psql
from tests.support.servers import free_port
from tests.test_sqlops import READ_WRITE_MODE, SERVER_ACTIVITY

APP_PASSWORD = "app-Passw0rd-9c1e"  # the login the gateway holds; no agent may ever see it
EMAIL = "bob.builder@example.com"

TEST_RULES = {"rules": [
    {"id": "small-cap-reads", "match": {"connection": "capped-db", "action": "read"}, "effect": "allow"},
    {"id": "plain-reads", "description": "Reads without masks, to compare clients with the server itself.",
     "match": {"connection": "prod-db", "principal": {"groups": ["plain-readers"]}, "action": "read"},
     "effect": "allow"},
]}


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer("admin-pw")
    server.execute("CREATE DATABASE shop")
    server.execute(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
    server.execute("GRANT ALL ON SCHEMA public TO app", "shop")
    with psycopg.connect(server.dsn("shop", "app", APP_PASSWORD), autocommit=True) as c:
        c.execute("CREATE TABLE users (id serial PRIMARY KEY, name text, email text, password text, score int)")
        c.execute("INSERT INTO users (name, email, password, score) "
                  "SELECT 'user' || g, 'user' || g || '@example.com', 'pw-' || g, g FROM generate_series(1, 300) g")
        c.execute("CREATE TABLE notes (id int PRIMARY KEY, body text, tags text[], attrs jsonb)")
        c.execute("INSERT INTO notes VALUES (1, %s, '{a,b}', '{\"k\": \"v\"}'), (2, 'plain', NULL, NULL)",
                  (f"call {EMAIL} today",))
        c.execute("CREATE FUNCTION wipe() RETURNS int LANGUAGE sql AS 'DELETE FROM notes RETURNING 1'")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers, pg, ca):
    directory = tmp_path_factory.mktemp("pg-gateway")
    cert, key = ca.issue("localhost")
    both = directory / "bridge.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    approvals = free_port()
    gateway = Gateway(
        directory,
        connections=[
            {"name": "prod-db", "kind": "postgres", "hosts": ["db.prod.internal"],
             "upstream": f"postgresql://127.0.0.1:{pg.port}/shop",
             "credential": {"type": "password", "username": "app", "secret": "env:PG_APP_PASSWORD"},
             "listen": f"127.0.0.1:{free_port()}", "tls": {"server_cert": str(both)}},
            {"name": "capped-db", "kind": "postgres", "hosts": ["capped.internal"],
             "upstream": f"postgresql://127.0.0.1:{pg.port}/shop",
             "credential": {"type": "password", "username": "app", "secret": "env:PG_APP_PASSWORD"},
             "listen": f"127.0.0.1:{free_port()}", "max_result_bytes": 4096},
        ],
        rules={"postgres.yaml": (ROOT / "rules" / "postgres.yaml").read_text(), "test.yaml": TEST_RULES},
        identity=standard_identity(servers.jwks),
        env={"PG_APP_PASSWORD": APP_PASSWORD},
    )
    gateway.config["approvals"] = {"listen": f"127.0.0.1:{approvals}", "sweep": "200ms"}
    gateway.config_file.write_text(yaml.safe_dump(gateway.config))
    gateway.approvals_url = f"http://127.0.0.1:{approvals}"
    gateway.start()
    wait_for(lambda: listening(gateway.approvals_url))
    gateway.bridge_port = int(gateway.config["connections"][0]["listen"].rsplit(":", 1)[1])
    gateway.capped_port = int(gateway.config["connections"][1]["listen"].rsplit(":", 1)[1])
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def bridge(gw, tmp_path_factory):
    process = BridgeProcess(gw, gw.bridge_port, tmp_path_factory.mktemp("bridge") / "bridge.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tokens(keys, jwks):
    def mint(sub: str, groups: list[str], **kw) -> str:
        return keys["rsa"].token(jwks.issuer, sub=sub, groups=groups, ttl=3600, **kw)

    return {
        "analyst": mint("crew-analyst", ["analysts"]),
        "writer": mint("crew-writer", ["app-writers"]),
        "stranger": mint("nobody", []),
        "dba": mint("dba-1", ["dba"]),
        "reader": mint("plain-reader", ["plain-readers"]),
        "expired": keys["rsa"].token(jwks.issuer, sub="crew-analyst", groups=["analysts"], ttl=-120),
    }


def connect(gw: Gateway, token: str, port: int | None = None, **kwargs) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port or gw.bridge_port, dbname="shop", user="agent",
                           password=token, sslmode="disable", connect_timeout=10, **kwargs)


class Agent(threading.Thread):
    """Runs statements as an agent in the background, where they may wait for an approval;
    keeps the last statement's row count, or the error that ended them."""

    def __init__(self, gw: Gateway, token: str, *statements: str) -> None:
        super().__init__(daemon=True)
        self.gw, self.token, self.statements = gw, token, statements
        self.rowcount: int | None = None
        self.error: psycopg.Error | None = None
        self.start()

    def run(self) -> None:
        with connect(self.gw, self.token, autocommit=True) as c:
            try:
                for sql in self.statements:
                    self.rowcount = c.execute(sql).rowcount
            except psycopg.Error as e:
                self.error = e


def reached(pg: PostgresServer, fragment: str) -> bool:
    """Did the server run a statement containing `fragment`? The planner's EXPLAIN of a
    write (pg_bridge/terminal/planner.py) plans it without running it, so it does not count."""
    for line in pg.log().splitlines():
        _, _, logged = line.partition("LOG:  ")
        text = logged.split(": ", 1)[1] if logged.startswith(("statement: ", "execute ")) else ""
        if fragment in text and not text.startswith("EXPLAIN (FORMAT JSON) "):
            return True
    return False


# reading, masking


def test_psql_reads_with_credential_columns_and_pii_masked(bridge, gw, tokens):
    done = psql(gw.bridge_port, tokens["analyst"], "-A", "-c", "SELECT id, name, email, password, score FROM users "
                                                             "WHERE id <= 2 ORDER BY id")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["id|name|email|password|score", "1|user1|[EMAIL_ADDRESS]|[REDACTED]|1",
                                        "2|user2|[EMAIL_ADDRESS]|[REDACTED]|2", "(2 rows)"]


def test_pii_in_free_text_arrays_and_json_is_masked(bridge, gw, tokens):
    with connect(gw, tokens["analyst"]) as c:
        rows = c.execute("SELECT body, tags, attrs FROM notes ORDER BY id").fetchall()
    assert rows == [("call [EMAIL_ADDRESS] today", ["a", "b"], {"k": "v"}), ("plain", None, None)]


def test_psql_describe_commands(bridge, gw, tokens):
    done = psql(gw.bridge_port, tokens["analyst"], "-c", r"\d users", "-c", r"\dt", "-c", r"\df wipe",
                *(a for cmd in (r"\d+ users", r"\dn", r"\di", r"\dv", r"\l", r"\du", r"\dx", r"\ds", r"\dT",
                                r"\dp users", r"\sf wipe", r"\conninfo") for a in ("-c", cmd)))
    assert done.returncode == 0, done.stderr
    assert 'Table "public.users"' in done.stdout and "nextval('users_id_seq'::regclass)" in done.stdout
    assert "public | notes | table | app" in done.stdout and "public | wipe" in done.stdout


def test_sqlalchemy_connects_and_reflects(bridge, gw, tokens):
    engine = sqlalchemy.create_engine(
        f"postgresql+psycopg://agent:{tokens['analyst']}@127.0.0.1:{gw.bridge_port}/shop?sslmode=disable")
    try:
        inspector = sqlalchemy.inspect(engine)
        assert sorted(inspector.get_table_names()) == ["notes", "users"]
        columns = {c["name"]: str(c["type"]) for c in inspector.get_columns("users")}
        assert columns == {"id": "INTEGER", "name": "TEXT", "email": "TEXT", "password": "TEXT", "score": "INTEGER"}
        assert inspector.get_pk_constraint("users")["constrained_columns"] == ["id"]
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT count(*) FROM users")).scalar() >= 300
    finally:
        engine.dispose()


def test_psycopg_types_binary_parameters_and_results(bridge, gw, tokens):
    with connect(gw, tokens["analyst"]) as c:
        row = c.execute("SELECT %s::int, %s::text, %s::numeric, %s::text IS NULL, %s::bytea, 'ünïcødé ✓'",
                        (42, "naïve ✓", 1.5, None, b"\x00\xff"), binary=True).fetchone()
        assert row == (42, "naïve ✓", __import__("decimal").Decimal("1.5"), True, b"\x00\xff", "ünïcødé ✓")
        text_row = c.execute("SELECT %s::int, NULL::int, now() IS NOT NULL", (7,)).fetchone()
        assert text_row == (7, None, True)
        cur = c.execute("SELECT id, password FROM users WHERE id = %s", (1,), binary=True)
        assert cur.fetchone() == (1, "[REDACTED]") and cur.description[1].type_code == 25


def test_prepared_statements_and_server_side_cursors(bridge, gw, tokens):
    with connect(gw, tokens["analyst"], prepare_threshold=0) as c:
        for n in range(3):
            assert c.execute("SELECT score FROM users WHERE id = %s", (n + 1,)).fetchone() == (n + 1,)
        c.execute("PREPARE top(int) AS SELECT id FROM users ORDER BY id LIMIT $1")
        assert c.execute("EXECUTE top(3)").fetchall() == [(1,), (2,), (3,)]
        with c.cursor("walk") as cur:
            cur.execute("SELECT id FROM users ORDER BY id")
            assert [r[0] for r in cur.fetchmany(5)] == [1, 2, 3, 4, 5]
            assert len(cur.fetchall()) == 295


def test_large_results_arrive_whole(bridge, gw, tokens):
    with connect(gw, tokens["analyst"]) as c:
        rows = c.execute("SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g").fetchall()
    assert len(rows) == 20000 and rows[-1] == (20000, "x" * 100)


def test_a_result_past_the_cap_is_an_error_not_a_truncated_result(bridge, gw, tokens, tmp_path):
    capped = BridgeProcess(gw, gw.capped_port, tmp_path / "capped.log")
    try:
        with connect(gw, tokens["analyst"], port=gw.capped_port, autocommit=True) as c:
            with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="larger than the gateway allows"):
                c.execute("SELECT repeat('x', 100) FROM generate_series(1, 1000)").fetchall()
            assert c.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    finally:
        capped.stop()


def test_row_limits_suspend_the_portal(bridge, gw, tokens):
    """Execute with a row limit (what JDBC's fetch size and psycopg's named cursors do)."""
    raw = RawClient(gw.bridge_port, tokens["analyst"])
    raw.send(b"P", b"\0SELECT g FROM generate_series(1, 5) g\0\0\0")
    raw.send(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0))
    raw.send(b"E", b"\0" + struct.pack("!i", 2))
    raw.send(b"E", b"\0" + struct.pack("!i", 2))
    raw.send(b"E", b"\0" + struct.pack("!i", 0))
    raw.send(b"S", b"")
    kinds = raw.until(b"Z")
    assert [k for k, _ in kinds] == [b"1", b"2", b"D", b"D", b"s", b"D", b"D", b"s", b"D", b"C", b"Z"]
    assert kinds[-2][1] == b"SELECT 5\0"
    raw.close()


def fields_of(row_description: bytes) -> list[tuple[str, int, int]]:
    """(name, type OID, format) of each column of a RowDescription body."""
    n, pos, out = struct.unpack("!h", row_description[:2])[0], 2, []
    for _ in range(n):
        end = row_description.index(b"\0", pos)
        _, _, oid, _, _, fmt = struct.unpack("!ihihih", row_description[end + 1:end + 19])
        out.append((row_description[pos:end].decode(), oid, fmt))
        pos = end + 19
    return out


def cells_of(data_row: bytes) -> list[bytes | None]:
    n, pos, out = struct.unpack("!h", data_row[:2])[0], 2, []
    for _ in range(n):
        (length,) = struct.unpack("!i", data_row[pos:pos + 4])
        out.append(None if length < 0 else data_row[pos + 4:pos + 4 + length])
        pos += 4 + max(length, 0)
    return out


@pytest.mark.parametrize(
    "who, sql, formats, described, cells",
    [
        ("reader", "SELECT 1000::int4 AS n, 'x'::text AS t, 2.5::float8 AS f", [1, 0, 1],
         [("n", 23, 1), ("t", 25, 0), ("f", 701, 1)], [struct.pack("!i", 1000), b"x", struct.pack("!d", 2.5)]),
        ("analyst", "SELECT 1000::int4 AS n, 'x'::text AS t, 2.5::float8 AS f", [1, 0, 1],
         [("n", 23, 1), ("t", 25, 0), ("f", 701, 1)], [struct.pack("!i", 1000), b"x", struct.pack("!d", 2.5)]),
        ("analyst", "SELECT 1000::int4 AS n", [1], [("n", 23, 1)], [struct.pack("!i", 1000)]),  # not 825241648
        ("analyst", "SELECT id, score AS password FROM users WHERE id = 299", [1, 1],
         [("id", 23, 1), ("password", 25, 1)], [struct.pack("!i", 299), b"[REDACTED]"]),  # masked: text, said so
        ("analyst", "SELECT id, email FROM users WHERE id = 299", [0, 1],
         [("id", 23, 0), ("email", 25, 1)], [b"299", b"[EMAIL_ADDRESS]"]),
        ("analyst", "SELECT now()::date - now()::date AS days, ARRAY[1, 2] AS a", [1],
         [("days", 23, 1), ("a", 1007, 1)],
         [struct.pack("!i", 0), struct.pack("!iiiiiii", 1, 0, 23, 2, 1, 4, 1) + struct.pack("!ii", 4, 2)]),
    ],
)
def test_every_column_comes_in_the_format_bind_asked_for(bridge, gw, tokens, who, sql, formats, described, cells):
    raw = RawClient(gw.bridge_port, tokens[who])
    raw.send(b"P", b"\0" + sql.encode() + b"\0\0\0")
    raw.send(b"B", b"\0\0" + struct.pack("!hh", 0, 0) + struct.pack(f"!h{len(formats)}h", len(formats), *formats))
    raw.send(b"D", b"P\0")
    raw.send(b"E", b"\0" + struct.pack("!i", 0))
    raw.send(b"S", b"")
    answer = raw.until(b"Z")
    assert [k for k, _ in answer] == [b"1", b"2", b"T", b"D", b"C", b"Z"], answer
    assert fields_of(answer[2][1]) == described
    assert cells_of(answer[3][1]) == cells
    raw.close()


def test_result_formats_that_do_not_fit_the_columns_are_a_protocol_error(bridge, gw, tokens):
    raw = RawClient(gw.bridge_port, tokens["reader"])
    raw.send(b"P", b"\0SELECT 1, 2, 3\0\0\0")
    raw.send(b"B", b"\0\0" + struct.pack("!hhhhh", 0, 0, 2, 1, 0))
    raw.send(b"E", b"\0" + struct.pack("!i", 0))
    raw.send(b"S", b"")
    answer = raw.until(b"Z")
    assert [k for k, _ in answer] == [b"1", b"2", b"E", b"Z"]
    assert b"C08P01\0" in answer[2][1] and b"2 result formats but query has 3 columns" in answer[2][1]
    raw.close()


# transactions and errors


def test_transactions_commit_and_roll_back(bridge, gw, tokens, pg):
    with connect(gw, tokens["writer"]) as c:
        c.execute("INSERT INTO users (name) VALUES ('tx-rolled-back')")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        c.rollback()
        c.execute("INSERT INTO users (name) VALUES ('tx-committed')")
        c.commit()
    with pg.connect("shop") as direct:
        names = [r[0] for r in direct.execute("SELECT name FROM users WHERE name LIKE 'tx-%'").fetchall()]
    assert names == ["tx-committed"]


def test_an_error_mid_transaction_aborts_it_like_a_real_server(bridge, gw, tokens):
    with connect(gw, tokens["writer"]) as c:
        c.execute("UPDATE users SET score = score WHERE id = 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("SELECT 1 / 0")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.rollback()
        assert c.execute("SELECT 2").fetchone() == (2,)


def test_server_errors_keep_their_sqlstate_and_fields(bridge, gw, tokens):
    with connect(gw, tokens["writer"], autocommit=True) as c:
        with pytest.raises(psycopg.errors.UndefinedTable) as e:
            c.execute("SELECT * FROM nope")
        assert e.value.diag.sqlstate == "42P01" and e.value.diag.statement_position == "15"
        with pytest.raises(psycopg.errors.UniqueViolation) as e:
            c.execute("INSERT INTO users (id, name) VALUES (1, 'dup')")
        assert e.value.diag.constraint_name == "users_pkey" and e.value.diag.table_name == "users"


def test_psql_on_error_stop_and_multi_statement_strings(bridge, gw, tokens):
    done = psql(gw.bridge_port, tokens["writer"], "-c", "SELECT 1 AS one; SELECT 2 AS two")
    assert done.returncode == 0 and "one" in done.stdout and "two" in done.stdout
    done = psql(gw.bridge_port, tokens["writer"], stdin="BEGIN;\nSELECT 1/0;\nSELECT 'never';\n")
    assert done.returncode == 3 and "ERROR:  division by zero" in done.stderr and "never" not in done.stdout


def test_executemany_is_one_transaction_per_sync(bridge, gw, tokens, pg):
    with connect(gw, tokens["writer"], autocommit=True) as c:
        with c.cursor() as cur:
            cur.executemany("INSERT INTO users (name, score) VALUES (%s, %s)", [(f"many-{n}", n) for n in range(5)])
        with pytest.raises(psycopg.errors.UniqueViolation):
            with c.cursor() as cur:
                cur.executemany("INSERT INTO users (id, name) VALUES (%s, %s)", [(900001, "ok"), (1, "dup")])
    with pg.connect("shop") as direct:
        assert direct.execute("SELECT count(*) FROM users WHERE name LIKE 'many-%'").fetchone() == (5,)
        assert direct.execute("SELECT count(*) FROM users WHERE id = 900001").fetchone() == (0,)  # rolled back


def test_copy_is_refused_with_a_clear_error(bridge, gw, tokens):
    done = psql(gw.bridge_port, tokens["analyst"], "-c", r"\copy users TO STDOUT")
    assert done.returncode == 1
    assert "COPY FROM STDIN / TO STDOUT is not supported through the gateway" in done.stderr


# policy


@pytest.mark.parametrize(
    "who, sql, message, fragment",
    [
        ("analyst", "DROP TABLE users", "Schema changes (DDL) are not allowed for agents.", "DROP TABLE users"),
        ("analyst", "SELECT 1; DROP TABLE users",
         "statement 2 (DROP TABLE): Schema changes (DDL) are not allowed for agents.", "DROP TABLE users"),
        ("writer", "ALTER TABLE users ADD COLUMN pwned int", "Schema changes (DDL)", "pwned"),
        ("writer", "SELECT * INTO stolen FROM users", "Schema changes (DDL)", "stolen"),
        ("analyst", "DELETE FROM users WHERE id = 1", "no rule matches this request", "DELETE FROM users WHERE id = 1"),
        ("analyst", "WITH gone AS (DELETE FROM users WHERE id = 2 RETURNING *) SELECT * FROM gone",
         "no rule matches this request", "gone AS"),
        ("analyst", "PREPARE p2 AS DELETE FROM users WHERE id = 3", "no rule matches this request", "PREPARE p2"),
        ("analyst", "EXECUTE never_prepared", "no rule matches this request", "never_prepared"),
        ("analyst", "SELECT wipe()", "no rule matches this request", "SELECT wipe()"),
        ("analyst", "DO $$BEGIN DELETE FROM users; END$$", "no rule matches this request", "DO $$"),
        ("writer", "SET ROLE custody_admin", "Role, privilege and server administration", "SET ROLE"),
        ("writer", "SET SESSION AUTHORIZATION custody_admin", "Role, privilege", "SESSION AUTHORIZATION"),
        ("writer", "SELECT set_config('role', 'custody_admin', false)", "Role, privilege", "set_config"),
        ("writer", "COPY users TO PROGRAM 'cat > /tmp/stolen'", "Role, privilege", "PROGRAM"),
        ("writer", "ALTER SYSTEM SET log_statement = 'none'", "Role, privilege", "ALTER SYSTEM"),
        ("writer", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity", "Role, privilege", "pg_terminate"),
        ("writer", "GRANT ALL ON users TO PUBLIC", "Role, privilege", "GRANT ALL ON users"),
        ("analyst", "SELEC * FROM users", "no rule matches this request", "SELEC *"),
        ("stranger", "SELECT 1", None, None),
    ],
)
def test_refused_statements_never_reach_the_database(bridge, gw, tokens, pg, who, sql, message, fragment):
    if who == "stranger":  # no rule lets this principal even open a session
        done = psql(gw.bridge_port, tokens[who], "-c", sql)
        assert done.returncode == 2 and "FATAL:  custody: no rule matches this request" in done.stderr
        return
    with connect(gw, tokens[who], autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute(sql)
        assert e.value.diag.message_primary == f"custody: {message}" or message in e.value.diag.message_primary
        assert "audit event:" in e.value.diag.message_detail
        assert c.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    assert not reached(pg, fragment)


def test_execute_is_decided_on_what_was_prepared(bridge, gw, tokens, pg):
    with connect(gw, tokens["analyst"], autocommit=True) as c:
        c.execute("PREPARE counted AS SELECT count(*) FROM users")
        assert c.execute("EXECUTE counted").fetchone()[0] >= 300
    dba = Approver(gw.approvals_url, tokens["dba"])
    agent = Agent(gw, tokens["writer"], "PREPARE wipe_all AS DELETE FROM notes", "EXECUTE wipe_all")
    held = wait_for(lambda: [a for a in dba.list() if "wipe_all" in a["operation"]["details"].get("sql", "")])[0]
    details = held["operation"]["details"]
    assert (details["command"], details["executes"], details["where"]) == ("EXECUTE", "DELETE", False)
    assert "pg-unfiltered-writes-reviewed" in held["rules"]
    dba.vote(held["id"], "deny", "no")
    agent.join(30)
    assert agent.error is not None and agent.error.diag.sqlstate == "42501"
    assert not reached(pg, "EXECUTE wipe_all")


def test_large_writes_wait_for_a_dba_and_run_once_approved(bridge, gw, tokens, pg):
    dba = Approver(gw.approvals_url, tokens["dba"])
    agent = Agent(gw, tokens["writer"], "UPDATE users SET score = score + 1000 WHERE id <= 200")
    pending = wait_for(lambda: [a for a in dba.list() if "UPDATE" in a["operation"]["summary"]])
    approval = pending[0]
    assert approval["rules"] == ["pg-large-writes-reviewed"]
    assert approval["operation"]["details"]["rows"] >= 150  # the planner's estimate
    assert not reached(pg, "score + 1000")  # nothing runs before the approval
    assert agent.is_alive()  # the client just sees a statement running
    assert dba.vote(approval["id"], "approve", "batch fix").status_code == 200
    agent.join(30)
    assert agent.rowcount == 200 and reached(pg, "score + 1000")
    decided = dba.show(approval["id"])
    assert decided["state"] == "executed" and decided["votes"][0]["approver"] == "dba-1"


def test_a_denied_write_names_the_approval(bridge, gw, tokens, pg):
    dba = Approver(gw.approvals_url, tokens["dba"])
    agent = Agent(gw, tokens["writer"], "DELETE FROM users WHERE id > 100")
    approval = wait_for(lambda: [a for a in dba.list() if "DELETE" in a["operation"]["summary"]])[0]
    dba.vote(approval["id"], "deny", "too broad")
    agent.join(30)
    assert agent.error is not None and agent.error.diag.sqlstate == "42501"
    assert f"approval: {approval['id']}" in agent.error.diag.message_detail
    assert not reached(pg, "DELETE FROM users WHERE id > 100")


# cancel


def test_cancel_stops_a_running_statement(bridge, gw, tokens):
    with connect(gw, tokens["analyst"], autocommit=True) as c:
        timer = threading.Timer(1.0, c.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("SELECT count(*) FROM generate_series(1, 3000000000)")
        assert time.monotonic() - started < 20
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_cancel_abandons_a_statement_waiting_for_approval(bridge, gw, tokens, pg):
    with connect(gw, tokens["writer"], autocommit=True) as c:
        threading.Timer(1.5, c.cancel).start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("UPDATE users SET score = 0 WHERE id > 50")
    assert not reached(pg, "SET score = 0 WHERE id > 50")


# identity and credentials


@pytest.mark.parametrize(
    "password, message",
    [
        ("not-a-jwt", "custody: malformed token"),
        ("", "fe_sendauth: no password supplied"),
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "custody:"),
        # refused by pg_bridge itself: in the step's head it would end the line and write the rest
        ("eyJ.e30.c2ln\r\nX-Custody-Task: injected", "custody: malformed token"),
        ("eyJ.e30.c2ln\r\n\r\nPOST http://db.prod.internal/connect HTTP/1.1", "custody: malformed token"),
        ("eyJ\u00e9.e30.c2ln", "custody: malformed token"),
    ],
)
def test_bad_tokens_never_open_a_database_session(bridge, gw, pg, password, message):
    before = pg.log().count("connection authorized: user=app")
    done = psql(gw.bridge_port, password, "-c", "SELECT 1")
    assert done.returncode == 2 and message in done.stderr
    assert pg.log().count("connection authorized: user=app") == before


def test_an_expired_token_is_refused(bridge, gw, tokens):
    done = psql(gw.bridge_port, tokens["expired"], "-c", "SELECT 1")
    assert done.returncode == 2 and "FATAL:  custody:" in done.stderr and "expired" in done.stderr


def test_the_agent_never_learns_the_database_password(bridge, gw, tokens):
    outputs = []
    for sql in ("SHOW ALL", "SELECT * FROM pg_stat_activity", "SELECT current_user, session_user",
                "SELECT * FROM nope_" + "x" * 10):
        done = psql(gw.bridge_port, tokens["analyst"], "-c", sql)
        outputs.append(done.stdout + done.stderr)
    assert "app" in outputs[2]  # the gateway's role does the work...
    assert all(APP_PASSWORD not in o for o in outputs)  # ...but its password never shows
    assert APP_PASSWORD.encode() not in bridge.environ()  # the bridge never holds it either
    assert APP_PASSWORD.encode() not in gw.db.read_bytes()


def test_the_wrong_database_is_refused(bridge, gw, tokens):
    done = psql(gw.bridge_port, tokens["analyst"], "-c", "SELECT 1", database="postgres")
    assert done.returncode == 2 and 'database "postgres" does not exist' in done.stderr


def test_tls_when_the_client_asks(bridge, gw, tokens):
    done = psql(gw.bridge_port, tokens["analyst"], "-A", "-t", "-c", "SELECT 'over tls'", sslmode="require")
    assert done.returncode == 0 and done.stdout.strip() == "over tls", done.stderr


# audit


def test_statements_are_recorded_with_the_agent_and_masked(bridge, gw, tokens):
    marker = "audit-marker-71"
    done = psql(gw.bridge_port, tokens["analyst"], "-c", f"SELECT '{marker}' AS m, password FROM users WHERE id = 1")
    assert done.returncode == 0, done.stderr
    decision = gw.wait_events("kind = 'decision' AND operation LIKE ?", [f"%{marker}%"])[-1]
    assert decision["subject"] == "crew-analyst" and decision["protocol"] == "postgres"
    assert decision["connection"] == "prod-db" and decision["action"] == "read"
    assert decision["rules"] == '["pg-analysts-read"]'
    response = gw.wait_events("kind = 'response' AND flow = ?", [decision["flow"]])[-1]
    assert b"[REDACTED]" in response["body"] and b"pw-1" not in response["body"]
    assert b"pw-17" not in gw.db.read_bytes()  # stored bodies are the masked ones


# the wire protocol itself


class RawClient:
    """Speaks the protocol by hand, for what no client library sends on purpose."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        if token is not None:
            self.startup({"user": "agent", "database": "shop"})
            kind, body = self.read()
            assert (kind, body) == (b"R", struct.pack("!I", 3))
            self.send(b"p", token.encode() + b"\0")
            assert [k for k, _ in self.until(b"Z")][0] == b"R"

    def startup(self, params: dict[str, str], code: int = 196608) -> None:
        body = struct.pack("!I", code) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
        self.sock.sendall(struct.pack("!I", len(body) + 5) + body + b"\0")

    def packet(self, code: int) -> None:
        self.sock.sendall(struct.pack("!II", 8, code))

    def send(self, kind: bytes, body: bytes) -> None:
        self.sock.sendall(kind + struct.pack("!I", len(body) + 4) + body)

    def _fill(self, n: int) -> None:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk

    def byte(self) -> bytes:
        self._fill(1)
        out, self.buffer = self.buffer[:1], self.buffer[1:]
        return out

    def read(self) -> tuple[bytes, bytes]:
        self._fill(5)
        kind, length = self.buffer[:1], struct.unpack("!I", self.buffer[1:5])[0]
        self._fill(1 + length)
        body, self.buffer = self.buffer[5:1 + length], self.buffer[1 + length:]
        return kind, body

    def until(self, kind: bytes) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            out.append(self.read())
            if out[-1][0] == kind:
                return out

    def close(self) -> None:
        self.sock.close()


def test_gssapi_encryption_is_declined_and_the_client_may_go_on(bridge, gw):
    raw = RawClient(gw.bridge_port)
    raw.packet(80877104)
    assert raw.byte() == b"N"
    raw.startup({"user": "agent", "database": "shop"})
    assert raw.read() == (b"R", struct.pack("!I", 3))
    raw.close()


def test_a_newer_protocol_minor_is_negotiated_down(bridge, gw):
    raw = RawClient(gw.bridge_port)
    raw.startup({"user": "agent", "database": "shop", "_pq_.future": "1"}, code=196610)
    kind, body = raw.read()
    assert kind == b"v" and struct.unpack("!II", body[:8]) == (0, 1) and body[8:] == b"_pq_.future\0"
    assert raw.read() == (b"R", struct.pack("!I", 3))
    raw.close()


@pytest.mark.parametrize(
    "code, sqlstate, message",
    [(131072, b"08P01", b"unsupported frontend protocol 2.0"), (196608, b"3D000", b'database "" does not exist')],
)
def test_bad_startup_packets_get_a_fatal_error(bridge, gw, code, sqlstate, message):
    raw = RawClient(gw.bridge_port)
    raw.startup({}, code=code)
    kind, body = raw.read()
    assert kind == b"E" and b"C" + sqlstate + b"\0" in body and message in body
    raw.close()


def test_the_function_call_protocol_is_refused(bridge, gw, tokens):
    raw = RawClient(gw.bridge_port, tokens["analyst"])
    raw.send(b"F", struct.pack("!Ihhh", 1598, 0, 0, 0) + struct.pack("!h", 0))
    kind, body = raw.read()
    assert kind == b"E" and b"C0A000\0" in body and raw.read()[0] == b"Z"
    raw.close()


# what a careful attacker tries


def test_column_masks_follow_the_column_through_aliases_and_json(bridge, gw, tokens):
    with connect(gw, tokens["analyst"]) as c:
        assert c.execute("SELECT password AS p, name AS n FROM users WHERE id = 1").fetchone() == ("[REDACTED]", "user1")
        row = c.execute("SELECT row_to_json(u) FROM users u WHERE id = 1").fetchone()[0]
        assert row["password"] == "[REDACTED]" and row["email"] == "[EMAIL_ADDRESS]" and row["name"] == "user1"
        emails = c.execute("SELECT array_agg(email ORDER BY id) FROM users WHERE id < 3", binary=True).fetchone()[0]
        assert emails == ["[EMAIL_ADDRESS]", "[EMAIL_ADDRESS]"]  # binary asked, text sent: masked all the same
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as e:
            c.execute("SELECT password::int FROM users WHERE id = 1")
        assert "pw-1" not in str(e.value) and '"[REDACTED]"' in e.value.diag.message_primary


@pytest.mark.parametrize(
    "sql",
    ["SET standard_conforming_strings = off", "SET NAMES 'SJIS'", "SET search_path = public, pg_catalog",
     "SELECT pg_catalog.lo_create(0)", "COMMIT PREPARED 'someone-elses'"],
)
def test_settings_and_functions_that_would_change_what_runs_are_refused(bridge, gw, tokens, pg, sql):
    with connect(gw, tokens["writer"], autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(sql)
    assert not reached(pg, sql)


def test_startup_parameters_cannot_smuggle_settings(bridge, gw, tokens):
    raw = RawClient(gw.bridge_port)
    raw.startup({"user": "agent", "database": "shop", "DateStyle": "ISO\t-crole=custody_admin"})
    assert raw.read()[0] == b"R"
    raw.send(b"p", tokens["analyst"].encode() + b"\0")
    kind, body = raw.read()
    assert kind == b"E" and b"C22023\0" in body and b"control characters" in body
    raw.close()


def test_a_session_cannot_be_borrowed_by_another_principal(bridge, gw, tokens):
    import requests

    def post(token: str, phase: str, body: dict) -> dict:
        r = requests.post(f"http://db.prod.internal/{phase}", json=body, timeout=10,
                          headers={"pg-bridge-session": "shared-id-1", "proxy-authorization": f"Bearer {token}"},
                          proxies={"http": f"http://127.0.0.1:{gw.port}"})
        return r.json()

    assert post(tokens["analyst"], "connect", {"database": "shop"})["results"] == []
    mine = post(tokens["analyst"], "execute", {"sql": "SELECT 41 + 1"})
    assert mine["results"][0]["rows"] == [["42"]]
    taken = post(tokens["writer"], "connect", {"database": "shop"})
    assert taken["results"][0]["error"]["C"] == "08P01"
    borrowed = post(tokens["writer"], "execute", {"sql": "SELECT 1"})
    assert borrowed["results"][0]["error"]["C"] == "08003"
    assert post(tokens["analyst"], "execute", {"sql": "SELECT 2"})["results"][0]["rows"] == [["2"]]
    post(tokens["analyst"], "close", {})


# losing the database


@pytest.mark.parametrize(
    "step",
    [
        lambda c: c.execute("SELECT 1"),  # simple protocol
        lambda c: c.execute("SELECT %s::int", (1,)),  # extended, unnamed statement
        lambda c: c.execute("SELECT %s::int", (1,), prepare=True),  # a prepared statement is described first
        lambda c: c.execute("UPDATE users SET score = score WHERE id = %s", (1,)),  # planned before it runs
    ],
    ids=["simple", "extended", "prepared", "planned-write"],
)
def test_a_database_connection_that_goes_away_ends_the_session_with_08006(bridge, gw, tokens, pg, step):
    with connect(gw, tokens["writer"], autocommit=True) as c:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        with pg.connect("shop") as direct:
            assert direct.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError) as e:
            step(c)
        assert e.value.sqlstate == "08006" and "database connection failed" in str(e.value)
        assert c.closed  # the bridge ended the connection, as a server that went away does
    with connect(gw, tokens["writer"], autocommit=True) as c:  # the next session gets a new connection
        assert c.execute("SELECT 1").fetchone() == (1,)


# read-only mode, other sessions' activity: what an agent must not get round


ADMINISTRATION = "custody: Role, privilege and server administration statements are not allowed for agents."


@pytest.mark.parametrize("sql", READ_WRITE_MODE)
def test_read_only_mode_cannot_be_turned_off(bridge, gw, tokens, pg, sql):
    with connect(gw, tokens["writer"], autocommit=True) as c:
        c.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")  # narrowing it is allowed
        c.execute("BEGIN READ ONLY")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute(sql)
        assert e.value.diag.message_primary.endswith(ADMINISTRATION.removeprefix("custody: "))
        assert c.execute("SHOW transaction_read_only").fetchone() == ("on",)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):  # the real server still refuses writes
            c.execute("INSERT INTO users (name) VALUES ('read-only-mode-broken')")
        c.execute("ROLLBACK")
        assert c.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            c.execute("INSERT INTO users (name) VALUES ('read-only-mode-broken')")
    assert not reached(pg, sql)


@pytest.mark.parametrize("sql", SERVER_ACTIVITY)
def test_one_agent_cannot_read_another_agents_statements(bridge, gw, tokens, pg, sql):
    secret = "other-agents-literal-5b1f"
    with connect(gw, tokens["writer"], autocommit=True) as other:  # another agent, mid-statement
        other.execute(f"SELECT '{secret}'")
        with connect(gw, tokens["analyst"], autocommit=True) as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                c.execute(sql)
            assert e.value.diag.message_primary == ADMINISTRATION
            assert secret not in str(e.value)
    assert not reached(pg, sql)


@pytest.mark.parametrize("sql", ["NOTIFY orders", "NOTIFY orders, 'shipped'", "SELECT pg_notify('orders', 'x')"])
def test_notify_is_refused_as_what_it_is(bridge, gw, tokens, pg, sql):
    with connect(gw, tokens["writer"], autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            c.execute(sql)
        assert e.value.diag.message_primary == ADMINISTRATION
    assert not reached(pg, sql)


def test_listen_is_refused_clearly(bridge, gw, tokens, pg):
    with connect(gw, tokens["analyst"], autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="LISTEN is not supported through the gateway"):
            c.execute("LISTEN orders")
        c.execute("UNLISTEN *")
    assert not reached(pg, "LISTEN orders")


# a statement policy denies leaves nothing on the server


def held_locks(pg: PostgresServer, pid: int) -> list[tuple]:
    """What the backend `pid` holds on the test's tables, and its transaction id, read from
    another connection (pg_locks, pg_stat_activity)."""
    with pg.connect("shop") as direct:
        locks = direct.execute("SELECT c.relname, l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                               "WHERE l.pid = %s AND c.relname IN ('users', 'notes') ORDER BY 1, 2",
                               (pid,)).fetchall()
        xid = direct.execute("SELECT backend_xid FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]
    return locks + ([("xid", str(xid))] if xid is not None else [])


def mentioned(pg: PostgresServer, fragment: str) -> bool:
    """Did the server see `fragment` at all, even only to plan or parse it?"""
    return any(fragment in line for line in pg.log().splitlines())


DENIED_IN_A_TRANSACTION = [
    ("analyst", "DELETE FROM users WHERE id = 11", False),
    ("analyst", "UPDATE users SET score = 0 WHERE id = 12", False),
    ("analyst", "INSERT INTO users (name) VALUES ('locked-13')", False),
    ("analyst", "SELECT * FROM users WHERE id = 14 FOR UPDATE", False),
    ("analyst", "SELECT * FROM users WHERE id = 15 FOR SHARE", False),
    ("analyst", "SELECT id FROM users WHERE id = 16 FOR NO KEY UPDATE SKIP LOCKED", False),
    ("analyst", "MERGE INTO users u USING notes n ON u.id = n.id + 17 WHEN MATCHED THEN UPDATE SET score = 0", False),
    ("analyst", "WITH gone AS (DELETE FROM users WHERE id = 18 RETURNING *) SELECT * FROM gone", False),
    ("analyst", "INSERT INTO users (id, name) VALUES (19, 'x') ON CONFLICT (id) DO UPDATE SET name = 'locked-19'",
     False),
    ("analyst", "LOCK TABLE users IN ACCESS EXCLUSIVE MODE NOWAIT", False),
    ("analyst", "TRUNCATE notes", False),
    ("analyst", "DELETE FROM users WHERE id = 20 AND name = 'prepared-20'", True),  # described, then denied
    ("analyst", "UPDATE notes SET body = 'prepared-21' WHERE id = 21", True),
    ("writer", "UPDATE users SET score = 22 WHERE id = 22; DROP TABLE notes", False),  # a deny rule: no EXPLAIN
    ("writer", "DELETE FROM users WHERE id = (SELECT wipe()) + 23", False),  # exec: no rule allows it
    ("writer", "UPDATE users SET name = set_config('role', 'x', false) WHERE id = 24", False),
]


@pytest.mark.parametrize("who, sql, prepared", DENIED_IN_A_TRANSACTION)
def test_a_denied_statement_takes_no_lock_and_starts_no_work(bridge, gw, tokens, pg, who, sql, prepared):
    with connect(gw, tokens[who]) as c:  # psycopg opens a transaction for the first statement
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(sql, prepare=prepared)
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS  # refused, not failed
        assert held_locks(pg, pid) == []
        c.rollback()
    if not prepared and who == "analyst":  # no rule could let it run: not even planned
        assert not mentioned(pg, sql)
    assert not reached(pg, sql)


def test_a_write_held_for_review_holds_no_lock_while_it_waits(bridge, gw, tokens, pg):
    dba = Approver(gw.approvals_url, tokens["dba"])
    with connect(gw, tokens["writer"], autocommit=True) as c:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        c.execute("BEGIN")
        c.execute("UPDATE users SET score = score WHERE id = 1")  # the transaction holds this row...
        before = held_locks(pg, pid)
        agent = threading.Thread(target=lambda: pytest.raises(psycopg.errors.InsufficientPrivilege, c.execute,
                                                               "DELETE FROM notes WHERE id > 0"), daemon=True)
        agent.start()
        approval = wait_for(lambda: [a for a in dba.list() if "DELETE FROM notes WHERE id > 0"
                                     in a["operation"]["details"].get("sql", "")])[0]
        assert approval["operation"]["details"]["rows"] is not None  # it was planned, to be judged
        assert held_locks(pg, pid) == before  # ...and nothing more while the DELETE waits
        dba.vote(approval["id"], "deny", "no")
        agent.join(30)
        assert held_locks(pg, pid) == before
        c.execute("ROLLBACK")
    assert not reached(pg, "DELETE FROM notes WHERE id > 0")


# the SQL text on record


def on_disk(gw: Gateway) -> bytes:
    """Everything the audit store wrote: the database and its write-ahead log."""
    return b"".join(p.read_bytes() for p in gw.db.parent.glob(gw.db.name + "*"))


def aws_key(n: int) -> str:
    return f"AKIA{n:04d}EXAMPLEQ7ZPX"


def github_token(n: int) -> str:
    return f"ghp_{n:04d}R8vQ2mZ7xK1pL9sT4wY6nB3cF5hJ0dA2"


SECRET_STATEMENTS = [  # (who, statement, its parameters, the literal secret in them)
    ("analyst", f"SELECT '{aws_key(1)}' AS k", (), aws_key(1)),
    ("analyst", f"SELECT count(*) FROM users WHERE name = '{github_token(2)}'", (), github_token(2)),
    ("analyst", f"SELECT $${aws_key(3)}$$", (), aws_key(3)),
    ("analyst", f"SELECT $tag${github_token(4)}$tag$", (), github_token(4)),
    ("analyst", f"SELECT E'key\\t{aws_key(5)}'", (), aws_key(5)),
    ("analyst", f"SELECT 1 -- {github_token(6)}", (), github_token(6)),
    ("analyst", f"/* {aws_key(7)} */ SELECT 2", (), aws_key(7)),
    ("analyst", "SELECT 'postgres://app:Sup3r-s3cret-8@db.internal/shop'", (), "Sup3r-s3cret-8"),
    ("analyst", f"SELECT 1; SELECT '{github_token(9)}'", (), github_token(9)),
    ("analyst", f"SELECT upper('{aws_key(10)}') = %s", ("x",), aws_key(10)),
    ("analyst", "SELECT %s::text AS eleven", (github_token(11),), github_token(11)),  # a parameter
    ("analyst", f"PREPARE leak12 AS SELECT '{aws_key(12)}' AS twelve", (), aws_key(12)),
    ("writer", f"UPDATE users SET name = '{github_token(13)}' WHERE id = 13", (), github_token(13)),
    ("writer", f"INSERT INTO notes (id, body) VALUES (1300 + 14, 'token: {aws_key(14)}')", (), aws_key(14)),
    # values of masked columns (secret-keys: password, *token*, …), found by what they are assigned to
    ("writer", "UPDATE users SET password = 'plain-pw-16' WHERE id = 16", (), "plain-pw-16"),
    ("writer", "INSERT INTO users (name, password) VALUES ('u17', 'plain-pw-17')", (), "plain-pw-17"),
    ("writer", "UPDATE users SET password = %s WHERE id = 18", ("plain-pw-18",), "plain-pw-18"),
    ("writer", "INSERT INTO users (name, password) VALUES (%s, %s)", ("u19", "plain-pw-19"), "plain-pw-19"),
    ("analyst", "SELECT count(*) FROM users WHERE password = 'plain-pw-20'", (), "plain-pw-20"),
    ("analyst", "SELECT count(*) FROM users u WHERE 'plain-pw-21' = u.password", (), "plain-pw-21"),
    ("analyst", "SELECT count(*) FROM users u WHERE password IN ('plain-pw-22', 'x')", (), "plain-pw-22"),
    ("analyst", "SELECT 'plain-pw-23'::text AS api_token", (), "plain-pw-23"),
]


@pytest.mark.parametrize("who, sql, params, secret", SECRET_STATEMENTS)
def test_a_literal_secret_in_a_statement_never_reaches_the_audit_store(bridge, gw, tokens, who, sql, params, secret):
    with connect(gw, tokens[who], autocommit=True) as c:
        c.execute(sql, params or None)
    subject = {"analyst": "crew-analyst", "writer": "crew-writer"}[who]
    decision = gw.wait_events("kind = 'decision' AND subject = ? AND operation LIKE '%\"phase\":\"execute\"%'",
                              [subject])[-1]  # recorded before it ran
    assert decision["effect"] == "allow" and "[" in decision["operation"]  # on record, masked
    assert secret.encode() not in on_disk(gw)


def test_an_approval_shows_the_statement_masked(bridge, gw, tokens, pg):
    secret = github_token(15)
    dba = Approver(gw.approvals_url, tokens["dba"])
    agent = Agent(gw, tokens["writer"], f"UPDATE users SET name = '{secret}' WHERE id > 100")
    approval = wait_for(lambda: [a for a in dba.list() if "GITHUB_TOKEN" in a["operation"]["details"].get("sql", "")])[0]
    assert approval["operation"]["details"]["sql"] == "UPDATE users SET name = '[GITHUB_TOKEN]' WHERE id > 100"
    assert secret not in str(approval)
    dba.vote(approval["id"], "deny", "no")
    agent.join(30)
    assert secret.encode() not in on_disk(gw)
    assert not reached(pg, secret)


# a masked column's value, however it reaches the result


MASKED_ANOTHER_WAY = [
    "SELECT u FROM users u WHERE id = 1",  # a whole row
    "SELECT users FROM users WHERE id = 1",
    "SELECT u::text FROM users u WHERE id = 1",
    "SELECT format('%s', u) FROM users u WHERE id = 1",
    "SELECT (SELECT u FROM users u WHERE id = 1)",
    "SELECT json_agg(u) FROM users u WHERE id < 3",  # rows as JSON objects: the key is masked
    "SELECT to_jsonb(u) - 'email' FROM users u WHERE id = 1",
    "SELECT jsonb_build_object('p', password) FROM users WHERE id = 1",
    "SELECT array_agg(password) FROM users WHERE id < 3",  # aggregates and array constructors
    "SELECT ARRAY[password, name] FROM users WHERE id = 1",
    "SELECT ARRAY(SELECT password FROM users WHERE id < 3)",
    "SELECT string_agg(password, ',') FROM users WHERE id < 3",
    "SELECT max(password) FROM users",
    "SELECT lower(password) FROM users WHERE id = 1",  # any expression
    "SELECT password || '' AS x FROM users WHERE id = 1",
    "SELECT coalesce(password, 'x') FROM users WHERE id = 1",
    "SELECT CASE WHEN id = 1 THEN password END FROM users WHERE id = 1",
    "SELECT translate(password, 'xyz', 'XYZ') FROM users WHERE id = 1",
    "SELECT ROW(password, 1) FROM users WHERE id = 1",
    "SELECT (SELECT password FROM users WHERE id = 1)",  # subqueries, CTEs, functions in FROM
    "SELECT p FROM (SELECT password || '!' AS p FROM users WHERE id = 1) s",
    "SELECT s.x FROM (SELECT ARRAY[password] FROM users WHERE id = 1) s(x)",
    "WITH c AS (SELECT concat(password) AS p FROM users WHERE id = 1) SELECT lower(p) FROM c",
    "SELECT x FROM users, unnest(ARRAY[password]) AS x WHERE id = 1",
    "SELECT value FROM users u, json_each_text(row_to_json(u)) WHERE id = 1 AND key = 'password'",
    "SELECT lower(d) FROM users AS u(a, b, c, d) WHERE a = 1",  # columns renamed by position
    "SELECT name FROM users WHERE id = 2 UNION ALL SELECT password FROM users WHERE id = 1",
    "VALUES ((SELECT password FROM users WHERE id = 1))",
    "UPDATE users SET score = score WHERE id = 1 RETURNING lower(password)",
]


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@pytest.mark.parametrize("sql", MASKED_ANOTHER_WAY)
def test_a_masked_column_stays_masked_however_it_reaches_the_result(bridge, gw, tokens, pg, sql, binary):
    who = "writer" if sql.startswith("UPDATE") else "analyst"
    with pg.connect("shop") as direct:
        clear = direct.execute(sql).fetchall()
    assert "pw-" in str(clear)  # the query does read a password
    with connect(gw, tokens[who], autocommit=True) as c:
        rows = c.execute(sql, binary=binary).fetchall()
    assert "pw-" not in str(rows) and "REDACTED]" in str(rows)
    assert len(rows) == len(clear)


@pytest.mark.parametrize(
    "sql, masked",
    [
        ("SELECT row_to_json(u) FROM users u WHERE id = 299",
         [({"id": 299, "name": "user299", "email": "[EMAIL_ADDRESS]", "password": "[REDACTED]", "score": 299},)]),
        ("SELECT (u).password, (u).name FROM users u WHERE id = 299", [("[REDACTED]", "user299")]),
        ("SELECT * FROM (SELECT name, password AS p FROM users WHERE id = 299) s", [("user299", "[REDACTED]")]),
        ("SELECT count(*), max(name), lower(max(name)) FROM users WHERE id = 299", [(1, "user299", "user299")]),
    ],
)
def test_what_is_not_computed_from_a_masked_column_stays_readable(bridge, gw, tokens, sql, masked):
    with connect(gw, tokens["analyst"], autocommit=True) as c:
        assert c.execute(sql).fetchall() == masked


def test_rows_of_a_cursor_and_a_prepared_statement_are_masked_as_what_they_run(bridge, gw, tokens):
    with connect(gw, tokens["analyst"]) as c:
        c.execute("DECLARE leak CURSOR FOR SELECT password AS p, lower(password) AS l, name FROM users ORDER BY id")
        assert c.execute("FETCH 2 FROM leak").fetchall() == [("[REDACTED]", "[REDACTED]", "user1"),
                                                              ("[REDACTED]", "[REDACTED]", "user2")]
        c.execute("CLOSE leak")
        c.execute("PREPARE peek AS SELECT lower(password), name FROM users WHERE id = $1")
        assert c.execute("EXECUTE peek(3)").fetchall() == [("[REDACTED]", "user3")]
        with c.cursor("walk") as cur:  # psycopg's server-side cursor: DECLARE, then FETCH FORWARD
            cur.execute("SELECT id, password || '' FROM users WHERE id < 4 ORDER BY id")
            assert cur.fetchall() == [(1, "[REDACTED]"), (2, "[REDACTED]"), (3, "[REDACTED]")]
