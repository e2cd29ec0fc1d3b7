"""Kubernetes request info as the API server derives it: the table is the API server's own
test table (k8s.io/apiserver requestinfo_test.go), plus what a gateway must add."""

from __future__ import annotations

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
        ("/api/v1/namespaces/default/pods?watch=F", "list", False),
        ("/api/v1/namespaces/default/pods?watch=", "list", False),
        ("/api/v1/watch/namespaces/default/pods", "watch", True),
        ("/api/v1/namespaces/default/pods/web/log?follow=1", "get", True),
        ("/api/v1/namespaces/default/pods/web/log?follow=T", "get", True),
        ("/api/v1/namespaces/default/pods/web/log?follow=false", "get", False),
        ("/api/v1/namespaces/default/pods/web/log", "get", False),
        ("/api/v1/namespaces/default/pods/web?follow=true", "get", False),
    ],
)
def test_streams(target, verb, stream):
    op = kubeops.classify("k8s", "GET", target, {}, None)
    assert (op.details["verb"], op.details["stream"]) == (verb, stream)
