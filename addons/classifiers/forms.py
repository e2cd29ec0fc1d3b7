"""Normal forms for provenance: what an infrastructure request is as a command, and what
a model's tool call could have asked for, in each protocol's own terms, so that
addons/engine/provenance.py can tell whether the one asked for the other.

- SQL by parse tree: PostgreSQL's own parser (pglast), each statement deparsed to its
  canonical text, constants included (pglast's fingerprints leave constants out, and a
  model that asked for `id = 1` did not ask for `id = 2`).
- Shell by words: the words bash would split the line into (addons/classifiers/shell.py).
- MCP by tool and arguments: the tool (CrewAI and others prefix the server's name to it)
  and its arguments as canonical JSON.
- HTTP by method, path and body: the method (GET when the model named none), the path
  resolved as servers resolve it with the query as sorted pairs, the host when the model
  named one, and the body as canonical JSON (or as sent).
- Kubernetes by what kubectl's words ask the API server for: verb, resource, namespace,
  name (no namespace in the words: any namespace), and HTTP's form too.

The model's arguments are read without knowing the tool: every string in them is tried as
SQL, as a command line and as kubectl's words; every object as an HTTP request (method,
url or path, body) or a curl command line.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pglast
from pglast.stream import RawStream

from addons.classifiers import shell
from addons.classifiers.http import normalise_path
from addons.engine.model import Operation, Request, canonical_json
from addons.engine.provenance import Asked, Form

TRANSACTION_CONTROL = frozenset({"BEGIN", "START", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"})
"""What drivers send around statements: not commands a model asks for."""
DISCOVERY = ("/api", "/apis", "/version", "/openapi")
"""kubectl's discovery of what the API server serves, before every command."""
MCP_COMMANDS = ("tools/call", "resources/read")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
URL_KEYS = ("url", "path", "endpoint", "uri", "href", "route")
BODY_KEYS = ("body", "json", "data", "payload")
TOOL_SEPARATORS = "_-./"


# what a request is, as a command


def command(op: Operation, request: Request, host: str) -> list[Form] | None:
    """The forms of the command a request carries; None when it is not a command."""
    d = op.details
    if op.protocol == "postgres":
        sql = op.payload.get("sql") if isinstance(op.payload, dict) else None
        parts = op.parts or (op,)
        if d.get("phase") not in ("execute", "describe") or not isinstance(sql, str) or not sql.strip() or all(
                p.details.get("command") in TRANSACTION_CONTROL for p in parts):
            return None
        return [Form("sql", _sql_exact(sql), derive=functools.partial(sql_normal, sql))]
    if op.protocol == "ssh":
        line = d.get("line")
        if d.get("phase") not in ("exec", "shell") or not isinstance(line, str) or not line.strip():
            return None
        return [Form("words", line.strip(), words(line))]
    if op.protocol == "mcp":
        if d.get("method") not in MCP_COMMANDS:
            return None
        if d["method"] == "resources/read":
            return [Form("uri", op.resource, None)]
        return [Form("mcp", (d.get("tool"), canonical_json(op.payload if op.payload is not None else {})), None)]
    if op.protocol == "kubernetes":
        if not d.get("resource_request"):
            path = d.get("path", "")
            if d.get("method") == "GET" and any(path == p or path.startswith(p + "/") for p in DISCOVERY):
                return None
            return _http(request, host)
        return [*_kubernetes(d), *_http(request, host)]
    if op.protocol == "http":
        return _http(request, host)
    return None


def _sql_exact(sql: str) -> str:
    return sql.strip().rstrip(";").strip()


@functools.lru_cache(maxsize=4096)
def sql_normal(sql: str) -> tuple[str, ...] | None:
    """Each statement's parse tree as canonical text; None when it does not parse."""
    try:
        return tuple(RawStream()(s) for s in pglast.parse_sql(sql)) or None
    except Exception:  # pglast raises ParseError, and its deparser others on what it cannot print
        return None


@functools.lru_cache(maxsize=4096)
def words(line: str) -> tuple[str, ...] | None:
    """The line's words as bash splits them; None when the gate cannot read it."""
    try:
        return tuple(str(w) for w in shell.words(line)) or None
    except shell.Unclassifiable:
        return None


def _http(request: Request, host: str) -> list[Form]:
    method = request.method.upper()
    path, _, query = request.target.partition("?")
    body = request.content or b""
    return [Form("http", (method, request.target, body), (method, normalise_path(path or "/"), _query(query),
                                                          _canonical_body(body)))]


def _query(query: str) -> tuple:
    return tuple(sorted(parse_qsl(query, keep_blank_values=True)))


def _canonical_body(body: bytes | str) -> str | None:
    if not body:
        return None
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        return canonical_json(json.loads(text))
    except ValueError:
        return text


def _kubernetes(d: dict[str, Any]) -> list[Form]:
    namespace = "ALL" if d.get("every_namespace") else d.get("namespace", "")
    where = (d.get("verb"), d.get("resource"), d.get("subresource", ""))
    return [Form("kubectl", None, (*where, namespace, d.get("name", ""))),
            Form("kubectl", None, (*where, "*", d.get("name", "")))]


# what a tool call could have asked for


def asked_forms(a: Asked, host: str) -> Iterator[Form]:
    """Every form the tool call's arguments could mean (see the module's docstring)."""
    arguments = canonical_json(a.arguments)
    for tool in tool_names(a.tool):
        yield Form("mcp", (tool, arguments), None)
    for text in _strings(a.arguments):
        yield Form("sql", _sql_exact(text), derive=functools.partial(sql_normal, text))
        said = words(text)
        yield Form("words", text.strip(), said)
        yield Form("uri", text, None)
        if said and (said[0] == "kubectl" or a.tool.lower().endswith("kubectl")):
            if (asked := kubectl(said[1:] if said[0] == "kubectl" else said)) is not None:
                yield Form("kubectl", None, asked)
        if said and said[0] == "curl":
            yield from _curl(said[1:], host)
        if text.startswith(("/", "http://", "https://")):
            yield from _request("GET", text, None, host)
    for node in _objects(a.arguments):
        method = next((str(node[k]).upper() for k in ("method", "http_method", "verb")
                       if isinstance(node.get(k), str) and str(node[k]).upper() in METHODS), "GET")
        target = next((node[k] for k in URL_KEYS if isinstance(node.get(k), str)), None)
        if target is not None:
            body = next((node[k] for k in BODY_KEYS if k in node and node[k] is not None), None)
            yield from _request(method, target, body, host)


def tool_names(name: str) -> Iterator[str]:
    """The MCP tools a model's tool name may name: itself, and what follows each separator
    in it (CrewAI calls a desk's `search_tickets` `tickets_mcp_internal_mcp_search_tickets`)."""
    yield name
    for n, ch in enumerate(name):
        if ch in TOOL_SEPARATORS and name[n + 1:]:
            yield name[n + 1:]


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _objects(v)
    elif isinstance(node, list):
        for v in node:
            yield from _objects(v)


def _request(method: str, target: str, body: Any, host: str) -> Iterator[Form]:
    """An HTTP request a model named: a path, or a URL on the request's own host."""
    parts = urlsplit(target)
    if parts.scheme:
        if parts.scheme not in ("http", "https") or (parts.hostname or "").lower() != host.lower():
            return
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    elif not target.startswith("/"):
        return
    if body is None:
        exact_body, normal_body = b"", None
    elif isinstance(body, str):
        exact_body, normal_body = body.encode(), _canonical_body(body)
    else:  # what requests' json= and httpx's json= send
        exact_body, normal_body = json.dumps(body).encode(), canonical_json(body)
    path, _, query = target.partition("?")
    yield Form("http", (method, target, exact_body), (method, normalise_path(path or "/"), _query(query), normal_body))


CURL_DATA = ("-d", "--data", "--data-raw", "--data-binary", "--json")


def _curl(argv: tuple[str, ...], host: str) -> Iterator[Form]:
    method, url, body, i = "", "", None, 0
    while i < len(argv):
        word = argv[i]
        if word in ("-X", "--request") and i + 1 < len(argv):
            method, i = argv[i + 1].upper(), i + 2
        elif word in CURL_DATA and i + 1 < len(argv):
            body, i = argv[i + 1], i + 2
        elif word in ("-H", "--header", "-u", "--user", "-o", "--output", "-x", "--proxy") and i + 1 < len(argv):
            i += 2
        elif word.startswith(("http://", "https://", "/")):
            url, i = word, i + 1
        else:
            i += 1
    if url:
        yield from _request(method or ("POST" if body is not None else "GET"), url, body, host)


# kubectl

RESOURCES = {
    "po": "pods", "pod": "pods", "svc": "services", "service": "services", "deploy": "deployments",
    "deployment": "deployments", "ns": "namespaces", "namespace": "namespaces", "cm": "configmaps",
    "configmap": "configmaps", "secret": "secrets", "no": "nodes", "node": "nodes", "ev": "events", "event": "events",
    "rs": "replicasets", "replicaset": "replicasets", "sts": "statefulsets", "statefulset": "statefulsets",
    "ds": "daemonsets", "daemonset": "daemonsets", "job": "jobs", "cj": "cronjobs", "cronjob": "cronjobs",
    "ing": "ingresses", "ingress": "ingresses", "pvc": "persistentvolumeclaims",
    "persistentvolumeclaim": "persistentvolumeclaims", "pv": "persistentvolumes", "persistentvolume": "persistentvolumes",
    "sa": "serviceaccounts", "serviceaccount": "serviceaccounts",
}
VALUE_FLAGS = frozenset({"-n", "--namespace", "-o", "--output", "-l", "--selector", "-c", "--container",
                         "--field-selector", "--sort-by", "--template", "-L", "--label-columns", "--chunk-size",
                         "--request-timeout", "--context", "--cluster", "--user", "--kubeconfig", "-f", "--filename",
                         "--since", "--tail", "--timeout", "--grace-period"})


def _resource(word: str) -> str:
    name = word.lower().split(".", 1)[0]
    return RESOURCES.get(name, name)


def kubectl(argv: tuple[str, ...]) -> tuple | None:
    """What kubectl's words ask the API server for: (verb, resource, subresource,
    namespace, name); None for what this reading does not cover."""
    namespace, watch, everything, rest, i = "*", False, False, [], 0
    while i < len(argv):
        word = argv[i]
        flag, eq, value = word.partition("=")
        if flag in ("-n", "--namespace"):
            namespace, i = (value, i + 1) if eq else (argv[i + 1] if i + 1 < len(argv) else "", i + 2)
        elif flag in VALUE_FLAGS:
            i += 1 if eq else 2
        elif word in ("-A", "--all-namespaces"):
            namespace, i = "ALL", i + 1
        elif word in ("-w", "--watch"):
            watch, i = True, i + 1
        elif word == "--all":
            everything, i = True, i + 1
        elif word.startswith("-"):
            i += 1
        else:
            rest.append(word)
            i += 1
    if not rest:
        return None
    verb, targets = rest[0], rest[1:]
    if verb == "logs" and targets:
        name = targets[0].split("/", 1)[1] if targets[0].startswith(("pod/", "pods/")) else targets[0]
        return "get", "pods", "log", namespace, name
    if verb not in ("get", "describe", "delete") or not targets:
        return None
    if "/" in targets[0]:
        kind, _, name = targets[0].partition("/")
        resource = _resource(kind)
    else:
        resource, name = _resource(targets[0]), targets[1] if len(targets) > 1 else ""
    if verb == "delete":
        return ("delete" if name and not everything else "deletecollection"), resource, "", namespace, name
    return ("watch" if watch else "get" if name else "list"), resource, "", namespace, name
