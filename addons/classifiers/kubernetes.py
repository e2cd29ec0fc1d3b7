"""Kubernetes classification: what a request to an API server does, as the server sees it.

`request_info` follows the API server's own RequestInfoFactory (k8s.io/apiserver,
endpoints/request/requestinfo.go): API prefix, group, version, the `watch`/`proxy` special
verbs, namespaces and their `status`/`finalize` subresources, resource/name/subresource,
`get` turned into `list` or `watch` (with a `metadata.name` field selector naming the
object), `delete` without a name turned into `deletecollection`.

Everything else the server takes from the request is read where the server reads it:

- the query as Go's net/url parses it (`go_query`), its booleans as apimachinery converts
  them (`flag`: only "0" and "false" are false, an empty value is true);
- dry run from the query for create, update and patch, but for DELETE from a non-empty
  body, whose DeleteOptions replace the query (handlers/delete.go); a body the gateway
  cannot read is not a dry run;
- the patch type from Content-Type (handlers/patch.go): a JSON patch is a list of
  operations, not the object, so no body condition can judge it;
- the name of a created object from its body (handlers/create.go);
- legacy `/api/v1/proxy/...` paths as the proxy subresource they stood for.

The scope of a request is part of its reading: a request without a namespace for a
namespaced resource (a list or watch across all namespaces) reaches every namespace, and
one without a name (a list, a watch, a collection delete, a create whose name is unknown)
reaches every object of its collection (`every_namespace`, `every_name`; addons/engine/
rules.py says what rules make of them).

The path is decoded and its duplicate and trailing slashes removed first (paths with dot
segments never get here: classify refuses them). The API server itself keeps an empty
segment, and reads `/namespaces//pods` as pods in every namespace (go-restful matches an
empty path parameter); when the two readings differ, the Operation carries both as parts,
and policy decides each.

The action follows what the request can do: reads (get/list/watch, logs, dry runs), writes,
deletes, `exec` (exec, attach, port-forward, proxy, ephemeral containers: running code in
the cluster) and `admin` (impersonation, tokens, RBAC).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

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
CLUSTER_SCOPED = frozenset({
    ("", "componentstatuses"), ("", "nodes"), ("", "persistentvolumes"),
    *(("admissionregistration.k8s.io", r) for r in (
        "mutatingwebhookconfigurations", "validatingwebhookconfigurations", "validatingadmissionpolicies",
        "validatingadmissionpolicybindings", "mutatingadmissionpolicies", "mutatingadmissionpolicybindings")),
    ("apiextensions.k8s.io", "customresourcedefinitions"), ("apiregistration.k8s.io", "apiservices"),
    ("authentication.k8s.io", "selfsubjectreviews"), ("authentication.k8s.io", "tokenreviews"),
    *(("authorization.k8s.io", r) for r in ("selfsubjectaccessreviews", "selfsubjectrulesreviews",
                                             "subjectaccessreviews")),
    ("certificates.k8s.io", "certificatesigningrequests"), ("certificates.k8s.io", "clustertrustbundles"),
    ("flowcontrol.apiserver.k8s.io", "flowschemas"), ("flowcontrol.apiserver.k8s.io", "prioritylevelconfigurations"),
    *(("networking.k8s.io", r) for r in ("ingressclasses", "ipaddresses", "servicecidrs")),
    ("node.k8s.io", "runtimeclasses"), ("scheduling.k8s.io", "priorityclasses"),
    ("rbac.authorization.k8s.io", "clusterroles"), ("rbac.authorization.k8s.io", "clusterrolebindings"),
    *(("storage.k8s.io", r) for r in ("csidrivers", "csinodes", "storageclasses", "volumeattachments",
                                       "volumeattributesclasses")),
    ("resource.k8s.io", "deviceclasses"), ("resource.k8s.io", "resourceslices"),
    ("storagemigration.k8s.io", "storageversionmigrations"), ("internal.apiserver.k8s.io", "storageversions"),
})
"""The built-in resources without a namespace (`kubectl api-resources --namespaced=false`).
Namespaces are not among them: a Namespace object is in its own namespace (RequestInfo gives
/api/v1/namespaces/prod the namespace prod), so a list of them reaches every namespace. A
resource not named here (a custom resource, say) is taken to be namespaced."""
DRY_RUN_ALL = "All"
JSON_PATCH = "application/json-patch+json"
OBJECT_PATCHES = ("application/merge-patch+json", "application/strategic-merge-patch+json",
                  "application/apply-patch+yaml")
OPTIONS_TYPES = ("", "application/json", "application/yaml")
"""Content types of a DeleteOptions body the gateway reads as the server does (an empty one
is JSON: negotiation.NegotiateInputSerializerForMediaType); protobuf and CBOR it cannot."""


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


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _go_unescape(text: str) -> str | None:
    """url.QueryUnescape: `+` is a space, a `%` not followed by two hex digits is an error."""
    if _BAD_ESCAPE.search(text):
        return None
    return unquote_to_bytes(text.replace("+", " ")).decode("utf-8", "surrogateescape")


def go_query(raw: str) -> dict[str, list[str]]:
    """The query as the API server holds it (Go's url.ParseQuery, net/url parseQuery):
    pairs split on `&` only; a pair holding a `;` or a bad escape is dropped, not kept."""
    query: dict[str, list[str]] = {}
    for pair in raw.split("&"):
        if not pair or ";" in pair:
            continue
        key, _, value = pair.partition("=")
        key, value = _go_unescape(key), _go_unescape(value)
        if key is not None and value is not None:
            query.setdefault(key, []).append(value)
    return query


def flag(query: dict[str, list[str]], name: str) -> bool:
    """A boolean query parameter as the API server reads it (apimachinery runtime/
    conversion.go, Convert_Slice_string_To_bool): absent, "0" or "false" in any case is
    false; anything else, an empty value or a word included, is true."""
    values = query.get(name)
    return bool(values) and values[0] != "0" and values[0].casefold() != "false"


def dry_run(values: list[str]) -> bool:
    """Whether a dryRun list makes the server rehearse: it refuses any value but "All"
    (meta/v1/validation ValidateDryRun) and rehearses when the list is not empty
    (util/dryrun IsDryRun). A list the server refuses is no dry run to the gateway."""
    return bool(values) and all(v == DRY_RUN_ALL for v in values)


def _name_from_field_selector(values: list[str]) -> str:
    """`metadata.name=foo` (and nothing else) names the object a list or watch is about,
    when the name is a valid path segment (content.IsPathSegmentName). The server reads
    more (one exact term among several); reading less leaves the request reaching every
    name, which is the stricter reading."""
    if len(values) != 1 or "," in values[0] or "\\" in values[0]:
        return ""
    key, sep, value = values[0].partition("==") if "==" in values[0] else values[0].partition("=")
    valid = value not in (".", "..") and not any(c in value for c in "/%")
    return value if sep and key == "metadata.name" and valid else ""


def _segments(path: str) -> list[str]:
    """requestinfo.go splitPath: outer slashes trimmed, empty inner segments kept."""
    trimmed = path.strip("/")
    return trimmed.split("/") if trimmed else []


def request_info(method: str, path: str, query: dict[str, list[str]]) -> RequestInfo:
    """What the API server makes of METHOD PATH?QUERY (path already decoded)."""
    parts = _segments(path)
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


def served_path(raw_path: str) -> str | None:
    """The path as the API server routes it: decoded once (Go's URL.Path), empty segments
    kept; None when its prefix is not one the server serves (`/api//v1`, `//api`: 404)."""
    path = unquote(raw_path)
    segments = path.split("/")
    width = 3 if segments[1:2] == ["api"] else 4 if segments[1:2] == ["apis"] else 0
    if width == 0 or len(segments) <= width or "" in segments[1:width]:
        return None
    return path


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


def _media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


def delete_dry_run(content: bytes | None, content_type: str, query: dict[str, list[str]]) -> bool:
    """DeleteResource and DeleteCollection (handlers/delete.go) decode DeleteOptions from a
    non-empty body and ignore the query then; only an empty body leaves them to the query.
    A body the gateway cannot read as the server would (not JSON, duplicate keys, a dryRun
    field spelt in another case that a case-insensitive decoder could take) is no dry run."""
    if not content:
        return dry_run(query.get("dryRun", []))
    options = parse_json_body(content, "application/json") if _media_type(content_type) in OPTIONS_TYPES else None
    if not isinstance(options, dict) or any(k.lower() == "dryrun" and k != "dryRun" for k in options):
        return False
    values = options.get("dryRun")
    return isinstance(values, list) and all(isinstance(v, str) for v in values) and dry_run(values)


def body_kind(method: str, content: bytes | None, content_type: str, payload: Any) -> str:
    """What the body is to body conditions: `none`, `json` (the object, or the part of it a
    merge patch sets), `unparseable`, `other` (not JSON, or a patch type the server refuses:
    handlers/patch.go takes the type from Content-Type, up to any `;`, as sent), or
    `json-patch` (operations, not the object)."""
    if not content:
        return "none"
    if payload is UNPARSEABLE:
        return "unparseable"
    if method.upper() == "PATCH":
        patch_type = content_type.split(";", 1)[0]
        if patch_type == JSON_PATCH:
            return "json-patch"
        if patch_type not in OBJECT_PATCHES:
            return "other"
    return "json" if payload is not None else "other"


def _created_name(payload: Any) -> str:
    """metadata.name of the object a create sends; "" when the gateway cannot read it (a
    body not JSON, or only a generateName, which the server completes at random)."""
    meta = payload.get("metadata") if isinstance(payload, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else ""


def _reading(connection: str, method: str, path: str, raw_query: str, query: dict[str, list[str]],
             headers: dict[str, list[str]], content: bytes | None) -> Operation:
    """The Operation for one reading of the path."""
    info = request_info(method, path, query)
    if info.verb == "proxy":  # /api/v1/proxy/...: no route since the proxy subresource replaced it
        info = replace(info, subresource="proxy")
    content_type = (headers.get("content-type") or [""])[0]
    payload = parse_json_body(content, content_type)
    if info.verb == "create" and not info.name and not info.subresource:
        info = replace(info, name=_created_name(payload))
        if (info.api_group, info.resource) == ("", "namespaces"):
            info = replace(info, namespace=info.name)  # create.go: a new namespace is its own
    imp = impersonation(headers)
    if info.verb in ("delete", "deletecollection"):
        rehearsal = delete_dry_run(content, content_type, query)
    else:
        rehearsal = info.verb in ("create", "update", "patch") and dry_run(query.get("dryRun", []))
    action = action_of(info, rehearsal, imp)
    risk = RISK[action] + (20 if info.resource == "secrets" and action == "read" else 0)
    if (info.resource, info.verb) == ("namespaces", "delete"):
        risk = 95
    every_namespace = info.resource_request and not info.namespace and (info.api_group, info.resource) not in CLUSTER_SCOPED
    details: dict[str, Any] = {
        "method": method.upper(), "path": path, "query": raw_query, "verb": info.verb,
        "resource_request": info.resource_request, "api_group": info.api_group, "api_version": info.api_version,
        "namespace": info.namespace, "resource": info.resource, "subresource": info.subresource, "name": info.name,
        "every_namespace": every_namespace, "every_name": info.resource_request and not info.name,
        "dry_run": rehearsal,
    }
    if imp:
        details["impersonate"] = {"user": imp.user, "uid": imp.uid, "groups": list(imp.groups), "extra": imp.extra}
    details["stream"] = info.verb == "watch" or (info.subresource == "log" and flag(query, "follow"))
    if info.subresource in ("exec", "attach"):
        details["command"] = query.get("command", [])
        details["container"] = (query.get("container") or [""])[0]
    details["body"] = body_kind(method, content, content_type, payload)
    resource = (info.resource + (f"/{info.subresource}" if info.subresource else "")) if info.resource_request else path
    where = " in every namespace" if every_namespace else f" in {info.namespace}" if info.namespace else ""
    what = f"{resource}/{info.name}" if info.name and info.subresource == "" else (
        f"{info.resource}/{info.name}/{info.subresource}" if info.name else resource)
    if info.subresource in ("exec", "attach"):
        command = " ".join(details["command"]) or "(attach)"
        summary = f"{info.subresource} in {info.resource}/{info.name}{where} on {connection}: {command}"
    else:
        summary = f"{info.verb} {what}{where} on {connection}" + (" (dry run)" if rehearsal else "")
    if imp:
        summary += f" as {imp.user or imp.uid or ','.join(imp.groups)}"
    return Operation(protocol="kubernetes", connection=connection, action=action, resource=resource, risk=risk,
                     summary=summary, details=details, payload=payload)


READING = ("verb", "api_group", "api_version", "namespace", "resource", "subresource", "name", "every_namespace")


def classify(connection: str, method: str, target: str, headers: dict[str, list[str]], content: bytes | None) -> Operation:
    """The Operation for one request to a Kubernetes API server. `headers` keys are lower-case.

    When the server's own reading of the path (`served_path`) differs from the normalised
    one, the gateway cannot know which one a proxy in between leaves to the server, so the
    Operation has both as parts: policy decides each, and the strictest decision wins."""
    raw_path, _, raw_query = target.partition("?")
    query = go_query(raw_query)
    op = _reading(connection, method, normalise_path(raw_path or "/"), raw_query, query, headers, content)
    served = served_path(raw_path or "/")
    if served is None or _segments(served) == _segments(op.details["path"]):
        return op
    other = _reading(connection, method, served, raw_query, query, headers, content)
    if other.details["resource_request"] and not other.details["resource"]:
        return op  # an empty segment where the server's routes have fixed words: no route, 404
    if all(op.details[k] == other.details[k] for k in READING):
        return op
    riskier = max(op, other, key=lambda o: o.risk)
    return replace(op, action=riskier.action, risk=riskier.risk, parts=(op, other),
                   summary=f"{op.summary}, or as the API server reads the path: {other.summary}",
                   details={**op.details, "stream": op.details["stream"] or other.details["stream"]})


def from_request(connection: str, request: Request) -> Operation:
    return classify(connection, request.method, request.target, request.header_lists(), request.content)
