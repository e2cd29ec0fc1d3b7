"""Rules: loading, validation, compilation to predicates, and evaluation into a Decision.

Semantics: every matching rule counts; deny beats review beats allow; masks are the union
of all matching rules; no matching rule means deny. A body condition that cannot be
evaluated counts against the agent: it holds for deny and review rules and fails for allow
rules, so a malformed body can never dodge a deny nor earn an allow. That covers a body
that is not parseable JSON, and a value of a type the condition cannot judge (a list or a
word where a number was expected); numeric strings are compared as the numbers servers
read them as.

Kubernetes scope: a request that reaches every namespace (a list or watch across all of
them) or every object of a collection (a list, a watch, a collection delete, a create whose
name is unknown) is inside a `namespaces` or `names` condition the way it counts against
the agent: it matches every deny and review rule (whatever namespaces or names they name:
it reaches them), and an allow rule only when its patterns cover every name (`*`). An
allow rule it reaches only in part still lends the decision its masks, so what a rule on
one namespace masks is masked in a list of all of them.

Evaluation is an index lookup by (connection, action) followed by short tuples of compiled
checks, so a rule set of a thousand rules decides in microseconds.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonpath_ng.ext import parse as jsonpath_parse

from addons.engine import mcp, provenance, schema
from addons.engine.config import parse_duration
from addons.engine.errors import Error
from addons.engine.masks import parse as parse_mask
from addons.engine.model import (
    ANY_PAYLOAD,
    UNPARSEABLE,
    Decision,
    Operation,
    Principal,
    Review,
)

Check = Callable[[Principal, Operation], bool]
UNKNOWN_BODY = ("unparseable", "other", "json-patch")


class RuleError(ValueError):
    """Invalid rules; each line names the file, the rule id and the field."""


@dataclass(frozen=True)
class Rule:
    id: str
    effect: str
    file: str
    order: int
    reason: str = ""
    description: str = ""
    masks: tuple[Any, ...] = ()
    review: Review | None = None
    connections: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    checks: tuple[tuple[str, Check], ...] = field(default=(), repr=False)
    reach: tuple[tuple[str, Check], ...] | None = field(default=None, repr=False)
    """An allow rule's checks with its Kubernetes scope read in part (see the module's
    docstring); None when they would be its `checks`."""
    match: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The rule's match as written (what a refusal's reason quotes)."""

    def failures(self, principal: Principal, op: Operation) -> list[str]:
        """Every match field that does not hold."""
        return [name for name, check in self.checks if not check(principal, op)]

    def first_failure(self, principal: Principal, op: Operation) -> str | None:
        """The first match field that does not hold, or None when the rule matches."""
        for name, check in self.checks:
            if not check(principal, op):
                return name
        return None

    def matches(self, principal: Principal, op: Operation) -> bool:
        for _, check in self.checks:
            if not check(principal, op):
                return False
        return True

    def reaches(self, principal: Principal, op: Operation) -> bool:
        """Whether the request reaches part of what an allow rule scoped to namespaces or
        names is about (its masks then apply), though the rule does not cover all of it."""
        return self.reach is not None and all(check(principal, op) for _, check in self.reach)


def _many(value: Any) -> tuple:
    return tuple(value) if isinstance(value, list) else (value,)


def glob_regex(pattern: str) -> re.Pattern:
    """Path glob: `*` stays within a segment, `**` spans segments; `/a/**` also matches `/a`."""
    pattern = pattern.rstrip("/") or "/"
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("/**", i) and i + 3 == len(pattern):
            out += "(?:/.*)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def _globs(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    if not any(ch in p for p in patterns for ch in "*?["):
        exact = frozenset(patterns)
        return exact.__contains__
    return lambda value: any(fnmatch.fnmatchcase(value, p) for p in patterns)


UNKNOWN = None  # a value of a type the condition cannot judge


def _number(v: Any) -> float | None:
    """A number, or a string a server would read as one ("500", " 5e2 ")."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def _compare(op: str, expected: Any) -> Callable[[Any], bool | None]:
    """A test on one value: True, False, or UNKNOWN when the value's type does not fit
    (a list where a number was expected): UNKNOWN counts against the agent."""
    if op in ("equals", "in"):
        options = [expected] if op == "equals" else expected

        def test(v: Any) -> bool | None:
            if any(v == e and type(v) is type(e) for e in options):
                return True
            return False if any(type(v) is type(e) for e in options) else UNKNOWN

        return test
    if op == "matches":
        rx = re.compile(expected)
        return lambda v: (rx.search(v) is not None) if isinstance(v, str) else UNKNOWN
    compare = {"gt": lambda a: a > expected, "gte": lambda a: a >= expected,
               "lt": lambda a: a < expected, "lte": lambda a: a <= expected}[op]

    def numeric(v: Any) -> bool | None:
        n = _number(v)
        return UNKNOWN if n is None else compare(n)

    return numeric


def _path_check(globs: tuple[str, ...]) -> Check:
    """Path globs. On a connection whose backend routes case-insensitively the classifier
    folds the path to lower case (`path_case`), and the globs are folded the same way, so
    a rule written `/Admin/**` still matches what the backend routes to /admin."""
    exact = tuple(glob_regex(g) for g in globs)
    folded = tuple(glob_regex(g.lower()) for g in globs)

    def check(_: Principal, op: Operation) -> bool:
        regexes = folded if op.details.get("path_case") == "insensitive" else exact
        return any(r.match(op.resource) for r in regexes)

    return check


def _body_check(conditions: list[dict[str, Any]], effect: str) -> Check:
    compiled = []
    for c in conditions:
        expr = jsonpath_parse(c["path"])
        if c["op"] in ("exists", "absent"):
            compiled.append((expr, c["op"], None))
        else:
            compiled.append((expr, "value", _compare(c["op"], c["value"])))
    unknown_holds = effect != "allow"

    def check(_: Principal, op: Operation) -> bool:
        if op.payload is ANY_PAYLOAD:  # "could any payload match?": allow and review may, deny need not
            return effect != "deny"
        if op.details.get("body") in UNKNOWN_BODY or op.payload is UNPARSEABLE:
            return unknown_holds
        for expr, kind, test in compiled:
            values = [m.value for m in expr.find(op.payload)] if op.payload is not None else []
            if kind == "exists":
                ok = bool(values)
            elif kind == "absent":
                ok = not values
            else:
                results = [test(v) for v in values]
                ok = any(results) or (UNKNOWN in results and unknown_holds)
            if not ok:
                return False
        return True

    return check


def _attribute_check(source: str, attribute: str, patterns: Any) -> Check:
    """Agent attributes: `agent` reads verified claims only, `asserted` the X-Custody-* headers."""
    test = _globs(_many(patterns))
    if source == "agent":
        return lambda p, op: test(p.agent.get(attribute, ""))
    return lambda p, op: test(p.asserted.get(attribute, ""))


def _compile_checks(match: dict[str, Any], effect: str, whole: bool = True) -> tuple[tuple[str, Check], ...]:
    checks: list[tuple[str, Check]] = []
    if "protocol" in match:
        protocols = frozenset(_many(match["protocol"]))
        checks.append(("protocol", lambda p, op: op.protocol in protocols))
    if "connection" in match:
        conn = _globs(_many(match["connection"]))
        checks.append(("connection", lambda p, op: conn(op.connection)))
    if "action" in match:
        actions = frozenset(_many(match["action"]))
        checks.append(("action", lambda p, op: op.action in actions))
    if "method" in match:
        methods = frozenset(m.upper() for m in _many(match["method"]))
        checks.append(("method", lambda p, op: op.details.get("method") in methods))
    if "path" in match:
        checks.append(("path", _path_check(_many(match["path"]))))
    if "risk" in match:
        low, high = match["risk"].get("min", 0), match["risk"].get("max", 100)
        checks.append(("risk", lambda p, op: low <= op.risk <= high))
    who = match.get("principal", {})
    if "subjects" in who:
        subjects = _globs(_many(who["subjects"]))
        checks.append(("principal.subjects", lambda p, op: subjects(p.subject)))
    if "issuers" in who:
        issuers = frozenset(_many(who["issuers"]))
        checks.append(("principal.issuers", lambda p, op: p.issuer in issuers))
    if "groups" in who:
        groups = frozenset(_many(who["groups"]))
        checks.append(("principal.groups", lambda p, op: not groups.isdisjoint(p.groups)))
    for source in ("agent", "asserted"):
        for attribute, patterns in match.get(source, {}).items():
            checks.append((f"{source}.{attribute}", _attribute_check(source, attribute, patterns)))
    if "body" in match:
        checks.append(("body", _body_check(match["body"], effect)))
    checks += _kubernetes_checks(match.get("kubernetes"), effect, whole and effect == "allow")
    checks += _sql_checks(match.get("sql"), effect)
    checks += _ssh_checks(match.get("ssh"), effect)
    checks += _mcp_checks(match.get("mcp"), effect)
    checks += _llm_checks(match.get("llm"), effect)
    if "provenance" in match:
        checks.append(("provenance", _provenance_check(match["provenance"], effect)))
    return tuple(checks)


def _llm_checks(block: dict[str, Any] | None, effect: str) -> list[tuple[str, Check]]:
    """Checks on one model call. `max_tokens` is a limit: an allow or review rule holds for
    a call that asks for at most that many output tokens and says how many (a call that
    does not say may run to the model's own limit); a deny rule for any other call. `tools`
    of an allow or review rule holds when every tool offered is among its globs; of a deny
    rule, when any is."""
    checks: list[tuple[str, Check]] = []
    block = block or {}
    if "models" in block:
        models = _globs(_many(block["models"]))
        checks.append(("llm.models", lambda p, op: op.protocol == "llm" and "model" in op.details
                       and models(str(op.details["model"]))))
    if "endpoints" in block:
        endpoints = frozenset(_many(block["endpoints"]))
        checks.append(("llm.endpoints", lambda p, op: op.protocol == "llm" and op.details.get("endpoint") in endpoints))
    if "max_tokens" in block:
        limit = block["max_tokens"]

        def within(p: Principal, op: Operation) -> bool:
            asked = op.details.get("max_tokens")
            inside = isinstance(asked, int) and not isinstance(asked, bool) and asked <= limit
            return op.protocol == "llm" and (inside if effect != "deny" else not inside)

        checks.append(("llm.max_tokens", within))
    if "tools" in block:
        tools = _globs(_many(block["tools"]))
        test = any if effect == "deny" else all
        checks.append(("llm.tools", lambda p, op: op.protocol == "llm"
                       and test(tools(str(t)) for t in op.details.get("tools", ()))))
    if "stream" in block:
        checks.append(("llm.stream", lambda p, op, w=block["stream"]: op.protocol == "llm"
                       and bool(op.details.get("stream")) == w))
    return checks


def _provenance_check(wanted: str, effect: str) -> Check:
    """Does a model's output the gateway saw ask for the request (addons/engine/provenance.py)?
    A request whose provenance is unknown counts against the agent; one asked about in
    general (a tool listed before any call) may match allow and review rules."""
    holds = {"required": (*provenance.VERIFIED, provenance.NOT_APPLICABLE),
             "exact": (provenance.EXACT, provenance.NOT_APPLICABLE), "none": (provenance.NONE,)}[wanted]

    def check(p: Principal, op: Operation) -> bool:
        if op.payload is ANY_PAYLOAD:
            return effect != "deny"
        found = op.details.get("provenance")
        how = found.get("match") if isinstance(found, dict) else None
        return (effect != "allow") if how is None else how in holds

    return check


def _mcp_checks(block: dict[str, Any] | None, effect: str) -> list[tuple[str, Check]]:
    """Checks on one MCP message (a batch is decided message by message). Three kinds of
    message match an allow or review rule only when the rule names them: a server's
    sampling and elicitation requests (`sampling: true`, `elicitation: true`) and its other
    requests to the client (`methods`), and a tool whose definition changed since it was
    pinned (`changed: true`). So no rule allows them by accident."""
    checks: list[tuple[str, Check]] = []
    block = block or {}

    def names(key: str, detail: str) -> None:
        test = _globs(_many(block[key]))
        checks.append((f"mcp.{key}", lambda p, op: op.protocol == "mcp" and detail in op.details
                       and test(str(op.details[detail]))))

    if "tools" in block:
        names("tools", "tool")
    if "methods" in block:
        names("methods", "method")
    for key, method in (("resources", "resources/read"), ("prompts", "prompts/get")):
        if key in block:
            test = _globs(_many(block[key]))
            checks.append((f"mcp.{key}", lambda p, op, t=test, m=method: op.protocol == "mcp"
                           and op.details.get("method") == m and t(op.resource)))
    if "arguments" in block:
        arguments = _body_check(block["arguments"], effect)
        checks.append(("mcp.arguments", lambda p, op: op.protocol == "mcp" and arguments(p, op)))
    for key, method in (("sampling", mcp.SAMPLING), ("elicitation", mcp.ELICITATION)):
        if key in block:
            checks.append((f"mcp.{key}", lambda p, op, m=method, w=block[key]: op.protocol == "mcp"
                           and (op.details.get("method") == m) == w))
    if "changed" in block:
        checks.append(("mcp.changed", lambda p, op, w=block["changed"]: op.protocol == "mcp"
                       and bool(op.details.get("changed")) == w))
    if effect == "deny":
        return checks
    if "changed" not in block:
        checks.append(("mcp.changed", lambda p, op: not op.details.get("changed")))
    for key, method in (("sampling", mcp.SAMPLING), ("elicitation", mcp.ELICITATION)):
        if block.get(key) is not True:
            checks.append((f"mcp.{key}", lambda p, op, m=method: op.protocol != "mcp" or op.details.get("method") != m))
    if "methods" not in block:
        checks.append(("mcp.methods", lambda p, op: op.protocol != "mcp" or op.details.get("initiator") != "server"
                       or op.details.get("method") in (mcp.SAMPLING, mcp.ELICITATION)))
    return checks


def _ssh_checks(ssh: dict[str, Any] | None, effect: str) -> list[tuple[str, Check]]:
    """Checks on one simple shell command (policy decides each command of a line on its own).
    `paths` and `writes` of an allow rule hold only when every path is within its globs; of
    a deny or review rule, when any path is. A written tree (`/srv/app/**`: an archive
    extracted, a patch applied) is every path under it: an allow rule must contain all of
    it, a deny rule holds when it could reach any path the globs match."""
    checks: list[tuple[str, Check]] = []
    ssh = ssh or {}
    if "programs" in ssh:
        programs = _globs(_many(ssh["programs"]))
        checks.append(("ssh.programs", lambda p, op: op.protocol == "ssh"
                       and any(programs(x) for x in op.details.get("programs", ()))))
    if "commands" in ssh:
        patterns = _many(ssh["commands"])
        checks.append(("ssh.commands", lambda p, op: op.protocol == "ssh" and any(
            fnmatch.fnmatchcase(op.details.get("command", ""), g) for g in patterns)))
    for key in ("paths", "writes"):
        if key in ssh:
            globs = tuple((glob_regex(g), g) for g in _many(ssh[key]))
            test = all if effect == "allow" else any

            def check(p, op, globs=globs, key=key, test=test) -> bool:
                found = op.details.get(key, ())
                return op.protocol == "ssh" and bool(found) and test(
                    any(_path_matches(path, regex, glob, effect == "allow") for regex, glob in globs) for path in found)

            checks.append((f"ssh.{key}", check))
    for key in ("sudo", "network", "package", "recursive"):
        if key in ssh:
            checks.append((f"ssh.{key}", lambda p, op, w=ssh[key], k=key: op.protocol == "ssh"
                           and bool(op.details.get(k)) == w))
    return checks


def _path_matches(path: str, regex: re.Pattern, glob: str, contain: bool) -> bool:
    """Does a path (or a tree, `dir/**`) match a glob? A tree is contained when the glob
    matches its directory and anything deep below it; it meets the glob when the glob
    could match a path under it (the glob's fixed start lies under the directory, or the
    directory under the fixed start)."""
    if not path.endswith("/**"):
        return bool(regex.match(path))
    root = path[:-3] or "/"
    if contain:
        return bool(regex.match(root) and regex.match(root.rstrip("/") + "/.custody-probe/.custody-probe"))
    fixed = re.split(r"[*?\[]", glob, maxsplit=1)[0]
    inside = root.rstrip("/") + "/"
    return bool(regex.match(root)) or fixed.startswith(inside) or inside.startswith(fixed) or root.startswith(fixed)


def _sql_checks(sql: dict[str, Any] | None, effect: str) -> list[tuple[str, Check]]:
    """Checks on one SQL statement (policy decides each statement of a string on its own).
    A write whose row estimate could not be made counts against the agent."""
    checks: list[tuple[str, Check]] = []
    sql = sql or {}
    for key in ("classes", "tables", "functions"):
        if key in sql:
            test = _globs(tuple(v if key == "classes" else v.lower() for v in _many(sql[key])))
            checks.append((f"sql.{key}", lambda p, op, t=test, k=key: op.protocol == "postgres"
                           and any(t(v) for v in op.details.get(k, ()))))
    if "commands" in sql:
        commands = _globs(tuple(v.upper() for v in _many(sql["commands"])))
        checks.append(("sql.commands", lambda p, op: op.protocol == "postgres" and commands(op.details.get("command", ""))))
    if "where" in sql:
        want = sql["where"]
        checks.append(("sql.where", lambda p, op: op.protocol == "postgres" and "where" in op.details
                       and op.details["where"] == want))
    if "rows" in sql:
        low, high = sql["rows"].get("min", 0), sql["rows"].get("max", float("inf"))
        unknown_holds = effect != "allow"

        def rows(p: Principal, op: Operation) -> bool:
            if op.protocol != "postgres" or "rows" not in op.details:
                return False  # not a write
            n = op.details["rows"]
            return unknown_holds if n is None else low <= n <= high

        checks.append(("sql.rows", rows))
    return checks


def _scope_check(patterns: tuple[str, ...], detail: str, every: str, whole: bool) -> Check:
    """`namespaces` or `names`: the request's namespace (name) matches a pattern. One that
    reaches every namespace (name) is inside the patterns when they cover every name, or,
    unless the rule must hold for all of it (`whole`: an allow rule), always."""
    test = _globs(patterns)
    covers_all = any(set(p) == {"*"} for p in patterns)

    def check(p: Principal, op: Operation) -> bool:
        if op.protocol != "kubernetes":
            return False
        if op.details.get(every):
            return covers_all or not whole
        return test(op.details.get(detail, ""))

    return check


def _kubernetes_checks(k8s: dict[str, Any] | None, effect: str, whole: bool) -> list[tuple[str, Check]]:
    """Checks on Kubernetes request info. An impersonating request matches an allow rule
    only when the rule names impersonation itself: no rule allows it by accident. `whole`:
    a request across every namespace or name must be inside the rule's scope as a whole."""
    checks: list[tuple[str, Check]] = []
    k8s = k8s or {}
    for key, detail in {"verbs": "verb", "groups": "api_group"}.items():
        if key in k8s:
            test = _globs(_many(k8s[key]))
            checks.append((f"kubernetes.{key}", lambda p, op, t=test, d=detail: op.protocol == "kubernetes" and t(op.details.get(d, ""))))
    for key, detail, every in (("namespaces", "namespace", "every_namespace"), ("names", "name", "every_name")):
        if key in k8s:
            checks.append((f"kubernetes.{key}", _scope_check(_many(k8s[key]), detail, every, whole)))
    if "resources" in k8s:
        test = _globs(_many(k8s["resources"]))
        checks.append(("kubernetes.resources", lambda p, op: op.protocol == "kubernetes" and op.details.get("resource_request", False) and test(op.resource)))
    if "commands" in k8s:
        test = _globs(_many(k8s["commands"]))
        checks.append(("kubernetes.commands", lambda p, op: test(" ".join(op.details.get("command", [])))))
    for key in ("non_resource", "dry_run"):
        if key in k8s:
            want, detail = k8s[key], {"non_resource": "resource_request", "dry_run": "dry_run"}[key]
            flip = key == "non_resource"
            checks.append((f"kubernetes.{key}", lambda p, op, w=want, d=detail, x=flip: op.protocol == "kubernetes" and (bool(op.details.get(d)) != x) == w))
    if "impersonate" in k8s:
        users = _globs(_many(k8s["impersonate"].get("users", "*")))
        groups = _globs(_many(k8s["impersonate"].get("groups", "*")))

        def impersonates(p: Principal, op: Operation) -> bool:
            imp = op.details.get("impersonate")
            return bool(imp) and users(imp["user"] or imp["uid"]) and all(groups(g) for g in imp["groups"])

        checks.append(("kubernetes.impersonate", impersonates))
    elif effect == "allow":
        checks.append(("kubernetes.impersonate", lambda p, op: "impersonate" not in op.details))
    return checks


def _review(raw: dict[str, Any]) -> Review:
    return Review(
        approvers=tuple(raw["approvers"]),
        approvals=raw.get("approvals", 1),
        denials=raw.get("denials", 1),
        timeout=parse_duration(raw.get("timeout", "5m")),
        ttl=parse_duration(raw.get("ttl", "1h")),
        require_justification=raw.get("require_justification", False),
        grant_max=parse_duration(raw.get("grants", {}).get("max", 0)),
    )


def _label(rules: list, index: int) -> str:
    raw = rules[index] if index < len(rules) else None
    if isinstance(raw, dict) and isinstance(raw.get("id"), str):
        return f"rule {raw['id']!r}"
    return f"rule #{index + 1}"


def parse_file(document: Any, file: str, start: int = 0) -> list[Rule]:
    """Validate one rule file's YAML document and compile its rules."""
    problems = schema.errors("rules", document)
    if problems:
        rules = document.get("rules", []) if isinstance(document, dict) else []
        lines = []
        for where, message in problems:
            m = re.match(r"rules\[(\d+)\]\.?(.*)", where)
            if m and isinstance(rules, list):
                lines.append(f"{file}: {_label(rules, int(m.group(1)))}: {m.group(2) or '(rule)'}: {message}")
            else:
                lines.append(f"{file}: {where}: {message}")
        raise RuleError("\n".join(lines))
    out = []
    for n, raw in enumerate(document["rules"]):
        where = f"{file}: rule {raw['id']!r}"
        conditions = [("body", raw["match"].get("body", [])),
                      ("mcp.arguments", raw["match"].get("mcp", {}).get("arguments", []))]
        for field_name, listed in conditions:
            for c, cond in enumerate(listed):
                try:
                    jsonpath_parse(cond["path"])
                except Exception as e:  # jsonpath-ng raises several unrelated types
                    raise RuleError(f"{where}: match.{field_name}[{c}].path: not a JSONPath: {e}") from None
                if cond["op"] == "matches":
                    try:
                        re.compile(cond["value"])
                    except re.error as e:
                        raise RuleError(f"{where}: match.{field_name}[{c}].value: not a regular expression: {e}") from None
        for m, mask in enumerate(raw.get("masks", ())):
            try:
                parse_mask(mask)
            except ValueError as e:
                raise RuleError(f"{where}: masks[{m}]: {e}") from None
        match = raw["match"]
        conns = _many(match["connection"]) if "connection" in match else ()
        scoped = any(k in match.get("kubernetes", {}) for k in ("namespaces", "names"))
        out.append(
            Rule(
                id=raw["id"],
                effect=raw["effect"],
                file=file,
                order=start + n,
                reason=raw.get("reason", ""),
                description=raw.get("description", ""),
                masks=tuple(raw.get("masks", ())),
                review=_review(raw["review"]) if "review" in raw else None,
                connections=() if any(ch in c for c in conns for ch in "*?[") else conns,
                actions=_many(match["action"]) if "action" in match else (),
                checks=_compile_checks(match, raw["effect"]),
                reach=_compile_checks(match, "allow", whole=False) if raw["effect"] == "allow" and scoped else None,
                match=match,
            )
        )
    return out


def rule_files(paths: Iterable[str]) -> list[str]:
    """The rule files named by `paths`: files as given, directories' *.yaml/*.yml sorted."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(
                str(f) for f in Path(p).iterdir() if f.suffix in (".yaml", ".yml") and f.is_file()
            )
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise RuleError(f"{p}: no such rule file or directory")
    return files


class RuleSet:
    """A validated set of rules, indexed by connection and action for fast decisions."""

    def __init__(self, rules: list[Rule], files: tuple[str, ...] = (), digest: str = "") -> None:
        self.rules = rules
        self.files = files
        self.digest = digest
        """SHA-256 of the files' contents, in load order: replicas that differ in it do not
        decide alike (`custody status` warns)."""
        self.provenance = any(name == "provenance" for r in rules for name, _ in r.checks)
        """Whether any rule asks about provenance: only then is a request no completion in this
        replica's memory asked for looked up among every replica's (a store read each)."""
        self._candidates: dict[tuple[str, str], tuple[Rule, ...]] = {}
        self._scoped: dict[tuple[str, str], tuple[Rule, ...]] = {}

    @classmethod
    def load(cls, paths: Iterable[str]) -> RuleSet:
        rules: list[Rule] = []
        files = rule_files(paths)
        errors: list[str] = []
        seen: dict[str, str] = {}
        digest = hashlib.sha256()
        for file in files:
            try:
                with open(file) as fh:
                    text = fh.read()
                digest.update(hashlib.sha256(text.encode()).digest())
                document = yaml.safe_load(text)
                parsed = parse_file(document, file, start=len(rules))
            except OSError as e:
                errors.append(f"{file}: cannot read: {e.strerror}")
                continue
            except yaml.YAMLError as e:
                errors.append(f"{file}: not valid YAML: {e}")
                continue
            except RuleError as e:
                errors.append(str(e))
                continue
            for rule in parsed:
                if rule.id in seen:
                    errors.append(f"{file}: rule {rule.id!r}: id: already used in {seen[rule.id]}")
                seen[rule.id] = file
            rules += parsed
        if errors:
            raise RuleError("\n".join(errors))
        return cls(rules, tuple(files), digest.hexdigest())

    def candidates(self, connection: str, action: str) -> tuple[Rule, ...]:
        key = (connection, action)
        hit = self._candidates.get(key)
        if hit is None:
            hit = tuple(
                r
                for r in self.rules
                if (not r.connections or connection in r.connections)
                and (not r.actions or action in r.actions)
            )
            self._candidates[key] = hit
        return hit

    def matching(self, principal: Principal, op: Operation) -> list[Rule]:
        return [r for r in self.candidates(op.connection, op.action) if r.matches(principal, op)]

    def reaching(self, principal: Principal, op: Operation) -> list[Rule]:
        """Allow rules the request reaches in part without matching them (their masks apply)."""
        key = (op.connection, op.action)
        scoped = self._scoped.get(key)
        if scoped is None:
            scoped = self._scoped[key] = tuple(r for r in self.candidates(*key) if r.reach is not None)
        return [r for r in scoped if r.reaches(principal, op) and not r.matches(principal, op)]

    def settled_without(self, principal: Principal, op: Operation, checks: tuple[str, ...]) -> bool:
        """Is the decision on `op` the same whatever the named checks (`sql.rows`, `risk`)
        would see? True when a deny rule that does not look at them matches a statement, or
        when no rule that does look at them matches on everything else. Lets the planner skip
        work (EXPLAIN) whose answer could not change the decision."""
        parts = op.parts or (op,)
        for part in parts:
            for r in self.candidates(part.connection, part.action):
                uses = any(name in checks for name, _ in r.checks)
                if r.effect == "deny" and not uses and r.first_failure(principal, part) is None:
                    return True
        return not any(any(name in checks for name, _ in r.checks)
                       and all(check(principal, part) for name, check in r.checks if name not in checks)
                       for part in parts for r in self.candidates(part.connection, part.action))

    def decide(self, principal: Principal, op: Operation) -> Decision:
        """The decision for an operation; for one with parts (SQL statements, two readings
        of a Kubernetes path, MCP batches), every part is decided on its own and the strictest
        decision wins."""
        if not op.parts:
            decision = explained(decide(self.matching(principal, op), self.reaching(principal, op)), op)
            return self.near_miss(principal, op, decision)
        decisions = [self.near_miss(principal, part, explained(decide(self.matching(principal, part),
                                                                      self.reaching(principal, part)), part))
                     for part in op.parts]
        return strictest(decisions, op.parts)

    def near_miss(self, principal: Principal, op: Operation, decision: Decision) -> Decision:
        """A model call no rule allows, explained by the rule it would have matched but for
        its model or its limits: which model, which limit. A request no rule allows whose
        provenance is unknown (the store that holds the other replicas' tool calls could not
        be read), when a rule would have matched but for its provenance: 503, retry."""
        if decision.error != Error.NO_MATCHING_RULE:
            return decision
        if op.protocol != "llm":
            return self.unknown_provenance(principal, op, decision)
        for r in self.candidates(op.connection, op.action):
            missed = r.failures(principal, op)
            if r.effect == "deny" or not missed or not set(missed) <= {"llm.models", "llm.max_tokens"}:
                continue
            block, d = r.match.get("llm", {}), op.details
            if "llm.models" in missed:
                reason = (f"model {d.get('model')!r} is not one you may use on {op.connection} (rule {r.id} allows "
                          f"{', '.join(_many(block['models']))})")
            elif d.get("max_tokens") is None:
                reason = f"the call does not say max_tokens, and rule {r.id} allows at most {block['max_tokens']}"
            else:
                reason = f"max_tokens {d['max_tokens']} is over the limit of rule {r.id} ({block['max_tokens']})"
            return Decision(effect="deny", status=403, error=Error.NO_MATCHING_RULE, reason=reason)
        return decision


    def unknown_provenance(self, principal: Principal, op: Operation, decision: Decision) -> Decision:
        found = op.details.get("provenance")
        if not isinstance(found, dict) or found.get("match") != provenance.UNKNOWN:
            return decision
        for r in self.candidates(op.connection, op.action):
            if r.effect != "deny" and r.failures(principal, op) == ["provenance"]:
                return Decision(effect="deny", status=503, error=Error.PROVENANCE_UNKNOWN,
                                reason=f"rule {r.id} allows this only when a model asked for it, and that is "
                                       f"unknown: {found.get('reason', '')}")
        return decision


def explained(decision: Decision, op: Operation) -> Decision:
    """A default denial that something more precise explains: a tool whose definition
    changed since it was pinned, or a server asking the client for sampling or elicitation."""
    if decision.error != Error.NO_MATCHING_RULE or op.protocol != "mcp":
        return decision
    if op.details.get("changed"):
        return Decision(effect="deny", status=403, error=Error.TOOL_CHANGED,
                        reason=f"the definition of tool {op.resource} changed since it was pinned "
                               f"({op.details.get('pinned', '')[:12]}… → {op.details.get('listed', '')[:12]}…); "
                               "no rule allows the changed tool (mcp.changed: true)")
    method = op.details.get("method")
    if op.details.get("initiator") == "server" and method in (mcp.SAMPLING, mcp.ELICITATION):
        key = "sampling" if method == mcp.SAMPLING else "elicitation"
        return Decision(effect="deny", status=403, error=Error.NO_MATCHING_RULE,
                        reason=f"the server's {method} is refused: no rule allows it (mcp.{key}: true)")
    return decision


def decide(matched: list[Rule], reached: Iterable[Rule] = ()) -> Decision:
    """Combine matching rules: deny beats review beats allow; masks are the union, over the
    rules the request reaches in part too."""
    if not matched:
        return Decision(effect="deny", reason="no rule matches this request", status=403, error=Error.NO_MATCHING_RULE)
    masks: list[Any] = []
    for r in [*matched, *reached]:
        for m in r.masks:
            if m not in masks:
                masks.append(m)
    for effect in ("deny", "review", "allow"):
        chosen = [r for r in matched if r.effect == effect]
        if chosen:
            break
    ids = tuple(r.id for r in chosen)
    verb = {"deny": "denied", "review": "held for review", "allow": "allowed"}[effect]
    reason = next((r.reason for r in chosen if r.reason), f"{verb} by rule {ids[0]}")
    if effect == "deny":
        return Decision(effect="deny", rules=ids, reason=reason, status=403, error=Error.DENIED_BY_POLICY)
    return Decision(
        effect=effect,
        rules=ids,
        reason=reason,
        masks=tuple(masks),
        reviews=tuple(r.review for r in chosen if r.review) if effect == "review" else (),
    )


def strictest(decisions: list[Decision], parts: tuple[Operation, ...]) -> Decision:
    """Combine the decisions on the statements of one string: a denied statement denies
    the string (its reason names the statement), a reviewed one holds it, and only a
    string whose every statement is allowed is allowed; masks and rules are the union."""
    def which(n: int) -> str:
        if len(parts) < 2:
            return ""
        d = parts[n].details
        if parts[n].protocol == "kubernetes":
            return f"as {d['path']} may be read ({parts[n].summary}): "
        noun = "message" if parts[n].protocol == "mcp" else "statement"
        return f"{noun} {n + 1} ({d.get('command') or d.get('tool') or d.get('method') or '?'}): "

    for n, d in enumerate(decisions):
        if d.effect == "deny":
            return Decision(effect="deny", rules=d.rules, reason=which(n) + d.reason, status=d.status, error=d.error)
    rules = tuple(dict.fromkeys(r for d in decisions for r in d.rules))
    masks: list[Any] = []
    for m in (m for d in decisions for m in d.masks):
        if m not in masks:
            masks.append(m)
    reviewed = [(n, d) for n, d in enumerate(decisions) if d.effect == "review"]
    if reviewed:
        reviews = tuple(dict.fromkeys(r for _, d in reviewed for r in d.reviews))
        return Decision(effect="review", rules=rules, reason="; ".join(which(n) + d.reason for n, d in reviewed),
                        masks=tuple(masks), reviews=reviews)
    noun = "messages" if parts and parts[0].protocol == "mcp" else "statements"
    return Decision(effect="allow", rules=rules, reason=decisions[0].reason if len(decisions) == 1 else
                    f"all {len(decisions)} {noun} allowed", masks=tuple(masks))

