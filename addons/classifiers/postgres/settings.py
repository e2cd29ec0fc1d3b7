"""Which run-time settings a statement changes, and which of those changes are the gateway's.

A setting can be changed by `SET` and `RESET`, by the characteristics of `SET TRANSACTION`,
`SET SESSION CHARACTERISTICS`, `BEGIN` and `START TRANSACTION` (isolation, read/write,
deferrable), and by `set_config(name, value, is_local)` anywhere in a query. Each of those
spellings is read here as the settings it changes, so a rule or a refusal about a setting
holds for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pglast import ast

ROLE_SETTINGS = ("role", "session_authorization")
PROTECTED_SETTINGS = ("standard_conforming_strings", "backslash_quote", "client_encoding", "search_path",
                      "escape_string_warning", "session_replication_role", "default_transaction_read_only",
                      "transaction_read_only")
"""Settings that change how the server reads SQL text (so what pglast parsed is not what
runs: a backslash or a multibyte encoding can end a string early), which functions an
unqualified name calls, or whether triggers and read-only mode apply. Changing them is an
administrative act, and the executor refuses it whatever the rules say."""
READ_ONLY_SETTINGS = ("default_transaction_read_only", "transaction_read_only")
"""Read-only mode: turning it on only narrows what the session may do (psycopg's and JDBC's
read-only transactions); turning it off is the protected change."""
CHARACTERISTICS = {"transaction": "", "session characteristics": "default_"}
"""`SET TRANSACTION …` and `SET SESSION CHARACTERISTICS AS TRANSACTION …` set these
transaction_* settings (and their default_transaction_* defaults)."""
TRUE = ("on", "true", "yes", "1", "t", "tr", "tru", "y", "ye")
"""What the server's parse_bool reads as true (unique prefixes of true/yes, on, 1)."""
DEFAULT = None
"""The value of a change back to the session's default (RESET, SET … TO DEFAULT)."""
COMPUTED = object()
"""The value of a change whose value (or name) is only known when it runs."""


@dataclass(frozen=True)
class Change:
    setting: str
    value: object  # the literal's text, DEFAULT or COMPUTED

    @property
    def protected(self) -> bool:
        """Would the executor refuse it? A protected setting set to anything but its
        default; read-only mode unless it is turned on; a name known only at run time."""
        if self.setting == "":
            return True
        if self.setting not in PROTECTED_SETTINGS or self.value is DEFAULT:
            return False
        return not (self.setting in READ_ONLY_SETTINGS and isinstance(self.value, str) and self.value in TRUE)

    @property
    def administrative(self) -> bool:
        """Does changing it take an administrator (action admin)? Roles; protected settings,
        read-only mode turned on excepted; a name known only at run time."""
        if self.setting in ROLE_SETTINGS or self.setting == "":
            return True
        if self.setting in READ_ONLY_SETTINGS:
            return self.protected
        return self.setting in PROTECTED_SETTINGS


def literal(node: ast.Node | None) -> object:
    """The text of a constant as the server would read it for a setting, else COMPUTED."""
    if isinstance(node, ast.TypeCast):
        node = node.arg
    if not isinstance(node, ast.A_Const) or node.isnull:
        return COMPUTED
    value = node.val
    for attr in ("sval", "ival", "fval", "boolval", "bsval"):
        if hasattr(value, attr):
            text = getattr(value, attr)
            return ("true" if text else "false") if attr == "boolval" else str(text).lower()
    return COMPUTED


def _characteristics(options, prefix: str) -> list[Change]:
    return [Change(prefix + o.defname, literal(o.arg)) for o in options or () if isinstance(o, ast.DefElem)]


def changes(node: ast.Node) -> list[Change]:
    """The settings a SET, RESET, SET TRANSACTION, SET SESSION CHARACTERISTICS, SET
    CONSTRAINTS, BEGIN or START TRANSACTION statement changes (none for other statements)."""
    if isinstance(node, ast.TransactionStmt):
        return _characteristics(node.options, "") if node.kind.name in ("TRANS_STMT_BEGIN", "TRANS_STMT_START") else []
    if isinstance(node, ast.ConstraintsSetStmt):
        return [Change("constraints", "deferred" if node.deferred else "immediate")]
    if not isinstance(node, ast.VariableSetStmt):
        return []
    kind, name = node.kind.name, (node.name or "").lower()
    if kind == "VAR_RESET_ALL":
        return [Change("all", DEFAULT)]
    if kind == "VAR_SET_MULTI":
        if name in CHARACTERISTICS:
            return _characteristics(node.args, CHARACTERISTICS[name])
        return [Change(name.replace(" ", "_"), COMPUTED)]  # transaction snapshot
    if kind in ("VAR_SET_DEFAULT", "VAR_RESET"):
        return [Change(name, DEFAULT)]
    if kind == "VAR_SET_VALUE" and node.args and len(node.args) == 1:
        return [Change(name, literal(node.args[0]))]
    return [Change(name, COMPUTED)]


def set_config(call: ast.FuncCall) -> Change:
    """`set_config(name, value, is_local)` as the change it makes; a name that is not a
    literal could be any setting (the empty name: refused)."""
    args = list(call.args or ())
    name = literal(args[0]) if args else COMPUTED
    return Change(name if isinstance(name, str) else "", literal(args[1]) if len(args) > 1 else COMPUTED)
