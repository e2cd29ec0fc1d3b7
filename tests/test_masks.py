"""The masker on its own: Kubernetes objects wherever the API puts them."""

from __future__ import annotations

import json

import pytest

from addons.masks import LAST_APPLIED, Masker, Report, parse, parse_all

SECRET = {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "db"}, "data": {"password": "aHVudGVyMg=="},
          "stringData": {"token": "plain"}, "type": "Opaque"}
ITEM = {k: v for k, v in SECRET.items() if k not in ("kind", "apiVersion")}
MASKED_DATA = {"password": "[REDACTED]"}


def mask(doc, *masks):
    report = Report()
    return Masker(parse_all(masks or ("kubernetes-secrets",)), None, b"k").document(doc, report), report


@pytest.mark.parametrize(
    "doc, where",
    [
        (SECRET, lambda d: d["data"]),
        ({"kind": "SecretList", "apiVersion": "v1", "items": [ITEM]}, lambda d: d["items"][0]["data"]),
        ({"kind": "List", "items": [SECRET]}, lambda d: d["items"][0]["data"]),
        ({"type": "ADDED", "object": SECRET}, lambda d: d["object"]["data"]),
        ({"kind": "Table", "rows": [{"cells": ["db"], "object": SECRET}]}, lambda d: d["rows"][0]["object"]["data"]),
    ],
)
def test_secret_data_is_masked_wherever_it_is(doc, where):
    masked, report = mask(doc)
    assert where(masked) == MASKED_DATA and report.fields["kubernetes-secrets"] == 2
    assert "aHVudGVyMg==" not in json.dumps(masked) and "plain" not in json.dumps(masked)


@pytest.mark.parametrize(
    "doc",
    [
        {"kind": "ConfigMap", "data": {"password": "visible"}},
        {"kind": "ConfigMapList", "items": [{"data": {"password": "visible"}}]},
        {"kind": "PodList", "items": [{"data": {"password": "visible"}}]},
        {"items": [{"data": {"password": "visible"}}]},
    ],
)
def test_other_kinds_are_left_alone(doc):
    masked, report = mask(doc)
    assert masked == doc and report.masked == 0


def test_the_last_applied_copy_of_a_secret_is_masked_too():
    table_row = {"kind": "PartialObjectMetadata", "metadata": {"name": "db", "annotations": {
        LAST_APPLIED: json.dumps(SECRET), "team": "shop"}}}
    masked, report = mask({"kind": "Table", "rows": [{"cells": [], "object": table_row}]})
    annotations = masked["rows"][0]["object"]["metadata"]["annotations"]
    assert json.loads(annotations[LAST_APPLIED])["data"] == MASKED_DATA and annotations["team"] == "shop"
    assert report.fields["kubernetes-secrets"] == 2


@pytest.mark.parametrize(
    "annotation, kept",
    [
        (json.dumps({"kind": "ConfigMap", "data": {"a": "b"}}), True),  # not a Secret: as it was
        ("{not json", False),  # unreadable: it might be one, masked whole
    ],
)
def test_last_applied_annotations_of_other_kinds(annotation, kept):
    masked, _ = mask({"kind": "ConfigMap", "metadata": {"annotations": {LAST_APPLIED: annotation}}})
    assert (masked["metadata"]["annotations"][LAST_APPLIED] == annotation) is kept


def test_container_environment_values():
    pod = {"kind": "Pod", "spec": {"containers": [{"env": [{"name": "DB_PASSWORD", "value": "x"},
                                                           {"name": "FROM", "valueFrom": {"secretKeyRef": {}}}]}]}}
    masked, _ = mask(pod, "kubernetes-env")
    assert masked["spec"]["containers"][0]["env"] == [{"name": "DB_PASSWORD", "value": "[REDACTED]"},
                                                      {"name": "FROM", "valueFrom": {"secretKeyRef": {}}}]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"objects": {"kind": "Secret"}}, "objects needs a kind and fields"),
        ({"objects": "Secret"}, "objects needs a kind and fields"),
        ({"objects": {"kind": "Secret", "fields": ["data"]}, "fields": ["$.x"]}, "exactly one of"),
    ],
)
def test_object_mask_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        parse(raw)
