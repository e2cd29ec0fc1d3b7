"""SQL classification: what a PostgreSQL statement does, in the Operation vocabulary.

Statements are parsed with pglast, which is PostgreSQL's own parser (libpg_query), so a
comment, a quoted `'DROP …'` or a `$$` body is what the server would take it for, never a
keyword match. Each statement gets pgAudit's classes (READ, WRITE, FUNCTION, ROLE, DDL,
MISC, MISC_SET), the tables it names, the functions it calls, whether an UPDATE or DELETE
has a WHERE, and an action:

    read    SELECT, SHOW, EXPLAIN (without ANALYZE), transaction control, COPY … TO STDOUT
    write   INSERT, UPDATE, MERGE, writable CTEs, SELECT … FOR UPDATE (row locks), LOCK,
            nextval/setval, COPY … FROM STDIN
    delete  DELETE, TRUNCATE
    ddl     CREATE / ALTER / DROP / …, SELECT INTO, CREATE TABLE AS
    exec    DO blocks, CALL, and calls of functions that are not known built-ins (a
            user-defined function can do anything its owner can)
    admin   roles and grants, SET ROLE / SESSION AUTHORIZATION, ALTER SYSTEM, COPY to or
            from a server file or PROGRAM, dangerous built-ins (pg_terminate_backend,
            lo_import, pg_read_file, dblink, …), NOTIFY, VACUUM and friends; changes of the
            settings that decide how SQL is read or whether writes may run (settings.py),
            in whichever spelling (SET, SET TRANSACTION, BEGIN READ WRITE, set_config);
            reading other sessions' activity (pg_stat_activity, pg_locks, pg_stat_statements, …)
    unknown anything that does not parse, and `EXECUTE name` until the session says what
            `name` was prepared as (pg_bridge/terminal/planner.py)

A string of several statements is one Operation whose `parts` are the statements: policy
decides each part and the strictest decision wins.

Beside this module: settings.py (which run-time settings a statement changes, whatever
its spelling) and lineage.py (which table columns each result column is computed from,
for the masks).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from typing import Any

import pglast
from pglast import ast
from pglast.visitors import Visitor

from addons.classifiers.http import parse_json_body
from addons.classifiers.postgres import settings
from addons.engine.bridge import POSTGRES
from addons.engine.model import Operation, Request

READ, WRITE, DELETE, DDL, EXEC, ADMIN, UNKNOWN = "read", "write", "delete", "ddl", "exec", "admin", "unknown"
RISK = {READ: 10, WRITE: 40, DELETE: 60, DDL: 80, EXEC: 80, ADMIN: 90, UNKNOWN: 100}
ORDER = (READ, WRITE, DELETE, EXEC, DDL, ADMIN, UNKNOWN)

DANGEROUS_FUNCTIONS = frozenset({
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_promote",
    "pg_switch_wal", "pg_create_restore_point", "pg_backup_start", "pg_backup_stop", "pg_log_backend_memory_contexts",
    "lo_import", "lo_export", "lo_unlink", "lo_from_bytea", "lo_put",
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "pg_ls_logdir", "pg_ls_waldir",
    "pg_ls_tmpdir", "pg_ls_archive_statusdir", "pg_file_write", "pg_file_rename", "pg_file_unlink",
    "pg_sleep", "pg_sleep_for", "pg_sleep_until",
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml",
    "pg_logical_emit_message", "pg_replication_origin_create", "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot", "pg_drop_replication_slot", "pg_advisory_lock", "pg_advisory_xact_lock",
})
DANGEROUS_PREFIXES = ("dblink", "lo_", "pg_advisory", "pg_try_advisory", "pg_replication_", "pg_logical_",
                      "pg_create_", "pg_drop_", "pg_notify", "pg_stat_reset", "pg_read_", "pg_ls_", "pg_file_",
                      "pg_import_system_collations", "pg_wal_replay_", "pg_xact_commit", "pg_export_snapshot")
WRITING_FUNCTIONS = frozenset({"nextval", "setval"})
HOUSEKEEPING_FUNCTIONS = frozenset({"pg_advisory_unlock", "pg_advisory_unlock_shared", "pg_advisory_unlock_all"})
"""Functions that only undo what the session itself did (release its own advisory locks):
what drivers and pools run when they hand a connection back (asyncpg's reset query)."""
SET_CONFIG = "set_config"
"""Judged by the setting it changes (settings.py), like SET."""
ACTIVITY_RELATIONS = frozenset({
    "pg_stat_activity", "pg_locks", "pg_stat_statements", "pg_stat_statements_info", "pg_prepared_xacts",
    "pg_stat_replication", "pg_stat_wal_receiver", "pg_stat_subscription", "pg_stat_ssl", "pg_stat_gssapi",
    "pg_replication_slots", "pg_stat_replication_slots", "pg_stat_monitor", "pg_stat_kcache",
    "pg_wait_sampling_current", "pg_wait_sampling_history", "pg_wait_sampling_profile",
})
ACTIVITY_FUNCTIONS = frozenset({
    "pg_stat_get_activity", "pg_lock_status", "pg_blocking_pids", "pg_safe_snapshot_blocking_pids",
    "pg_isolation_test_session_is_blocked", "pg_stat_statements", "pg_stat_statements_info",
    "pg_stat_get_wal_senders", "pg_stat_get_wal_receiver", "pg_stat_get_subscription", "pg_prepared_xact",
    "pg_get_replication_slots", "pg_stat_get_progress_info", "pg_stat_monitor_internal",
})
ACTIVITY_PREFIXES = ("pg_stat_progress_", "pg_stat_get_backend_")
"""The server's views of other sessions: their statements' text (pg_stat_activity.query,
pg_stat_statements.query), what they lock and wait for, their prepared transactions. Every
agent works through the gateway's one database role, so these would show one agent
another's statements, literals included: reading them is administration (any schema: an
extension's views live where it was installed)."""
BUILTIN_FUNCTIONS = frozenset("""
    count sum avg min max array_agg string_agg json_agg jsonb_agg json_object_agg jsonb_object_agg bool_and bool_or
    every bit_and bit_or stddev variance percentile_cont percentile_disc mode rank dense_rank row_number ntile lag
    lead first_value last_value nth_value cume_dist percent_rank
    lower upper length char_length octet_length substr substring trim btrim ltrim rtrim replace concat concat_ws
    format left right lpad rpad position strpos split_part regexp_replace regexp_match regexp_matches
    regexp_split_to_array regexp_split_to_table starts_with md5 sha256 encode decode initcap reverse repeat
    translate to_char to_number to_date to_timestamp quote_ident quote_literal quote_nullable
    abs ceil ceiling floor round trunc mod power sqrt exp ln log greatest least random sign div width_bucket
    now current_date current_time current_timestamp localtime localtimestamp clock_timestamp statement_timestamp
    transaction_timestamp timeofday date_trunc date_part extract age make_date make_interval make_timestamp
    make_timestamptz justify_days justify_hours justify_interval date_bin isfinite
    coalesce nullif cast generate_series generate_subscripts unnest array_length array_position array_positions
    array_to_string string_to_array array_append array_prepend array_cat array_remove array_replace array_dims
    array_lower array_upper cardinality
    json_build_object jsonb_build_object json_build_array jsonb_build_array to_json to_jsonb row_to_json
    json_array_length jsonb_array_length json_extract_path jsonb_extract_path json_extract_path_text
    jsonb_extract_path_text jsonb_set jsonb_insert jsonb_pretty json_typeof jsonb_typeof jsonb_path_query
    jsonb_path_exists json_each jsonb_each json_each_text jsonb_each_text json_object_keys jsonb_object_keys
    jsonb_strip_nulls json_array_elements jsonb_array_elements json_array_elements_text jsonb_array_elements_text
    version current_schema current_schemas current_user current_database current_catalog session_user user
    current_setting pg_backend_pid inet_client_addr txid_current pg_current_xact_id pg_typeof format_type
    pg_table_is_visible pg_get_expr pg_get_constraintdef pg_get_indexdef pg_get_viewdef pg_get_userbyid
    pg_get_triggerdef pg_get_functiondef pg_get_function_arguments pg_get_function_result pg_get_serial_sequence
    pg_encoding_to_char pg_relation_size pg_total_relation_size pg_table_size pg_indexes_size pg_size_pretty
    pg_database_size pg_column_size obj_description col_description shobj_description has_table_privilege
    has_schema_privilege has_database_privilege has_column_privilege pg_has_role to_regclass to_regtype
    gen_random_uuid uuid_generate_v4 exists any all array row int4 int8 text numeric bool
    pg_relation_is_publishable pg_tablespace_location pg_describe_object pg_identify_object pg_char_to_encoding
    pg_relation_filenode pg_indexam_has_property pg_index_column_has_property pg_column_is_updatable
    pg_relation_is_updatable pg_sequence_parameters pg_options_to_table array_remove textlen regexp_like
    pg_partition_root pg_partition_tree pg_partition_ancestors pg_get_keywords pg_backend_memory_contexts
    pg_total_relation_size pg_collation_for pg_postmaster_start_time pg_conf_load_time pg_is_in_recovery
    inet_server_addr inet_server_port current_query pg_jit_available pg_stat_get_numscans pg_size_bytes
    string_to_table to_regproc to_regprocedure to_regnamespace to_regrole to_regoper array_fill
""".split())


def _name(func: ast.FuncCall) -> tuple[str, str]:
    """(schema, name) of a called function, as the server resolves them."""
    parts = [n.sval for n in func.funcname if isinstance(n, ast.String)]  # unquoted: folded by the parser
    return (parts[-2] if len(parts) > 1 else "", parts[-1] if parts else "")


class _Walk(Visitor):
    """Collects tables, functions, data-modifying statements and row locks in a tree."""

    def __init__(self) -> None:
        self.tables: set[str] = set()
        self.ctes: set[str] = set()
        self.functions: set[str] = set()
        self.modifies: list[ast.Node] = []
        self.locks = False
        self.set_config: list[settings.Change] = []

    def visit_CommonTableExpr(self, ancestors, node) -> None:
        self.ctes.add(node.ctename.lower())

    def visit_RangeVar(self, ancestors, node) -> None:
        name = node.relname.lower()
        self.tables.add(f"{node.schemaname.lower()}.{name}" if node.schemaname else name)

    def visit_FuncCall(self, ancestors, node) -> None:
        schema, name = _name(node)
        self.functions.add(f"{schema}.{name}" if schema else name)
        if name == SET_CONFIG and schema in ("", "pg_catalog"):
            self.set_config.append(settings.set_config(node))

    def visit_InsertStmt(self, ancestors, node) -> None:
        self.modifies.append(node)

    visit_UpdateStmt = visit_DeleteStmt = visit_MergeStmt = visit_InsertStmt

    def visit_SelectStmt(self, ancestors, node) -> None:
        if node.lockingClause:
            self.locks = True


def function_action(qualified: str) -> str:
    """What calling a function may do: admin for dangerous built-ins (whatever schema they
    are named with), write for sequence changes, read for known harmless built-ins and the
    catalog's own introspection (pg_get_*, *_is_visible, has_*_privilege), else exec: a
    function nobody listed may write, and so may one in another schema."""
    schema, _, name = qualified.rpartition(".")
    if name in HOUSEKEEPING_FUNCTIONS and schema in ("", "pg_catalog"):
        return READ
    if name in DANGEROUS_FUNCTIONS or name.startswith(DANGEROUS_PREFIXES) or activity(name):
        return ADMIN
    if schema not in ("", "pg_catalog"):
        return EXEC
    if name in WRITING_FUNCTIONS:
        return WRITE
    if name in BUILTIN_FUNCTIONS or name.startswith(("pg_get_", "has_", "pg_has_")) or name.endswith("_is_visible"):
        return READ
    return EXEC


def activity(name: str) -> bool:
    """Is this relation or function one of the server's views of other sessions?"""
    name = name.rpartition(".")[2].lower()
    return name in ACTIVITY_RELATIONS or name in ACTIVITY_FUNCTIONS or name.startswith(ACTIVITY_PREFIXES)


def _riskier(*actions: str) -> str:
    return max(actions, key=ORDER.index)


ROLE_STATEMENTS = (ast.GrantStmt, ast.GrantRoleStmt, ast.CreateRoleStmt, ast.AlterRoleStmt, ast.DropRoleStmt,
                   ast.AlterRoleSetStmt, ast.AlterDefaultPrivilegesStmt, ast.ReassignOwnedStmt, ast.DropOwnedStmt,
                   ast.AlterPolicyStmt, ast.CreatePolicyStmt)
MAINTENANCE = (ast.VacuumStmt, ast.ClusterStmt, ast.ReindexStmt, ast.CheckPointStmt, ast.LoadStmt,
               ast.AlterSystemStmt, ast.CreatedbStmt, ast.DropdbStmt, ast.AlterDatabaseStmt,
               ast.AlterDatabaseSetStmt, ast.CreateTableSpaceStmt, ast.DropTableSpaceStmt,
               ast.CreateSubscriptionStmt, ast.AlterSubscriptionStmt, ast.CreatePublicationStmt)
MISC_READS = (ast.TransactionStmt, ast.VariableShowStmt, ast.DiscardStmt, ast.ListenStmt, ast.UnlistenStmt,
              ast.FetchStmt, ast.ClosePortalStmt, ast.DeallocateStmt)
SETTING_STATEMENTS = (ast.VariableSetStmt, ast.ConstraintsSetStmt)
TWO_PHASE = ("TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED")
PROTECTED_SETTINGS = settings.PROTECTED_SETTINGS


COMMANDS = {"VariableSet": "SET", "VariableShow": "SHOW", "Index": "CREATE INDEX", "Create": "CREATE TABLE",
            "View": "CREATE VIEW", "CreateTableAs": "CREATE TABLE AS", "Rename": "ALTER … RENAME", "Grant": "GRANT",
            "GrantRole": "GRANT ROLE", "Do": "DO", "Deallocate": "DEALLOCATE", "Createdb": "CREATE DATABASE",
            "Dropdb": "DROP DATABASE", "Define": "CREATE"}


def command_of(node: ast.Node) -> str:
    """The statement's command as PostgreSQL names it: `DROP TABLE`, `SET`, `BEGIN`."""
    name = type(node).__name__.removesuffix("Stmt")
    if isinstance(node, ast.TransactionStmt):
        kind = node.kind.name.removeprefix("TRANS_STMT_").replace("_", " ")
        return "PREPARE TRANSACTION" if kind == "PREPARE" else kind
    if isinstance(node, ast.DropStmt):
        return "DROP " + node.removeType.name.removeprefix("OBJECT_").replace("_", " ")
    if isinstance(node, ast.VariableSetStmt) and node.kind.name.startswith("VAR_RESET"):
        return "RESET"
    return COMMANDS.get(name) or re.sub(r"(?<!^)(?=[A-Z])", " ", name).upper()


def statement(node: ast.Node, text: str) -> dict[str, Any]:
    """One parsed statement's details: command, classes, action, tables, functions, where."""
    command = command_of(node)
    walk = _Walk()
    walk(node)
    tables = sorted(t for t in walk.tables if t not in walk.ctes)
    functions = sorted(walk.functions)
    classes: set[str] = set()
    action = READ
    out: dict[str, Any] = {"sql": text, "command": command}
    changed = settings.changes(node)
    if isinstance(node, ast.ExplainStmt):
        analyze = any(o.defname == "analyze" and (o.arg is None or getattr(o.arg, "boolval", True))
                      for o in node.options or ())
        inner = statement(node.query, text)
        if analyze:  # EXPLAIN ANALYZE runs the statement
            return {**inner, "sql": text, "command": "EXPLAIN ANALYZE", "explains": inner["command"]}
        return {**out, "classes": ["READ"], "action": READ, "tables": inner["tables"], "functions": [],
                "explains": inner["command"]}
    if isinstance(node, ast.DeclareCursorStmt):
        inner = statement(node.query, text)
        return {**inner, "sql": text, "command": command, "declares": inner["command"], "name": node.portalname}
    if isinstance(node, ast.PrepareStmt):
        # classified as what it prepares (so it needs the same rights), but it runs nothing:
        # no WHERE to judge and no rows to estimate until EXECUTE, which is decided again
        inner = statement(node.query, text)
        outer = {k: v for k, v in inner.items() if k not in ("where", "sql", "command")}
        return {**outer, "sql": text, "command": command, "prepares": inner, "name": node.name}
    if isinstance(node, ast.ExecuteStmt):
        return {**out, "classes": ["UNKNOWN"], "action": UNKNOWN, "tables": [], "functions": functions,
                "name": node.name, "reason": f"what prepared statement {node.name!r} does is not known"}
    if isinstance(node, ast.SelectStmt):
        classes.add("READ")
        if node.intoClause is not None:
            classes.add("DDL")
            action = DDL
        if walk.locks:
            action = _riskier(action, WRITE)
            out["locks"] = True
    elif isinstance(node, (ast.InsertStmt, ast.UpdateStmt, ast.MergeStmt)):
        classes.add("WRITE")
        action = WRITE
    elif isinstance(node, (ast.DeleteStmt, ast.TruncateStmt)):
        classes.add("WRITE")
        action = DELETE
    elif isinstance(node, ast.CopyStmt):
        out["copy"] = "from" if node.is_from else "to"
        if node.is_program or node.filename:
            classes.add("FUNCTION" if node.is_program else "MISC")
            action = ADMIN
            out["server_side"] = "program" if node.is_program else "file"
        elif node.is_from:
            classes.add("WRITE")
            action = WRITE
        else:
            classes.add("READ")
    elif isinstance(node, (ast.DoStmt, ast.CallStmt)):
        classes.add("FUNCTION")
        action = EXEC
    elif isinstance(node, ROLE_STATEMENTS):
        classes.add("ROLE")
        action = ADMIN
    elif isinstance(node, SETTING_STATEMENTS):
        classes.add("ROLE" if any(c.setting in settings.ROLE_SETTINGS for c in changed) else "MISC_SET")
    elif isinstance(node, MAINTENANCE):
        classes.add("MISC")
        action = ADMIN
    elif isinstance(node, ast.LockStmt):
        classes.add("MISC")
        action = WRITE
    elif isinstance(node, ast.TransactionStmt) and node.kind.name in TWO_PHASE:
        classes.add("MISC")  # another application's prepared transaction: commit, abort or park one
        action = ADMIN
    elif isinstance(node, ast.NotifyStmt):
        classes.add("MISC")  # a message to every session listening, as pg_notify sends it
        action = ADMIN
        out["channel"] = node.conditionname
    elif isinstance(node, MISC_READS):
        classes.add("MISC")
        if changed:
            classes.add("MISC_SET")  # BEGIN ISOLATION LEVEL …, START TRANSACTION READ WRITE
        if isinstance(node, ast.DeallocateStmt):
            out["name"] = node.name or ""
            out["all"] = bool(node.isall) or not node.name
        elif isinstance(node, (ast.FetchStmt, ast.ClosePortalStmt)):
            out["name"] = node.portalname or ""  # CLOSE ALL has none
    else:
        classes.add("DDL")
        action = DDL
    for modify in walk.modifies:
        if modify is node:
            continue
        classes.add("WRITE")  # a writable CTE or sub-statement
        action = _riskier(action, DELETE if isinstance(modify, ast.DeleteStmt) else WRITE)
    for f in functions:
        if f.rpartition(".")[2] == SET_CONFIG and f.rpartition(".")[0] in ("", "pg_catalog"):
            continue  # judged by the settings it changes, below
        effect = function_action(f)
        if effect in (EXEC, ADMIN):
            classes.add("FUNCTION")
        if effect != READ:
            action = _riskier(action, effect)
    if walk.set_config:
        administrative = any(c.administrative for c in walk.set_config)
        classes.add("FUNCTION" if administrative else "MISC_SET")
        changed = [*changed, *walk.set_config]
    if changed:
        out["setting"] = changed[0].setting or "a setting named at run time"
        out["settings"] = sorted({c.setting or "?" for c in changed})
        if protected := sorted({c.setting or "a setting named at run time" for c in changed if c.protected}):
            out["protected"] = protected
        if any(c.administrative for c in changed):
            action = _riskier(action, ADMIN)
    if watched := sorted({t for t in tables if activity(t)} | {f for f in functions if activity(f)}):
        classes.add("MISC")
        action = _riskier(action, ADMIN)
        out["server_activity"] = watched
    filtered = [m for m in walk.modifies if isinstance(m, (ast.UpdateStmt, ast.DeleteStmt))]
    if isinstance(node, ast.TruncateStmt):
        out["where"] = False
    elif filtered:  # every UPDATE and DELETE in it, writable CTEs included
        out["where"] = all(m.whereClause is not None for m in filtered)
    return {**out, "classes": sorted(classes), "action": action, "tables": tables, "functions": functions}


def statements(sql: str) -> list[dict[str, Any]]:
    """Every statement in `sql`, classified; one UNKNOWN part when it does not parse.
    Agents and drivers repeat the same SQL text (parameters travel apart), so the
    classification of recent texts is kept; callers get copies."""
    return [dict(p) for p in _statements(sql)]


@functools.lru_cache(maxsize=2048)
def _statements(sql: str) -> tuple[dict[str, Any], ...]:
    shape = Shape.of(sql)
    if shape is not None and (known := SHAPES.get(shape.key)) is not None:
        SHAPES.move_to_end(shape.key)
        return ({**known, "sql": shape.text},)
    out = _parsed(sql)
    if shape is not None and shape.holds(out):
        SHAPES[shape.key] = {k: v for k, v in out[0].items() if k != "sql"}
        if len(SHAPES) > SHAPES_KEPT:
            SHAPES.popitem(last=False)
    return out


def _parsed(sql: str) -> tuple[dict[str, Any], ...]:
    try:
        parsed = pglast.parse_sql(sql)
    except pglast.parser.ParseError as e:
        return ({"sql": sql, "command": "Unparseable", "classes": ["UNKNOWN"], "action": UNKNOWN, "tables": [],
                 "functions": [], "reason": f"the statement does not parse: {e}"},)
    out = []
    for raw in parsed:  # pglast gives character offsets
        end = raw.stmt_location + raw.stmt_len if raw.stmt_len else len(sql)
        out.append(statement(raw.stmt, sql[raw.stmt_location:end].strip()))
    return tuple(out)


CONSTANT_TOKENS = frozenset({"ICONST", "FCONST", "SCONST", "USCONST", "BCONST", "XCONST"})
SHAPED_COMMANDS = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
SHAPES: collections.OrderedDict[tuple[str, ...], dict[str, Any]] = collections.OrderedDict()
SHAPES_KEPT = 2048


@dataclasses.dataclass(frozen=True)
class Shape:
    """A statement's tokens with its constants' values left out (their kinds kept): the
    same SQL with other literals (`WHERE aid = 48213`) has the same shape. The parser
    reads tokens, never a constant's value, so one shape is one tree up to its
    constants; for a single SELECT, INSERT, UPDATE or DELETE that changes no setting,
    classification reads no constant either (only set_config's arguments and the
    options of other statements are read), so the shape's classification is every such
    text's, with that text as its `sql`."""

    key: tuple[str, ...]
    text: str
    """The statement's text as the parser delimits it: up to its first `;`."""

    @classmethod
    def of(cls, sql: str) -> Shape | None:
        try:
            tokens = pglast.parser.scan(sql)
        except pglast.parser.ParseError:
            return None
        key = tuple(t.name if t.name in CONSTANT_TOKENS else sql[t.start:t.end + 1] for t in tokens)
        end = next((t.start for t in tokens if t.name == "ASCII_59"), len(sql))
        return cls(key, sql[:end].strip())

    def holds(self, parts: tuple[dict[str, Any], ...]) -> bool:
        """May this text's classification stand for its shape's?"""
        return (len(parts) == 1 and parts[0]["command"] in SHAPED_COMMANDS and "setting" not in parts[0]
                and parts[0]["sql"] == self.text)


def part(connection: str, details: dict[str, Any]) -> Operation:
    """The Operation for one statement."""
    action = details["action"]
    tables = details.get("tables", [])
    return Operation(
        protocol="postgres",
        connection=connection,
        action=action,
        resource=",".join(tables),
        risk=RISK[action],
        summary=f"{details['command']}{' ' + ', '.join(tables) if tables else ''} on {connection}",
        details=details,
    )


def classify(connection: str, phase: str, sql: str | None, details: dict[str, Any] | None = None) -> Operation:
    """The Operation for one pg_bridge request: a session step (`connect`, `cancel`,
    `close`: reads of the session itself), or statements to `describe` or `execute`."""
    extra = dict(details or {})
    if sql is None:
        return Operation(protocol="postgres", connection=connection, action=READ, resource="session", risk=RISK[READ],
                         summary=f"{phase} session on {connection}", details={"phase": phase, **extra})
    parts = statements(sql)
    if phase == "describe":  # planning only: nothing runs, so it is a read of the catalog
        parts = [{**p, "action": READ, "phase": "describe"} for p in parts]
    ops = tuple(part(connection, {**p, "phase": phase}) for p in parts)
    if not ops:
        return Operation(protocol="postgres", connection=connection, action=READ, resource="", risk=RISK[READ],
                         summary=f"empty query on {connection}", details={"phase": phase, "statements": 0, **extra})
    return combine(connection, phase, ops, extra)


def combine(connection: str, phase: str, ops: tuple[Operation, ...], extra: dict[str, Any] | None = None) -> Operation:
    """One Operation for a string of statements: the riskiest action and risk, every class
    and table; each statement kept as a part for policy."""
    action = _riskier(*(o.action for o in ops))
    tables = sorted({t for o in ops for t in o.details.get("tables", [])})
    classes = sorted({c for o in ops for c in o.details.get("classes", [])})
    if len(ops) == 1:
        only = ops[0]
        return Operation(protocol="postgres", connection=connection, action=only.action, resource=only.resource,
                         risk=only.risk, summary=only.summary, details={**only.details, **(extra or {})}, parts=ops)
    return Operation(
        protocol="postgres",
        connection=connection,
        action=action,
        resource=",".join(tables),
        risk=max(o.risk for o in ops),
        summary=f"{len(ops)} statements ({'; '.join(o.details['command'] for o in ops)}) on {connection}",
        details={"phase": phase, "statements": len(ops), "classes": classes, "tables": tables, **(extra or {})},
        parts=ops,
    )




def classify_request(connection: str, method: str, path: str, session: str, body: Any) -> Operation:
    """The Operation for one request to a postgres connection's virtual host. Anything
    that is not a well-formed pg_bridge request is `unknown` (and so denied)."""
    phase = POSTGRES.phase(method, path)
    problem = (
        "not a pg_bridge request (POST /connect, /execute, /describe, /cancel or /close)" if phase is None else
        f"no {POSTGRES.session_header} header" if not session else
        "the body is not a JSON object" if not isinstance(body, dict) else
        "sql is missing or not a string" if (phase == "execute" or phase == "describe" and "portal" not in body)
        and not isinstance(body.get("sql"), str) else
        "portal is not a string" if phase == "describe" and not isinstance(body.get("portal", ""), str)
        else ""
    )
    if problem:
        return Operation(protocol="postgres", connection=connection, action=UNKNOWN, resource="", risk=RISK[UNKNOWN],
                         summary=f"{method} {path} on {connection}: {problem}",
                         details={"phase": phase or "unknown", "reason": problem, "session": session})
    extra = {"session": session}
    if phase == "connect":
        extra |= {"database": str(body.get("database", "")), "user": str(body.get("user", ""))}
    elif phase == "describe" and "portal" in body:
        extra["portal"] = body["portal"]  # a cursor the session declared: what it returns
    elif phase == "execute" and isinstance(body.get("declare") or body.get("fetch"), str):
        extra["portal"] = body.get("declare") or body["fetch"]  # a portal kept as a cursor: declared or read
    op = classify(connection, phase, body.get("sql") if phase in ("execute", "describe") else None, extra)
    return dataclasses.replace(op, payload=body)


def estimated(op: Operation, rows: int | None) -> Operation:
    """A write with the planner's estimate of the rows it touches (None: no estimate),
    which raises its risk: many rows, no WHERE, or no estimate at all."""
    risk = op.risk
    if op.details.get("where") is False:
        risk += 30
    if rows is None or rows > 100:
        risk += 20
    return dataclasses.replace(op, risk=min(100, risk), details={**op.details, "rows": rows})


def resolved(op: Operation, prepared: dict[str, Any] | None) -> Operation:
    """`EXECUTE name` classified as what the session prepared under that name."""
    if prepared is None:
        return op
    inner = prepared["prepares"]
    details = {**inner, "sql": op.details["sql"], "command": "EXECUTE", "executes": inner["command"],
               "name": op.details["name"], "phase": op.details.get("phase", "execute"),
               "prepared_sql": prepared["sql"]}  # the executor checks it is still what runs
    return part(op.connection, details)


def from_request(connection: str, request: Request) -> Operation:
    body = parse_json_body(request.content, "application/json")
    return classify_request(connection, request.method, request.target, request.header(POSTGRES.session_header), body)
