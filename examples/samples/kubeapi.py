"""A Kubernetes API test server, answering the way a real API server does.

No real API server can run on these machines, so this one is written against the
Kubernetes API reference (api-concepts, the core/v1 and apps/v1 references, the
remote-command WebSocket protocol) for what `kubectl` and client libraries use:

- TLS, bearer-token or client-certificate authentication (401 Status otherwise);
- legacy discovery (`/api`, `/api/v1`, `/apis`, `/apis/apps/v1`), `/version`, health;
- namespaces, pods, secrets, configmaps and deployments: get, list (label and field
  selectors, `limit`/`continue`), watch (`?watch=true` and the deprecated `/watch/` paths,
  from a resourceVersion), create, update, patch (JSON merge, strategic merge as a merge,
  JSON patch, server-side apply), delete, deletecollection, `dryRun`;
- the query as Go parses it, its booleans as apimachinery converts them; dryRun checked
  (only "All"), and for DELETE taken from a non-empty DeleteOptions body, the query then
  ignored, as handlers/delete.go does;
- lists and watches across all namespaces (`/api/v1/pods`, `/api/v1/watch/pods`, and an
  empty namespace segment, which the real server reads as every namespace too); no
  legacy `/api/v1/proxy/...` routes (404: installer.go registers no proxy-verb route);
- Table responses for `Accept: application/json;as=Table;v=v1;g=meta.k8s.io`, with
  `includeObject`, in lists, single gets and watch events;
- pod logs (`follow` streams lines as the test adds them);
- exec over WebSocket (`v5`/`v4.channel.k8s.io`): stdin, stdout, stderr, and the error
  channel's Status with the exit code;
- errors as Status objects with the real reasons and codes;
- protobuf for clients that prefer it (a stand-in: the magic number, then opaque bytes).

Every request that reached it is kept in `received`, so tests can assert what did not.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import json
import re
import ssl
import threading
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

import yaml
from aiohttp import WSMsgType, web


@dataclass
class Kind:
    group: str
    version: str
    resource: str
    kind: str
    namespaced: bool
    short: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = [
    Kind("", "v1", "namespaces", "Namespace", False, ("ns",), ("status", "finalize")),
    Kind("", "v1", "pods", "Pod", True, ("po",), ("status", "log", "exec", "attach", "portforward",
                                                  "ephemeralcontainers", "eviction", "binding", "proxy")),
    Kind("", "v1", "secrets", "Secret", True),
    Kind("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    Kind("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",), ("token",)),
    Kind("apps", "v1", "deployments", "Deployment", True, ("deploy",), ("status", "scale")),
]
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
PROTOBUF = "application/vnd.kubernetes.protobuf"
HISTORY = 10_000
EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
                  "channel.k8s.io")
TABLE_COLUMNS = {
    "pods": [("Name", "string", "name"), ("Ready", "string", ""), ("Status", "string", ""),
             ("Restarts", "string", ""), ("Age", "string", "")],
    "secrets": [("Name", "string", "name"), ("Type", "string", ""), ("Data", "string", ""), ("Age", "string", "")],
    "configmaps": [("Name", "string", "name"), ("Data", "string", ""), ("Age", "string", "")],
    "namespaces": [("Name", "string", "name"), ("Status", "string", ""), ("Age", "string", "")],
    "serviceaccounts": [("Name", "string", "name"), ("Secrets", "string", ""), ("Age", "string", "")],
    "deployments": [("Name", "string", "name"), ("Ready", "string", ""), ("Up-to-date", "string", ""),
                    ("Available", "string", ""), ("Age", "string", "")],
}


@dataclass
class Received:
    method: str
    path: str  # as sent, still encoded, with the query
    headers: dict[str, str]
    body: bytes
    user: str


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details


def status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(stamp: str) -> str:
    then = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    seconds = int((datetime.datetime.now(datetime.timezone.utc) - then).total_seconds())
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (strategic merge patches are applied the same way here:
    the test objects have no lists that merge by key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json_patch(target: Any, operations: list[dict]) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, test."""
    doc = copy.deepcopy(target)
    for op in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if op["op"] == "test":
            current = node[int(last)] if isinstance(node, list) else node.get(last)
            if current != op["value"]:
                raise ApiError(422, "Invalid", f"the test operation on {op['path']} failed")
        elif op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        elif op["op"] in ("add", "replace"):
            if isinstance(node, list):
                index = len(node) if last == "-" else int(last)
                node.insert(index, op["value"]) if op["op"] == "add" else node.__setitem__(index, op["value"])
            else:
                node[last] = op["value"]
        else:
            raise ApiError(400, "BadRequest", f"unsupported JSON patch operation {op['op']!r}")
    return doc


def parse_query(raw: str) -> dict[str, list[str]]:
    """The query as the API server's url.Values holds it (Go's net/url parseQuery): pairs
    split on `&`; one holding a `;` or a `%` not followed by two hex digits is dropped."""
    query: dict[str, list[str]] = {}
    for pair in raw.split("&"):
        if not pair or ";" in pair or re.search(r"%(?![0-9A-Fa-f]{2})", pair):
            continue
        key, _, value = (unquote_to_bytes(x.replace("+", " ")).decode("utf-8", "replace") for x in pair.partition("="))
        query.setdefault(key, []).append(value)
    return query


def query_bool(query: dict[str, list[str]], name: str) -> bool:
    """A boolean query parameter (apimachinery runtime/conversion.go Convert_Slice_string_To_bool,
    which every options conversion from url.Values uses): only absent, "0" and "false" in
    any case are false; an empty value or any word is true. The server never refuses one."""
    values = query.get(name) or []
    return bool(values) and values[0] != "0" and values[0].lower() != "false"


def dry_run(values: list[str] | None, kind: str) -> bool:
    """meta/v1/validation ValidateDryRun (only "All"), then util/dryrun IsDryRun (non-empty)."""
    if values is not None and not isinstance(values, list):
        raise ApiError(400, "BadRequest", f"json: cannot unmarshal {type(values).__name__} into Go struct field "
                                          f"{kind}.dryRun of type []string")
    values = values or []
    if any(v != "All" for v in values):
        shown = ", ".join(f'"{v}"' for v in values)
        raise ApiError(422, "Invalid", f'{kind}.meta.k8s.io "" is invalid: dryRun: Unsupported value: '
                                       f'[]string{{{shown}}}: supported values: "All"',
                       {"group": "meta.k8s.io", "kind": kind,
                        "causes": [{"reason": "FieldValueNotSupported", "field": "dryRun"}]})
    return bool(values)


def matches_labels(obj: dict, selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def matches_fields(obj: dict, selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        negate = "!=" in term
        k, v = term.replace("!=", "=").replace("==", "=").split("=", 1)
        actual = {"metadata.name": obj["metadata"]["name"],
                  "metadata.namespace": obj["metadata"].get("namespace", ""),
                  "status.phase": (obj.get("status") or {}).get("phase", "")}.get(k.strip())
        if actual is None:
            raise ApiError(400, "BadRequest", f'"{k}" is not a known field selector: only "metadata.name", '
                                              f'"metadata.namespace"')
        if (actual == v.strip()) == negate:
            return False
    return True


@dataclass
class Target:
    kind: Kind
    namespace: str = ""
    name: str = ""
    subresource: str = ""
    watch_path: bool = False
    namespace_path: bool = False  # /namespaces/{namespace}/... (the namespace may be empty)

    @property
    def every_namespace(self) -> bool:
        return self.kind.namespaced and not self.namespace


@dataclass
class Watcher:
    kind: Kind
    namespace: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class KubeAPI:
    """The server. Start it, seed objects with `put`, add log lines with `log`, and read
    `received` for what reached it. `exec_handler` answers exec commands (see `run`)."""

    def __init__(self, tls: tuple[Path, Path], token: str, client_ca: Path | None = None, port: int = 0) -> None:
        self.token, self.port = token, port
        self.received: list[Received] = []
        self.objects: dict[str, dict[tuple[str, str], dict]] = {k.resource: {} for k in KINDS}
        self.resource_version = 100
        self.watchers: list[Watcher] = []
        self.history: list[tuple[Kind, str, dict]] = []  # the watch cache: a watch from a version replays it
        self.logs: dict[tuple[str, str], list[str]] = {}
        self.log_waiters: dict[tuple[str, str], list[asyncio.Queue]] = {}
        self.exec_sessions: list[dict[str, Any]] = []
        self.env = {"DATABASE_PASSWORD": "hunter2-db-pass", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(str(tls[0]), str(tls[1]))
        if client_ca:
            self._tls.verify_mode = ssl.CERT_OPTIONAL
            self._tls.load_verify_locations(str(client_ca))
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._started.wait(10)
        self.url = f"https://127.0.0.1:{self.port}"
        self.put("namespaces", {"metadata": {"name": "default"}})
        self.put("namespaces", {"metadata": {"name": "kube-system"}})

    # running

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self._tls)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._started.set()
        self.loop.run_forever()

    def stop(self) -> None:
        async def shutdown() -> None:  # streams end first, as they would on a server going away
            for key in list(self.log_waiters):
                self._end_logs(key)
            for w in self.watchers:
                w.queue.put_nowait(None)
            await asyncio.sleep(0.1)
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def call(self, fn, *args) -> Any:
        """Run `fn(*args)` on the server's loop (objects and watchers live there)."""
        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    # the tests' side

    def put(self, resource: str, obj: dict) -> dict:
        """Create or replace an object, notifying watchers, as if another client had."""
        kind = next(k for k in KINDS if k.resource == resource)
        if threading.current_thread() is self._thread:
            return self._store(kind, copy.deepcopy(obj), obj["metadata"].get("namespace", "default"))
        return self.call(self._store, kind, copy.deepcopy(obj), obj["metadata"].get("namespace", "default"))

    def get(self, resource: str, namespace: str, name: str) -> dict | None:
        return self.objects[resource].get((namespace if resource != "namespaces" else "", name))

    def log(self, namespace: str, pod: str, *lines: str) -> None:
        """Append lines to a pod's log; followers get them now."""
        def append() -> None:
            self.logs.setdefault((namespace, pod), []).extend(lines)
            for q in self.log_waiters.get((namespace, pod), []):
                for line in lines:
                    q.put_nowait(line)

        self.call(append)

    def end_logs(self, namespace: str, pod: str) -> None:
        """The container exits: followers' streams end."""
        self.call(self._end_logs, (namespace, pod))

    def _end_logs(self, key: tuple[str, str]) -> None:
        for q in self.log_waiters.pop(key, []):
            q.put_nowait(None)

    def reached(self, fragment: str) -> list[Received]:
        """Requests whose (encoded or decoded) path contains `fragment`."""
        return [r for r in self.received if fragment in r.path or fragment in unquote(r.path)]

    # storage

    def _store(self, kind: Kind, obj: dict, namespace: str, *, dry_run: bool = False, create: bool = False) -> dict:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            else:
                raise ApiError(422, "Invalid", f'{kind.kind} "" is invalid: metadata.name: Required value: name or '
                                               f'generateName is required')
        if kind.namespaced:
            if meta.get("namespace", namespace) != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                                                  "namespace sent on the request")
            meta["namespace"] = namespace
            if ("", namespace) not in self.objects["namespaces"]:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                               {"name": namespace, "kind": "namespaces"})
        key = (namespace if kind.namespaced else "", meta["name"])
        existing = self.objects[kind.resource].get(key)
        if create and existing is not None:
            raise ApiError(409, "AlreadyExists", f'{kind.resource} "{meta["name"]}" already exists',
                           {"name": meta["name"], "kind": kind.resource})
        obj["kind"], obj["apiVersion"] = kind.kind, kind.api_version
        meta["uid"] = existing["metadata"]["uid"] if existing else str(uuid.uuid4())
        meta["creationTimestamp"] = existing["metadata"]["creationTimestamp"] if existing else _now()
        self._defaults(kind, obj)
        if dry_run:
            return obj
        self.resource_version += 1
        meta["resourceVersion"] = str(self.resource_version)
        self.objects[kind.resource][key] = obj
        self._notify(kind, "MODIFIED" if existing else "ADDED", obj)
        return obj

    def _defaults(self, kind: Kind, obj: dict) -> None:
        if kind.resource == "pods":
            obj.setdefault("spec", {}).setdefault("containers", [{"name": "main", "image": "busybox"}])
            obj.setdefault("status", {"phase": "Running"})
            obj["status"].setdefault("phase", "Running")
            obj["status"].setdefault("containerStatuses", [
                {"name": c["name"], "ready": True, "restartCount": 0, "image": c.get("image", "")}
                for c in obj["spec"]["containers"]])
        elif kind.resource == "secrets":
            obj.setdefault("type", "Opaque")
            if "stringData" in obj:  # the API server folds stringData into data on write
                data = obj.setdefault("data", {})
                for k, v in obj.pop("stringData").items():
                    data[k] = base64.b64encode(v.encode()).decode()
        elif kind.resource == "namespaces":
            obj["status"] = {"phase": "Active"}
        elif kind.resource == "deployments":
            replicas = obj.setdefault("spec", {}).setdefault("replicas", 1)
            obj["status"] = {"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
                             "availableReplicas": replicas}

    def _notify(self, kind: Kind, event: str, obj: dict) -> None:
        self.history.append((kind, event, copy.deepcopy(obj)))
        del self.history[:-HISTORY]
        for w in self.watchers:
            if w.kind is kind and (not w.namespace or w.namespace == obj["metadata"].get("namespace")):
                w.queue.put_nowait((event, copy.deepcopy(obj)))

    # HTTP

    def _authenticate(self, request: web.Request) -> str:
        auth = request.headers.get("Authorization", "")
        if auth == f"Bearer {self.token}":
            return "system:serviceaccount:custody:gateway"
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        if peer:
            return dict(x[0] for x in peer["subject"]).get("commonName", "")
        raise ApiError(401, "Unauthorized", "Unauthorized")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        raw_path = request.raw_path
        record = Received(request.method, raw_path, {k.lower(): v for k, v in request.headers.items()}, body, "")
        self.received.append(record)
        try:
            record.user = self._authenticate(request)
            path = unquote(raw_path.split("?", 1)[0])  # what Go's URL.Path holds
            query = parse_query(raw_path.partition("?")[2])
            response = await self._route(request, path, query, body)
        except ApiError as e:
            response = web.json_response(status(e.code, e.reason, e.message, e.details), status=e.code)
        if (isinstance(response, web.Response) and response.content_type == "application/json"
                and request.headers.get("Accept", "").startswith(PROTOBUF)):
            # A stand-in for the protobuf encoding: its magic number, then bytes a JSON reader cannot use.
            return web.Response(body=b"k8s\x00" + zlib.compress(response.body), status=response.status,
                                content_type=PROTOBUF)
        return response

    async def _route(self, request: web.Request, path: str, query: dict, body: bytes) -> web.StreamResponse:
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if path == "/version":
            return web.json_response({"major": "1", "minor": "32", "gitVersion": "v1.32.0-custody-test",
                                      "platform": "linux/amd64", "goVersion": "go1.23.0", "compiler": "gc"})
        if path == "/api":
            return web.json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}]})
        if path == "/apis":
            groups = sorted({k.group for k in KINDS if k.group})
            return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                 "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}} for g in groups]})
        if path in ("/api/v1", "/apis/apps/v1"):
            return web.json_response(self._resource_list("" if path == "/api/v1" else "apps"))
        target = self._target(path)
        if target is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return await self._resource(request, target, query, body)

    def _resource_list(self, group: str) -> dict:
        resources = []
        for k in KINDS:
            if k.group != group:
                continue
            resources.append({"name": k.resource, "singularName": k.kind.lower(), "namespaced": k.namespaced,
                              "kind": k.kind, "verbs": VERBS, "shortNames": list(k.short)})
            for sub in k.subresources:
                verbs = {"log": ["get"], "exec": ["create", "get"], "attach": ["create", "get"],
                         "portforward": ["create", "get"], "eviction": ["create"], "binding": ["create"],
                         "token": ["create"]}.get(sub, ["get", "patch", "update"])
                resources.append({"name": f"{k.resource}/{sub}", "singularName": "", "namespaced": k.namespaced,
                                  "kind": k.kind, "verbs": verbs})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/v1" if group else "v1", "resources": resources}

    def _target(self, path: str) -> Target | None:
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, rest = parts[1], parts[3:]
            if parts[2] != "v1":
                return None
        else:
            return None
        watch_path = bool(rest) and rest[0] == "watch"
        if watch_path:
            rest = rest[1:]
        namespace, namespace_path = "", len(rest) >= 3 and rest[0] == "namespaces"
        if namespace_path:
            namespace, rest = rest[1], rest[2:]  # go-restful matches an empty {namespace} segment too
        if not rest or len(rest) > 3:
            return None  # /api/v1/proxy/... among them: installer.go registers no proxy-verb routes
        kind = next((k for k in KINDS if k.group == group and k.resource == rest[0]), None)
        if kind is None or (namespace_path and not kind.namespaced):
            return None
        if kind.namespaced and not namespace_path and len(rest) > 1:
            return None  # across all namespaces there are only list and watch (installer.go, AllNamespaces)
        target = Target(kind, namespace, rest[1] if len(rest) > 1 else "", rest[2] if len(rest) > 2 else "",
                        watch_path, namespace_path)
        if target.subresource and target.subresource not in kind.subresources:
            return None
        return target

    async def _resource(self, request: web.Request, t: Target, query: dict, body: bytes) -> web.StreamResponse:
        method = request.method
        one = lambda key: (query.get(key) or [""])[0]  # noqa: E731
        if t.subresource == "log" and method == "GET":
            return await self._logs(request, t, query)
        if t.subresource in ("exec", "attach"):
            return await self._exec(request, t, query)
        if t.subresource:
            raise ApiError(405, "MethodNotAllowed", f"{t.subresource} is not served by this test server")
        watching = t.watch_path or (not t.name and query_bool(query, "watch"))  # a named GET is a get
        if t.every_namespace and not t.namespace_path and method not in ("GET", "HEAD"):
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        if t.every_namespace and (t.name or method in ("POST", "PUT", "PATCH")):
            # registry NamespaceKeyFunc: a named object needs its namespace
            raise ApiError(400, "BadRequest", "Namespace parameter required.")
        if method == "GET" and watching:
            return await self._watch(request, t, query)
        if method == "GET" and not t.name:
            return self._answer(request, self._list(t, query), t)
        if method == "GET":
            return self._answer(request, self._existing(t), t)
        if method == "POST" and not t.name:
            obj = self._decode(body, request)
            rehearse = dry_run(query.get("dryRun"), "CreateOptions")
            return web.json_response(self._store(t.kind, obj, t.namespace, dry_run=rehearse, create=True), status=201)
        if method == "PUT" and t.name:
            rehearse = dry_run(query.get("dryRun"), "UpdateOptions")
            obj = self._decode(body, request)
            if obj.get("metadata", {}).get("name") != t.name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
            self._existing(t)
            return web.json_response(self._store(t.kind, obj, t.namespace, dry_run=rehearse))
        if method == "PATCH" and t.name:
            rehearse = dry_run(query.get("dryRun"), "PatchOptions")
            return web.json_response(self._patch(request, t, body, rehearse, one("fieldManager")))
        if method == "DELETE" and t.name:
            obj = self._existing(t)
            if not self._delete_options(request, body, query):
                self._delete(t.kind, obj)
            return web.json_response(obj)
        if method == "DELETE":
            items = self._list(t, query)["items"]  # ListOptions always come from the query
            if not self._delete_options(request, body, query):
                for o in items:
                    self._delete(t.kind, {**o, "kind": t.kind.kind, "apiVersion": t.kind.api_version})
            return web.json_response({**self._list(t, {}), "items": items})
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _delete(self, kind: Kind, obj: dict) -> None:
        meta = obj["metadata"]
        del self.objects[kind.resource][(meta.get("namespace", "") if kind.namespaced else "", meta["name"])]
        self.resource_version += 1
        meta["resourceVersion"] = str(self.resource_version)
        self._notify(kind, "DELETED", obj)
        if kind.resource == "pods":
            self._end_logs((meta["namespace"], meta["name"]))

    @staticmethod
    def _delete_options(request: web.Request, body: bytes, query: dict) -> bool:
        """Whether a delete is a dry run. handlers/delete.go (DeleteResource and
        DeleteCollection): a non-empty body is decoded as DeleteOptions, by its
        Content-Type (none means JSON), and the query is then ignored; an empty body
        leaves the options to the query."""
        if not body:
            return dry_run(query.get("dryRun"), "DeleteOptions")
        media = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if media not in ("", "application/json", "application/yaml"):
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted "
                                                        "media types include: application/json, application/yaml")
        try:
            options = json.loads(body) if media != "application/yaml" else yaml.safe_load(body)
        except (ValueError, yaml.YAMLError) as e:
            raise ApiError(400, "BadRequest", f"the body of the request was in an unknown format: {e}")
        if not isinstance(options, dict) or options.get("kind", "DeleteOptions") != "DeleteOptions":
            raise ApiError(400, "BadRequest", "decoded object cannot be converted to DeleteOptions")
        return dry_run(options.get("dryRun"), "DeleteOptions")

    def _decode(self, body: bytes, request: web.Request) -> dict:
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"the body of the request was in an unknown format: {e}")
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the body of the request is not an object")
        return obj

    def _existing(self, t: Target) -> dict:
        obj = self.objects[t.kind.resource].get((t.namespace if t.kind.namespaced else "", t.name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{t.kind.resource} "{t.name}" not found',
                           {"name": t.name, "group": t.kind.group, "kind": t.kind.resource})
        return copy.deepcopy(obj)

    def _patch(self, request: web.Request, t: Target, body: bytes, dry_run: bool, manager: str) -> dict:
        content_type = request.headers.get("Content-Type", "").split(";")[0]
        try:
            patch = json.loads(body)
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"the body of the request was in an unknown format: {e}")
        key = (t.namespace if t.kind.namespaced else "", t.name)
        current = self.objects[t.kind.resource].get(key)
        if content_type == "application/apply-patch+yaml":
            if not manager:
                raise ApiError(400, "BadRequest", "PATCH requests of type application/apply-patch+yaml must "
                                                  "have a fieldManager")
            merged = merge_patch(current or {}, patch)
            return self._store(t.kind, merged, t.namespace, dry_run=dry_run)
        if current is None:
            raise ApiError(404, "NotFound", f'{t.kind.resource} "{t.name}" not found',
                           {"name": t.name, "group": t.kind.group, "kind": t.kind.resource})
        if content_type == "application/json-patch+json":
            merged = json_patch(current, patch)
        elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            merged = merge_patch(current, patch)
        else:
            raise ApiError(415, "UnsupportedMediaType", 'the body of the request was in an unknown format - '
                                                        'accepted media types include: application/json-patch+json, '
                                                        'application/merge-patch+json, application/apply-patch+yaml')
        return self._store(t.kind, merged, t.namespace, dry_run=dry_run)

    def _list(self, t: Target, query: dict) -> dict:
        one = lambda key: (query.get(key) or [""])[0]  # noqa: E731
        items = [copy.deepcopy(o) for (ns, _), o in sorted(self.objects[t.kind.resource].items())
                 if not t.namespace or ns == t.namespace]
        items = [o for o in items if matches_labels(o, one("labelSelector")) and matches_fields(o, one("fieldSelector"))]
        if t.name:
            items = [o for o in items if o["metadata"]["name"] == t.name]
        meta: dict[str, Any] = {"resourceVersion": str(self.resource_version)}
        start = int(base64.b64decode(one("continue")).decode()) if one("continue") else 0
        limit = int(one("limit") or 0)
        if limit and start + limit < len(items):
            meta["continue"] = base64.b64encode(str(start + limit).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
        items = items[start:start + limit] if limit else items[start:]
        for o in items:
            o.pop("kind", None), o.pop("apiVersion", None)  # list items carry no type of their own
        return {"kind": f"{t.kind.kind}List", "apiVersion": t.kind.api_version, "metadata": meta, "items": items}

    # Tables

    @staticmethod
    def _table_version(request: web.Request) -> str | None:
        for part in request.headers.get("Accept", "").split(","):
            params = dict(p.strip().partition("=")[::2] for p in part.split(";")[1:])
            if params.get("as") == "Table" and params.get("g") == "meta.k8s.io":
                return params.get("v", "v1")
        return None

    def _cells(self, t: Target, o: dict) -> list:
        age = _age(o["metadata"]["creationTimestamp"])
        name = o["metadata"]["name"]
        if t.kind.resource == "pods":
            statuses = o.get("status", {}).get("containerStatuses", [])
            ready = sum(1 for s in statuses if s.get("ready"))
            return [name, f"{ready}/{len(statuses)}", o["status"]["phase"],
                    str(sum(s.get("restartCount", 0) for s in statuses)), age]
        if t.kind.resource == "secrets":
            return [name, o.get("type", "Opaque"), len(o.get("data") or {}), age]
        if t.kind.resource == "configmaps":
            return [name, len(o.get("data") or {}), age]
        if t.kind.resource == "namespaces":
            return [name, o["status"]["phase"], age]
        if t.kind.resource == "serviceaccounts":
            return [name, len(o.get("secrets") or []), age]
        s = o.get("status", {})
        return [name, f"{s.get('readyReplicas', 0)}/{o['spec']['replicas']}", s.get("updatedReplicas", 0),
                s.get("availableReplicas", 0), age]

    def _table(self, t: Target, objects: list[dict], version: str, include: str, meta: dict,
               columns: bool = True) -> dict:
        rows = []
        for o in objects:
            o = {**o, "kind": t.kind.kind, "apiVersion": t.kind.api_version}
            row: dict[str, Any] = {"cells": self._cells(t, o)}
            if include == "Object":
                row["object"] = o
            elif include != "None":
                row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": f"meta.k8s.io/{version}",
                                 "metadata": o["metadata"]}
            rows.append(row)
        table: dict[str, Any] = {"kind": "Table", "apiVersion": f"meta.k8s.io/{version}", "metadata": meta}
        if columns:
            table["columnDefinitions"] = [
                {"name": n, "type": ty, "format": fmt, "description": f"{n} of the {t.kind.kind}",
                 "priority": 0} for n, ty, fmt in TABLE_COLUMNS[t.kind.resource]]
        table["rows"] = rows
        return table

    def _answer(self, request: web.Request, document: dict, t: Target) -> web.Response:
        version = self._table_version(request)
        if version is None:
            return web.json_response(document)
        include = (parse_query(request.raw_path.partition("?")[2]).get("includeObject") or [""])[0]
        objects = document["items"] if "items" in document else [document]
        meta = {k: v for k, v in document["metadata"].items() if k in ("resourceVersion", "continue", "remainingItemCount")}
        return web.json_response(self._table(t, objects, version, include, meta))

    # watch

    async def _watch(self, request: web.Request, t: Target, query: dict) -> web.StreamResponse:
        one = lambda key: (query.get(key) or [""])[0]  # noqa: E731
        since = int(one("resourceVersion") or 0)
        timeout = float(one("timeoutSeconds") or 1800)
        version = self._table_version(request)
        include = one("includeObject")
        watcher = Watcher(t.kind, t.namespace)
        self.watchers.append(watcher)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        first = True

        def wanted(obj: dict) -> bool:
            return (matches_labels(obj, one("labelSelector")) and matches_fields(obj, one("fieldSelector"))
                    and (not t.name or obj["metadata"]["name"] == t.name))

        async def send(event: str, obj: dict) -> None:
            nonlocal first
            if version is not None:
                meta = {"resourceVersion": obj["metadata"]["resourceVersion"]}
                obj = self._table(t, [obj], version, include, meta, columns=first)
            first = False
            await response.write(json.dumps({"type": event, "object": obj}).encode() + b"\n")

        try:
            if not since:  # no resourceVersion: the current state first, as ADDED events
                for (ns, _), o in sorted(self.objects[t.kind.resource].items()):
                    if (not t.namespace or ns == t.namespace) and wanted(o):
                        await send("ADDED", copy.deepcopy(o))
            else:  # from a resourceVersion: what happened since, from the watch cache
                for kind, event, o in list(self.history):
                    if (kind is t.kind and int(o["metadata"]["resourceVersion"]) > since and wanted(o)
                            and (not t.namespace or o["metadata"].get("namespace") == t.namespace)):
                        await send(event, copy.deepcopy(o))
                        since = int(o["metadata"]["resourceVersion"])
            deadline = asyncio.get_running_loop().time() + timeout
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), left)
                except asyncio.TimeoutError:
                    break
                if item is None:
                    break
                event, obj = item
                if int(obj["metadata"]["resourceVersion"]) > since and wanted(obj):
                    await send(event, obj)
            await response.write_eof()
        except ConnectionResetError:
            pass
        finally:
            self.watchers.remove(watcher)
        return response

    # logs

    async def _logs(self, request: web.Request, t: Target, query: dict) -> web.StreamResponse:
        pod = self._existing(Target(t.kind, t.namespace, t.name))
        one = lambda key: (query.get(key) or [""])[0]  # noqa: E731
        containers = [c["name"] for c in pod["spec"]["containers"]]
        container = one("container") or (containers[0] if len(containers) == 1 else "")
        if not container:
            raise ApiError(400, "BadRequest", f"a container name must be specified for pod {t.name}, choose one "
                                              f"of: [{' '.join(containers)}]")
        if container not in containers:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {t.name}")
        key = (t.namespace, t.name)
        lines = list(self.logs.get(key, []))
        if one("tailLines"):
            lines = lines[-int(one("tailLines")):] if int(one("tailLines")) else []
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        queue: asyncio.Queue = asyncio.Queue()
        follow = query_bool(query, "follow")
        if follow:
            self.log_waiters.setdefault(key, []).append(queue)
        await response.prepare(request)
        try:
            for line in lines:
                await response.write(line.encode() + b"\n")
            while follow:
                line = await queue.get()
                if line is None:
                    break
                await response.write(line.encode() + b"\n")
            await response.write_eof()
        except ConnectionResetError:
            pass
        finally:
            if queue in self.log_waiters.get(key, []):
                self.log_waiters[key].remove(queue)
        return response

    # exec

    def run(self, command: list[str], stdin: bytes) -> tuple[bytes, bytes, int]:
        """What the container does: a few commands, enough to see streams, secrets and exit codes."""
        if command[:1] == ["echo"]:
            return (" ".join(command[1:]) + "\n").encode(), b"", 0
        if command[:1] == ["env"]:
            return "".join(f"{k}={v}\n" for k, v in self.env.items()).encode(), b"", 0
        if command[:1] == ["cat"] and len(command) == 1:
            return stdin, b"", 0
        if command[:1] == ["whoami"]:
            return b"root\n", b"", 0
        if command[:2] == ["sh", "-c"] and len(command) == 3 and command[2].startswith("exit "):
            return b"", b"", int(command[2].split()[1])
        if command[:1] == ["ls"]:
            return b"", f"ls: {command[-1]}: No such file or directory\n".encode(), 1
        return b"", b"", -1

    async def _exec(self, request: web.Request, t: Target, query: dict) -> web.StreamResponse:
        self._existing(Target(t.kind, t.namespace, t.name))
        command = query.get("command", [])
        flags = {k: query_bool(query, k) for k in ("stdin", "stdout", "stderr", "tty")}
        if t.subresource == "exec" and not command:
            raise ApiError(400, "BadRequest", "you must specify at least 1 command")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise ApiError(400, "BadRequest", "Upgrade request required")
        ws = web.WebSocketResponse(protocols=EXEC_PROTOCOLS)
        await ws.prepare(request)
        session = {"pod": t.name, "namespace": t.namespace, "command": command, "protocol": ws.ws_protocol,
                   "stdin": b""}
        self.exec_sessions.append(session)
        versioned = ws.ws_protocol in ("v5.channel.k8s.io", "v4.channel.k8s.io")
        if flags["stdin"]:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY or not msg.data:
                    break
                if msg.data[0] == 255 and msg.data[1:2] == b"\x00":  # v5: the client closed stdin
                    break
                if msg.data[0] == 0:
                    session["stdin"] += msg.data[1:]
        stdout, stderr, code = self.run(command, session["stdin"])
        if flags["stdout"] and stdout:
            await ws.send_bytes(b"\x01" + stdout)
        if flags["stderr"] and stderr:
            await ws.send_bytes(b"\x02" + stderr)
        if code == -1:
            message = (f'OCI runtime exec failed: exec failed: unable to start container process: exec: '
                       f'"{command[0]}": executable file not found in $PATH: unknown')
            error = status(500, "InternalError", message) if versioned else None
            await ws.send_bytes(b"\x03" + (json.dumps(error).encode() if error else message.encode()))
        elif code:
            error = {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                     "message": f"command terminated with non-zero exit code: error executing command "
                                f"[{' '.join(command)}], exit code {code}",
                     "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}
            await ws.send_bytes(b"\x03" + (json.dumps(error).encode() if versioned else
                                           f"command terminated with exit code {code}".encode()))
        elif versioned:
            await ws.send_bytes(b"\x03" + json.dumps({"metadata": {}, "status": "Success"}).encode())
        session["exit_code"] = code
        await ws.close()
        return ws
