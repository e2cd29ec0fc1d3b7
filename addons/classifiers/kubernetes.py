"""Kubernetes classification: what a request to an API server does, as the server sees it.

`request_info` follows the API server's own RequestInfoFactory (k8s.io/apiserver,
endpoints/request/requestinfo.go): API prefix, group, version, the `watch`/`proxy` special
verbs, namespaces and their `status`/`finalize` subresources, resource/name/subresource,
`get` turned into `list` or `watch` (with a `metadata.name` field selector naming the
object), `delete` without a name turned into `deletecollection`. The path is decoded and
its duplicate and trailing slashes removed first (paths with dot segments never get here:
classify refuses them), so no spelling of a path reaches a different rule than the server's.

The action follows what the request can do: reads (get/list/watch, logs, dry-runs), writes,
deletes, `exec` (exec, attach, port-forward, proxy, ephemeral containers: running code in
the cluster) and `admin` (impersonation, tokens, RBAC).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from addons.classifiers.http import normalise_path, parse_json_body
from addons.engine.model import UNPARSEABLE, Operation, Request

SPECIAL_VERBS = ("proxy", "watch")
NAMESPACE_SUBRESOURCES = ("status", "finalize")
VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
EXEC_SUBRESOURCES = ("exec", "attach", "portforward", "proxy", "ephemeralcontainers")
ADMIN_RESOURCES = ("roles", "rolebindings", "clusterroles", "clusterrolebindings", "certificatesigningrequests",
                   "tokenreviews", "subjectaccessreviews", "mutatingwebhookconfigurations",
                   "validatingwebhookconfigurations")
RISK = {"read": 10, "write": 40, "delete": 70, "exec": 80, "admin": 90, "unknown": 90}


@dataclass(frozen=True)
class RequestInfo:
    verb: str
    path: str
    resource_request: bool = False
    api_prefix: str = ""
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    parts: tuple[str, ...] = ()


GO_FALSE = ("", "0", "f", "F", "FALSE", "false", "False")


def flag(query: dict[str, list[str]], name: str) -> bool:
    """A boolean query parameter as the API server reads it (Go's strconv.ParseBool). A
    value it cannot parse counts as set: the server refuses it, and the gateway assumes
    the riskier reading (a watch is a stream, a list is not)."""
    values = query.get(name)
    return bool(values) and values[0] not in GO_FALSE


def _name_from_field_selector(values: list[str]) -> str:
    """`metadata.name=foo` (and nothing else) names the object a list or watch is about."""
    if len(values) != 1 or "," in values[0]:
        return ""
    key, sep, value = values[0].partition("==") if "==" in values[0] else values[0].partition("=")
    return value if sep and key.strip() == "metadata.name" and "/" not in value else ""


def request_info(method: str, path: str, query: dict[str, list[str]]) -> RequestInfo:
    """What the API server makes of METHOD PATH?QUERY (path already decoded)."""
    parts = [p for p in path.strip("/").split("/") if p]
    verb = method.lower()
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return RequestInfo(verb=verb, path=path)
    prefix, parts = parts[0], parts[1:]
    group = ""
    if prefix == "apis":
        if len(parts) < 3:
            return RequestInfo(verb=verb, path=path)
        group, parts = parts[0], parts[1:]
    version, parts = parts[0], parts[1:]
    if parts[0] in SPECIAL_VERBS:
        if len(parts) < 2:
            return RequestInfo(verb=verb, path=path, resource_request=True, api_prefix=prefix, api_group=group,
                               api_version=version)
        verb, parts = parts[0], parts[1:]
    else:
        verb = VERBS.get(method.upper(), "")
    namespace = ""
    if parts[0] == "namespaces" and len(parts) > 1:
        namespace = parts[1]
        if len(parts) > 2 and parts[2] not in NAMESPACE_SUBRESOURCES:
            parts = parts[2:]
    resource = parts[0]
    name = parts[1] if len(parts) >= 2 else ""
    subresource = parts[2] if len(parts) >= 3 and verb != "proxy" else ""
    if not name and verb == "get":
        verb = "watch" if flag(query, "watch") else "list"
    if not name and verb in ("list", "watch"):
        name = _name_from_field_selector(query.get("fieldSelector", []))
    if not name and verb == "delete":
        verb = "deletecollection"
    return RequestInfo(verb=verb, path=path, resource_request=True, api_prefix=prefix, api_group=group,
                       api_version=version, namespace=namespace, resource=resource, subresource=subresource,
                       name=name, parts=tuple(parts))


@dataclass(frozen=True)
class Impersonation:
    user: str = ""
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.user or self.uid or self.groups or self.extra)


def impersonation(headers: dict[str, list[str]]) -> Impersonation:
    """The Impersonate-* headers a client sent (kubectl --as / --as-group / --as-uid)."""
    return Impersonation(
        user=(headers.get("impersonate-user") or [""])[0],
        uid=(headers.get("impersonate-uid") or [""])[0],
        groups=tuple(headers.get("impersonate-group", [])),
        extra={k[len("impersonate-extra-"):]: ",".join(v) for k, v in headers.items() if k.startswith("impersonate-extra-")},
    )


def action_of(info: RequestInfo, dry_run: bool, imp: Impersonation) -> str:
    if imp:
        return "admin"
    if not info.resource_request:
        return "read" if info.verb in ("get", "head", "options") else "unknown"
    if info.subresource in EXEC_SUBRESOURCES or info.verb == "proxy":
        return "exec"
    if (info.resource, info.subresource) == ("serviceaccounts", "token") or info.resource in ADMIN_RESOURCES:
        return "read" if info.verb in ("get", "list", "watch") else "admin"
    if info.verb in ("get", "list", "watch") or dry_run:
        return "read"
    if info.verb in ("create", "update", "patch"):
        return "delete" if info.subresource == "eviction" else "write"
    if info.verb in ("delete", "deletecollection"):
        return "delete"
    return "unknown"


def classify(connection: str, method: str, target: str, headers: dict[str, list[str]], content: bytes | None) -> Operation:
    """The Operation for one request to a Kubernetes API server. `headers` keys are lower-case."""
    raw_path, _, raw_query = target.partition("?")
    path = normalise_path(raw_path or "/")
    query = parse_qs(raw_query, keep_blank_values=True)
    info = request_info(method, path, query)
    imp = impersonation(headers)
    dry_run = bool(query.get("dryRun")) and query["dryRun"][0] != ""
    action = action_of(info, dry_run, imp)
    risk = RISK[action] + (20 if info.resource == "secrets" and action == "read" else 0)
    if (info.resource, info.verb) == ("namespaces", "delete"):
        risk = 95
    details: dict[str, Any] = {
        "method": method.upper(), "path": path, "query": raw_query, "verb": info.verb,
        "resource_request": info.resource_request, "api_group": info.api_group, "api_version": info.api_version,
        "namespace": info.namespace, "resource": info.resource, "subresource": info.subresource, "name": info.name,
        "dry_run": dry_run,
    }
    if imp:
        details["impersonate"] = {"user": imp.user, "uid": imp.uid, "groups": list(imp.groups), "extra": imp.extra}
    details["stream"] = info.verb == "watch" or (info.subresource == "log" and flag(query, "follow"))
    if info.subresource in ("exec", "attach"):
        details["command"] = query.get("command", [])
        details["container"] = (query.get("container") or [""])[0]
    payload = parse_json_body(content, (headers.get("content-type") or [""])[0])
    details["body"] = ("none" if not content else "unparseable" if payload is UNPARSEABLE
                       else "json" if payload is not None else "other")
    resource = "/".join(x for x in (info.resource, info.subresource) if x) if info.resource_request else path
    where = f" in {info.namespace}" if info.namespace else ""
    what = f"{resource}/{info.name}" if info.name and info.subresource == "" else (
        f"{info.resource}/{info.name}/{info.subresource}" if info.name else resource)
    if info.subresource in ("exec", "attach"):
        command = " ".join(details["command"]) or "(attach)"
        summary = f"{info.subresource} in {info.resource}/{info.name}{where} on {connection}: {command}"
    else:
        summary = f"{info.verb} {what}{where} on {connection}" + (" (dry run)" if dry_run else "")
    if imp:
        summary += f" as {imp.user or imp.uid or ','.join(imp.groups)}"
    return Operation(protocol="kubernetes", connection=connection, action=action, resource=resource, risk=risk,
                     summary=summary, details=details, payload=payload)


def from_request(connection: str, request: Request) -> Operation:
    return classify(connection, request.method, request.target, request.header_lists(), request.content)
