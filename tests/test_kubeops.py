"""Kubernetes request info as the API server derives it: the table is the API server's own
test table (k8s.io/apiserver requestinfo_test.go), plus what a gateway must add."""

from __future__ import annotations

import json

import pytest

from addons.classifiers import kubernetes as kubeops


@pytest.mark.parametrize(
    "method, url, verb, group, version, namespace, resource, subresource, name, parts",
    [
        ("GET", "/api/v1/namespaces", "list", "", "v1", "", "namespaces", "", "", ("namespaces",)),
        ("GET", "/api/v1/namespaces/other", "get", "", "v1", "other", "namespaces", "", "other", ("namespaces", "other")),
        ("GET", "/api/v1/namespaces/other/pods", "list", "", "v1", "other", "pods", "", "", ("pods",)),
        ("GET", "/api/v1/namespaces/other/pods/foo", "get", "", "v1", "other", "pods", "", "foo", ("pods", "foo")),
        ("HEAD", "/api/v1/namespaces/other/pods/foo", "get", "", "v1", "other", "pods", "", "foo", ("pods", "foo")),
        ("GET", "/api/v1/pods", "list", "", "v1", "", "pods", "", "", ("pods",)),
        ("HEAD", "/api/v1/pods", "list", "", "v1", "", "pods", "", "", ("pods",)),
        ("PATCH", "/api/v1/namespaces/new-namespace", "patch", "", "v1", "new-namespace", "namespaces", "", "new-namespace", ("namespaces", "new-namespace")),
        ("GET", "/api/v1/proxy/namespaces/other/pods/foo", "proxy", "", "v1", "other", "pods", "", "foo", ("pods", "foo")),
        ("GET", "/api/v1/proxy/namespaces/other/pods/foo/subpath/not/a/subresource", "proxy", "", "v1", "other", "pods", "", "foo",
         ("pods", "foo", "subpath", "not", "a", "subresource")),
        ("GET", "/api/v1/watch/pods", "watch", "", "v1", "", "pods", "", "", ("pods",)),
        ("GET", "/api/v1/pods?watch=true", "watch", "", "v1", "", "pods", "", "", ("pods",)),
        ("GET", "/api/v1/pods?watch=false", "list", "", "v1", "", "pods", "", "", ("pods",)),
        ("GET", "/api/v1/watch/namespaces/other/pods", "watch", "", "v1", "other", "pods", "", "", ("pods",)),
        ("GET", "/api/v1/namespaces/other/pods?watch=1", "watch", "", "v1", "other", "pods", "", "", ("pods",)),
        ("GET", "/api/v1/namespaces/other/pods?watch=0", "list", "", "v1", "other", "pods", "", "", ("pods",)),
        ("GET", "/api/v1/namespaces/other/pods/foo/status", "get", "", "v1", "other", "pods", "status", "foo", ("pods", "foo", "status")),
        ("GET", "/api/v1/namespaces/other/pods/foo/proxy/subpath", "get", "", "v1", "other", "pods", "proxy", "foo", ("pods", "foo", "proxy", "subpath")),
        ("PUT", "/api/v1/namespaces/other/finalize", "update", "", "v1", "other", "namespaces", "finalize", "other", ("namespaces", "other", "finalize")),
        ("PUT", "/api/v1/namespaces/other/status", "update", "", "v1", "other", "namespaces", "status", "other", ("namespaces", "other", "status")),
        ("PATCH", "/api/v1/namespaces/other/pods/foo", "patch", "", "v1", "other", "pods", "", "foo", ("pods", "foo")),
        ("DELETE", "/api/v1/namespaces/other/pods/foo", "delete", "", "v1", "other", "pods", "", "foo", ("pods", "foo")),
        ("POST", "/api/v1/namespaces/other/pods", "create", "", "v1", "other", "pods", "", "", ("pods",)),
        ("DELETE", "/api/v1/nodes", "deletecollection", "", "v1", "", "nodes", "", "", ("nodes",)),
        ("DELETE", "/api/v1/namespaces", "deletecollection", "", "v1", "", "namespaces", "", "", ("namespaces",)),
        ("DELETE", "/api/v1/namespaces/other/pods", "deletecollection", "", "v1", "other", "pods", "", "", ("pods",)),
        ("DELETE", "/apis/extensions/v1/namespaces/other/pods", "deletecollection", "extensions", "v1", "other", "pods", "", "", ("pods",)),
        ("POST", "/apis/extensions/v1/namespaces/other/pods", "create", "extensions", "v1", "other", "pods", "", "", ("pods",)),
        ("POST", "/apis/extensions/v1beta3/namespaces/other/pods", "create", "extensions", "v1beta3", "other", "pods", "", "", ("pods",)),
        # field selectors name the object of a list or watch
        ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1", "list", "group", "version", "", "resource", "", "name1", ("resource",)),
        ("GET", "/apis/group/version/resource?watch=true&fieldSelector=metadata.name=name1", "watch", "group", "version", "", "resource", "", "name1", ("resource",)),
        ("GET", "/apis/group/version/resource?fieldSelector=foo=bar", "list", "group", "version", "", "resource", "", "", ("resource",)),
        ("GET", "/apis/group/version/resource?fieldSelector=metadata.name=name1,foo", "list", "group", "version", "", "resource", "", "", ("resource",)),
    ],
)
def test_request_info_matches_the_api_server(method, url, verb, group, version, namespace, resource, subresource, name, parts):
    from urllib.parse import parse_qs

    path, _, query = url.partition("?")
    info = kubeops.request_info(method, path, parse_qs(query))
    assert info.resource_request
    assert (info.verb, info.api_group, info.api_version, info.namespace) == (verb, group, version, namespace)
    assert (info.resource, info.subresource, info.name, info.parts) == (resource, subresource, name, parts)


@pytest.mark.parametrize("path", ["/", "/api/version/", "/apis/group/version/", "/badprefix/version/resource",
                                  "/apis/version/resource", "/api", "/apis/extensions/v1beta1", "/version", "/healthz",
                                  "/openapi/v3/apis/apps/v1"])
def test_non_resource_requests(path):
    assert not kubeops.request_info("GET", path, {}).resource_request


@pytest.mark.parametrize(
    "method, target, headers, action, resource, verb",
    [
        ("GET", "/api/v1/namespaces/default/pods", {}, "read", "pods", "list"),
        ("GET", "/api/v1/namespaces/default/secrets/db", {}, "read", "secrets", "get"),
        ("POST", "/api/v1/namespaces/default/pods", {}, "write", "pods", "create"),
        ("POST", "/api/v1/namespaces/default/pods?dryRun=All", {}, "read", "pods", "create"),
        ("DELETE", "/api/v1/namespaces/prod", {}, "delete", "namespaces", "delete"),
        ("GET", "/api/v1/namespaces/default/pods/web/exec?command=ls", {}, "exec", "pods/exec", "get"),
        ("POST", "/api/v1/namespaces/default/pods/web/attach", {}, "exec", "pods/attach", "create"),
        ("POST", "/api/v1/namespaces/default/pods/web/portforward", {}, "exec", "pods/portforward", "create"),
        ("PATCH", "/api/v1/namespaces/default/pods/web/ephemeralcontainers", {}, "exec", "pods/ephemeralcontainers", "patch"),
        ("GET", "/api/v1/namespaces/default/pods/web/log?follow=true", {}, "read", "pods/log", "get"),
        ("POST", "/api/v1/namespaces/default/pods/web/eviction", {}, "delete", "pods/eviction", "create"),
        ("PUT", "/apis/apps/v1/namespaces/default/deployments/web/scale", {}, "write", "deployments/scale", "update"),
        ("POST", "/api/v1/namespaces/default/serviceaccounts/builder/token", {}, "admin", "serviceaccounts/token", "create"),
        ("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {}, "admin", "clusterrolebindings", "create"),
        ("GET", "/api/v1/namespaces/default/pods", {"impersonate-user": ["admin"]}, "admin", "pods", "list"),
        ("GET", "/version", {}, "read", "/version", "get"),
        ("GET", "/api//v1/namespaces//default/pods/", {}, "read", "pods", "list"),
        ("GET", "/api/v1/namespaces/default/%73ecrets/db", {}, "read", "secrets", "get"),
        ("GET", "/api/v1/namespaces%2Fdefault%2Fsecrets%2Fdb", {}, "read", "secrets", "get"),
    ],
)
def test_operations(method, target, headers, action, resource, verb):
    op = kubeops.classify("k8s", method, target, headers, None)
    assert op.protocol == "kubernetes" and op.action == action
    assert op.resource == resource and op.details["verb"] == verb


def test_exec_and_impersonation_details():
    op = kubeops.classify("k8s", "GET", "/api/v1/namespaces/ops/pods/web/exec?command=rm&command=-rf&command=%2F&container=app&stdin=true",
                          {"impersonate-user": ["system:admin"], "impersonate-group": ["system:masters", "devs"]}, None)
    assert op.details["command"] == ["rm", "-rf", "/"] and op.details["container"] == "app"
    assert op.details["impersonate"] == {"user": "system:admin", "uid": "", "groups": ["system:masters", "devs"], "extra": {}}
    assert op.summary == "exec in pods/web in ops on k8s: rm -rf / as system:admin"
    assert op.action == "admin" and op.risk == 90


@pytest.mark.parametrize(
    "target, verb, stream",
    [
        ("/api/v1/namespaces/default/pods?watch=true", "watch", True),
        ("/api/v1/namespaces/default/pods?watch=True", "watch", True),
        ("/api/v1/namespaces/default/pods?watch=t", "watch", True),
        ("/api/v1/namespaces/default/pods?watch=yes", "watch", True),  # the server refuses it; assume the stream
        # apimachinery's Convert_Slice_string_To_bool: only "0" and "false" (any case) are false
        ("/api/v1/namespaces/default/pods?watch=F", "watch", True),
        ("/api/v1/namespaces/default/pods?watch=", "watch", True),
        ("/api/v1/namespaces/default/pods?watch=false", "list", False),
        ("/api/v1/namespaces/default/pods?watch=FALSE", "list", False),
        ("/api/v1/namespaces/default/pods?watch=0", "list", False),
        ("/api/v1/namespaces/default/pods?watch=0&watch=1", "list", False),  # the first value counts
        ("/api/v1/namespaces/default/pods?watch=1;x", "list", False),  # Go drops a pair holding a ';'
        ("/api/v1/namespaces/default/pods?w%61tch=1", "watch", True),
        ("/api/v1/watch/namespaces/default/pods", "watch", True),
        ("/api/v1/namespaces/default/pods/web/log?follow=1", "get", True),
        ("/api/v1/namespaces/default/pods/web/log?follow=T", "get", True),
        ("/api/v1/namespaces/default/pods/web/log?follow=false", "get", False),
        ("/api/v1/namespaces/default/pods/web/log?follow=", "get", True),
        ("/api/v1/namespaces/default/pods/web/log?follow=no", "get", True),
        ("/api/v1/namespaces/default/pods/web/log", "get", False),
        ("/api/v1/namespaces/default/pods/web?follow=true", "get", False),
    ],
)
def test_streams(target, verb, stream):
    op = kubeops.classify("k8s", "GET", target, {}, None)
    assert (op.details["verb"], op.details["stream"]) == (verb, stream)


@pytest.mark.parametrize(
    "raw, query",
    [
        ("a=1&b=2", {"a": ["1"], "b": ["2"]}),
        ("a=1&a=2", {"a": ["1", "2"]}),
        ("a=", {"a": [""]}),
        ("a", {"a": [""]}),
        ("a=x+y", {"a": ["x y"]}),
        ("a=x%2By", {"a": ["x+y"]}),
        ("dry%52un=All", {"dryRun": ["All"]}),
        ("a=1;b=2", {}),  # Go refuses ';' as a separator and drops the pair
        ("a=1&b=2;", {"a": ["1"]}),
        ("a=%zz&b=1", {"b": ["1"]}),  # a bad escape drops its pair
        ("a=%4", {}),
        ("&&a=1&", {"a": ["1"]}),
        ("=1", {"": ["1"]}),
    ],
)
def test_the_query_is_read_as_go_reads_it(raw, query):
    assert kubeops.go_query(raw) == query


DELETE_OPTIONS = {"kind": "DeleteOptions", "apiVersion": "v1"}


def body(document) -> bytes:
    return document if isinstance(document, bytes) else json.dumps(document).encode()


@pytest.mark.parametrize(
    "query, document, content_type, dry_run",
    [
        # a non-empty body is the DeleteOptions: the query's dryRun is ignored (handlers/delete.go)
        ("dryRun=All", DELETE_OPTIONS, "application/json", False),
        ("dryRun=All", {}, "application/json", False),
        ("dryRun=All", {"dryRun": []}, "application/json", False),
        ("dryRun=All", {"dryRun": None}, "application/json", False),
        ("dryRun=All", {"propagationPolicy": "Background"}, "application/json", False),
        ("dryRun=All", {**DELETE_OPTIONS, "gracePeriodSeconds": 0}, "", False),
        ("dryRun=All&dryRun=All", DELETE_OPTIONS, "application/json", False),
        ("dryRun=All", b"kind: DeleteOptions\napiVersion: v1\n", "application/yaml", False),
        ("dryRun=All", {"dryRun": "All"}, "application/json", False),  # not a list: the server refuses it
        ("dryRun=All", {"dryrun": ["All"]}, "application/json", False),  # another field to the server
        ("dryRun=All", {"DryRun": ["All"]}, "application/json", False),
        ("dryRun=All", b'{"dryRun":["All"],"dryRun":[]}', "application/json", False),  # duplicate keys
        ("dryRun=All", {"dryRun": ["All", ""]}, "application/json", False),  # refused: 422
        ("dryRun=All", {"dryRun": ["all"]}, "application/json", False),
        ("dryRun=All", {"dryRun": [True]}, "application/json", False),
        ("dryRun=All", b"k8s\x00\x0a\x02v1", "application/vnd.kubernetes.protobuf", False),  # unreadable here
        ("dryRun=All", {"dryRun": ["All"]}, "application/vnd.kubernetes.protobuf", False),
        ("dryRun=All", {"dryRun": ["All"]}, "text/plain", False),  # 415 at the server
        ("dryRun=All", b"{not json", "application/json", False),
        ("dryRun=All", [DELETE_OPTIONS], "application/json", False),
        # a body that says dry run is one, whatever the query says
        ("", {**DELETE_OPTIONS, "dryRun": ["All"]}, "application/json", True),
        ("dryRun=", {"dryRun": ["All"]}, "", True),
        ("", {"dryRun": ["All"]}, "application/json; charset=utf-8", True),
        ("", b"dryRun: [All]", "application/yaml", False),  # YAML the gateway does not read
        # no body: the query decides
        ("dryRun=All", None, "", True),
        ("dryRun=%41ll", None, "", True),
        ("dryRun=All;", None, "", False),
        ("dryRun=all", None, "", False),
        ("dryRun=", None, "", False),
        ("dryRun=All&dryRun=", None, "", False),
        ("dryrun=All", None, "", False),
    ],
)
@pytest.mark.parametrize("path", ["/api/v1/namespaces/default/pods/web", "/api/v1/namespaces/default/pods"])
def test_delete_options_come_from_a_non_empty_body(path, query, document, content_type, dry_run):
    op = kubeops.classify("k8s", "DELETE", f"{path}?{query}", {"content-type": [content_type]} if content_type else {},
                          None if document is None else body(document))
    assert op.details["dry_run"] is dry_run
    assert op.action == ("read" if dry_run else "delete")
    assert op.details["verb"] == ("delete" if path.endswith("/web") else "deletecollection")


@pytest.mark.parametrize(
    "query, dry_run",
    [
        ("dryRun=All", True),
        ("dryRun=All&dryRun=All", True),
        ("dryRun=%41ll", True),
        ("dry%52un=All", True),
        ("dryRun=", False),  # refused by the server (422): no dry run to the gateway
        ("dryRun=all", False),
        ("dryRun=true", False),
        ("dryRun=All&dryRun=", False),
        ("dryRun=&dryRun=All", False),
        ("dryRun=All;", False),  # dropped by Go's query parser: a real write
        ("dryRun=All%zz", False),
        ("dryRun=+All", False),
        ("dryrun=All", False),
        ("DryRun=All", False),
        ("", False),
    ],
)
@pytest.mark.parametrize("method, path", [("POST", "/api/v1/namespaces/default/configmaps"),
                                          ("PUT", "/api/v1/namespaces/default/configmaps/keep"),
                                          ("PATCH", "/api/v1/namespaces/default/configmaps/keep")])
def test_dry_run_of_a_change_comes_from_the_query(method, path, query, dry_run):
    content = body({"metadata": {"name": "keep"}, "dryRun": ["All"]})  # a body never makes a change a dry run
    op = kubeops.classify("k8s", method, f"{path}?{query}", {"content-type": ["application/merge-patch+json"]}, content)
    assert (op.details["dry_run"], op.action) == (dry_run, "read" if dry_run else "write")


@pytest.mark.parametrize(
    "path, resource, namespace, name",
    [
        ("/api/v1/proxy/namespaces/default/pods/web", "pods/proxy", "default", "web"),
        ("/api/v1/proxy/namespaces/default/pods/web/", "pods/proxy", "default", "web"),
        ("/api/v1/proxy/namespaces/default/pods/web/metrics", "pods/proxy", "default", "web"),
        ("/api/v1/proxy/namespaces/default/pods/web:8080/debug/pprof", "pods/proxy", "default", "web:8080"),
        ("/api/v1/proxy/namespaces/default/pods/https:web:8443/", "pods/proxy", "default", "https:web:8443"),
        ("/api/v1/proxy/namespaces/default/services/db:5432", "services/proxy", "default", "db:5432"),
        ("/api/v1/proxy/namespaces/kube-system/services/kube-dns:dns/", "services/proxy", "kube-system", "kube-dns:dns"),
        ("/api/v1/proxy/nodes/node-1", "nodes/proxy", "", "node-1"),
        ("/api/v1/proxy/nodes/node-1:10250/metrics", "nodes/proxy", "", "node-1:10250"),
        ("/api/v1/proxy/pods", "pods/proxy", "", ""),
        ("/api/v1//proxy/namespaces/default/pods/web", "pods/proxy", "default", "web"),
        ("/api/v1/%70roxy/namespaces/default/pods/web", "pods/proxy", "default", "web"),
        ("/api/v1/proxy%2Fnamespaces%2Fdefault%2Fpods%2Fweb", "pods/proxy", "default", "web"),
        ("/apis/apps/v1/proxy/namespaces/default/deployments/web", "deployments/proxy", "default", "web"),
        ("/api/v1/namespaces/default/pods/web/proxy/metrics", "pods/proxy", "default", "web"),  # the current form
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_legacy_proxy_paths_are_the_proxy_subresource(method, path, resource, namespace, name):
    op = kubeops.classify("k8s", method, path, {}, None)
    assert (op.action, op.resource, op.details["subresource"]) == ("exec", resource, "proxy")
    assert (op.details["namespace"], op.details["name"]) == (namespace, name)


@pytest.mark.parametrize(
    "method, target, verb, resource, every_namespace, every_name",
    [
        ("GET", "/api/v1/pods", "list", "pods", True, True),
        ("HEAD", "/api/v1/pods", "list", "pods", True, True),
        ("GET", "/api/v1/pods?watch=1", "watch", "pods", True, True),
        ("GET", "/api/v1/pods?watch=", "watch", "pods", True, True),
        ("GET", "/api/v1/watch/pods", "watch", "pods", True, True),
        ("GET", "/api/v1/pods?fieldSelector=metadata.namespace%3Dprod", "list", "pods", True, True),
        ("GET", "/api/v1/pods?fieldSelector=metadata.namespace%3D%3Dprod", "list", "pods", True, True),
        ("GET", "/api/v1/pods?fieldSelector=metadata.namespace!%3Ddev", "list", "pods", True, True),
        ("GET", "/api/v1/watch/secrets?fieldSelector=metadata.namespace%3Dprod", "watch", "secrets", True, True),
        ("GET", "/api/v1/secrets?fieldSelector=metadata.name%3Ddb", "list", "secrets", True, False),
        ("GET", "/apis/apps/v1/deployments?watch=1", "watch", "deployments", True, True),
        ("GET", "/apis/apps/v1/watch/deployments", "watch", "deployments", True, True),
        ("GET", "/apis/batch/v1/cronjobs?limit=500", "list", "cronjobs", True, True),
        ("GET", "/apis/example.com/v1/widgets", "list", "widgets", True, True),  # custom: taken to be namespaced
        ("GET", "/api/v1/namespaces", "list", "namespaces", True, True),  # Namespaces are their own namespace
        ("DELETE", "/api/v1/pods", "deletecollection", "pods", True, True),
        ("GET", "/api/v1/pods/", "list", "pods", True, True),
        ("GET", "/api/v1/%70ods", "list", "pods", True, True),
        # namespaced, named and cluster-scoped requests reach what they name
        ("GET", "/api/v1/namespaces/prod/pods", "list", "pods", False, True),
        ("GET", "/api/v1/namespaces/prod/pods/web", "get", "pods", False, False),
        ("GET", "/api/v1/namespaces/prod", "get", "namespaces", False, False),
        ("GET", "/api/v1/nodes", "list", "nodes", False, True),
        ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles", "list", "clusterroles", False, True),
        ("GET", "/apis/storage.k8s.io/v1/storageclasses?watch=1", "watch", "storageclasses", False, True),
        ("GET", "/version", "get", "/version", False, False),
    ],
)
def test_scope_of_a_request(method, target, verb, resource, every_namespace, every_name):
    op = kubeops.classify("k8s", method, target, {}, None)
    assert (op.details["verb"], op.resource) == (verb, resource)
    assert (op.details["every_namespace"], op.details["every_name"]) == (every_namespace, every_name)
    if every_namespace:
        assert op.details["namespace"] == "" and " in every namespace on k8s" in op.summary


@pytest.mark.parametrize(
    "document, name, every_name",
    [
        ({"metadata": {"name": "keep"}}, "keep", False),
        ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "db", "namespace": "default"}}, "db", False),
        ({"metadata": {"generateName": "db-"}}, "", True),  # the server completes the name at random
        ({"metadata": {"name": 7}}, "", True),
        ({"metadata": "db"}, "", True),
        ({}, "", True),
        ([], "", True),
        (b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: db}\n", "", True),  # YAML: unread
        (b'{"metadata":{"name":"a","name":"db"}}', "", True),  # duplicate keys
        (b"{broken", "", True),
        (None, "", True),
        (b"", "", True),
    ],
)
def test_a_created_object_is_named_by_its_body(document, name, every_name):
    content = document if isinstance(document, bytes) or document is None else json.dumps(document).encode()
    op = kubeops.classify("k8s", "POST", "/api/v1/namespaces/default/configmaps", {}, content)
    assert (op.details["verb"], op.details["name"], op.details["every_name"]) == ("create", name, every_name)


@pytest.mark.parametrize(
    "document, namespace, every_namespace",
    [
        ({"metadata": {"name": "prod"}}, "prod", False),
        ({"metadata": {"generateName": "prod-"}}, "", True),
        (None, "", True),
    ],
)
def test_a_created_namespace_is_its_own_namespace(document, namespace, every_namespace):
    op = kubeops.classify("k8s", "POST", "/api/v1/namespaces", {}, None if document is None else json.dumps(document).encode())
    assert (op.details["namespace"], op.details["every_namespace"]) == (namespace, every_namespace)


@pytest.mark.parametrize(
    "content_type, document, kind",
    [
        ("application/merge-patch+json", {"data": {"a": "b"}}, "json"),
        ("application/merge-patch+json; charset=utf-8", {"data": {"a": "b"}}, "json"),
        ("application/strategic-merge-patch+json", {"spec": {"replicas": 3}}, "json"),
        ("application/apply-patch+yaml", {"apiVersion": "v1", "kind": "ConfigMap"}, "json"),  # JSON is YAML
        ("application/apply-patch+yaml", b"apiVersion: v1\nkind: ConfigMap\n", "other"),
        ("application/json-patch+json", [{"op": "replace", "path": "/spec/replicas", "value": 500}], "json-patch"),
        ("application/json-patch+json; charset=utf-8", [{"op": "add", "path": "/data", "value": {}}], "json-patch"),
        ("application/json-patch+json", {"spec": {"replicas": 1}}, "json-patch"),  # what the server reads it as
        ("application/json", {"spec": {"replicas": 1}}, "other"),  # 415 at the server
        ("Application/Merge-Patch+Json", {"spec": {"replicas": 1}}, "other"),  # patch types are matched as sent
        ("", {"spec": {"replicas": 1}}, "other"),
        ("application/apply-patch+cbor", b"\xa1dspec\xa0", "other"),
        ("application/merge-patch+json", b"{broken", "unparseable"),
    ],
)
def test_a_patch_body_is_read_by_its_content_type(content_type, document, kind):
    content = document if isinstance(document, bytes) else json.dumps(document).encode()
    headers = {"content-type": [content_type]} if content_type else {}
    op = kubeops.classify("k8s", "PATCH", "/apis/apps/v1/namespaces/default/deployments/web", headers, content)
    assert (op.details["verb"], op.details["body"]) == ("patch", kind)


def readings(op):
    return [(p.details["verb"], p.details["namespace"], p.resource, p.details["name"], p.details["every_namespace"])
            for p in op.parts]


@pytest.mark.parametrize(
    "method, path, served",
    [
        # an empty namespace segment is every namespace to the API server (requestinfo.go splitPath)
        ("GET", "/api/v1/namespaces//pods", ("list", "", "pods", "", True)),
        ("GET", "/api/v1/namespaces//secrets?watch=1", ("watch", "", "secrets", "", True)),
        ("GET", "/api/v1/watch/namespaces//secrets", ("watch", "", "secrets", "", True)),
        ("DELETE", "/api/v1/namespaces//pods", ("deletecollection", "", "pods", "", True)),
        ("GET", "/apis/apps/v1/namespaces//deployments", ("list", "", "deployments", "", True)),
        ("GET", "/api/v1/namespaces%2F%2Fpods", ("list", "", "pods", "", True)),
        ("GET", "/api/v1/namespaces//pods/web", ("get", "", "pods", "web", True)),
        ("GET", "/api/v1/namespaces/prod/pods;x=1", ("list", "prod", "pods;x=1", "", False)),
        ("GET", "/api/v1/namespaces/prod/%2573ecrets", ("list", "prod", "%73ecrets", "", False)),
        ("GET", "/api/v1/namespaces/default/pods//exec", ("list", "default", "pods/exec", "", False)),
        ("GET", "/api/v1/namespaces/default/pods/web//exec", ("get", "default", "pods", "web", False)),
        ("DELETE", "/apis/apps/v1/namespaces//deployments?labelSelector=app%3Dweb",
         ("deletecollection", "", "deployments", "", True)),
    ],
)
def test_a_path_the_server_reads_otherwise_is_decided_both_ways(method, path, served):
    op = kubeops.classify("k8s", method, path, {}, None)
    assert len(op.parts) == 2 and readings(op)[1] == served
    assert op.parts[0].details["path"] == op.details["path"] and op.risk == max(p.risk for p in op.parts)


@pytest.mark.parametrize("path", ["/api/v1/namespaces/prod/pods/", "/api/v1/namespaces/prod/%70ods",
                                  # an empty segment where the server's routes have fixed words: 404 there
                                  "/api/v1//namespaces/prod/pods", "/api/v1//namespaces//kube-system",
                                  "/api/v1/namespaces/prod//pods", "/api/v1//pods", "/api/v1/watch//pods",
                                  "/api//v1/namespaces//prod/pods", "//api/v1/pods", "/apis/apps//v1/deployments",
                                  "/api/v1/namespaces%2Fprod%2Fpods", "/version", "/api/v1"])
def test_a_path_read_one_way_has_one_reading(path):
    assert kubeops.classify("k8s", "GET", path, {}, None).parts == ()
