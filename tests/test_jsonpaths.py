"""The fast locator of `fields` masks (addons/engine/jsonpaths.py) finds and replaces exactly
what jsonpath-ng does: the same values, in the same order, and the same document after
every match is replaced, for every path in the table on every document in it; paths with
more than the plain steps are left to jsonpath-ng."""

from __future__ import annotations

import copy
import json

import pytest
from jsonpath_ng.ext import parse

from addons.engine.jsonpaths import Locator

PLAIN = [
    "$", "@", "$.a", "a", "$.a.b", "$['a']", "$['b c']", "$.a,b", "$.*", "$[*]", "$.a[*]", "$.a[0]", "$.a[-1]",
    "$.a[5]", "$..a", "$..b", "$..*", "$..[*]", "$..a[*]", "$..a..b", "$..env[*].value", "$.items[*].spec",
    "$.*.x", "$..x.y", "rows[*].ssn", "$..[0]", "$.a.*.b", "$..a.b[*]", "$.a[0,1]",
]
OTHER = ["$.a[1:3]", "$.a[?(@.b)]", "$..a[?(@.b == 1)]", "$.a.`parent`", "$..b.`parent`",
         "$.a.$", "$.a.$.b", "$..$", "$.a.@", "$..@.b"]  # $ and @ after the first step: jsonpath-ng's own reading
DOCUMENTS = [
    {},
    [],
    "a string",
    7,
    None,
    {"a": 1},
    {"a": {"b": 2, "c": [1, 2, {"b": 3}]}, "b c": "x"},
    {"a": [{"b": 1}, {"b": [1, 2]}, "b", 4, None, [{"b": 5}]], "b": {"a": {"b": 6}}},
    [{"a": 1}, {"a": {"a": {"b": 2}}}, [[{"x": {"y": 1}}]]],
    {"a": "not a dict", "x": {"y": [1, {"y": 2}]}, "rows": [{"ssn": "1"}, {"name": "n"}, 3]},
    {"items": [{"spec": {"containers": [{"env": [{"name": "A", "value": "1"}, {"name": "B"}]}]}},
               {"spec": None}, {"other": 1}],
     "env": {"value": "a dict, not a list"}},
    {"a": {"x": {"b": 1}, "y": [{"b": 2}], "z": 3}, "env": [[{"value": 1}], {"value": 2}, "value"]},
    {"a": [], "b": [[]], "c": {"a": []}},
]


def by_jsonpath_ng(path: str, doc):
    expr, doc = parse(path), copy.deepcopy(doc)
    matches = expr.find(doc)
    values = [copy.deepcopy(m.value) for m in matches]
    for n, m in enumerate(matches):
        doc = m.full_path.update(doc, f"[MASKED {n}]")
    return values, doc


def by_locator(path: str, doc):
    locator, doc = Locator(parse(path)), copy.deepcopy(doc)
    locations = locator.find(doc)
    values = [copy.deepcopy(location.value) for location in locations]
    for n, location in enumerate(locations):
        doc = locator.put(doc, location, f"[MASKED {n}]")
    return values, doc


@pytest.mark.parametrize("path", PLAIN + OTHER)
@pytest.mark.parametrize("doc", DOCUMENTS, ids=[json.dumps(d)[:40] for d in DOCUMENTS])
def test_the_locator_finds_and_replaces_what_jsonpath_ng_does(path, doc):
    assert by_locator(path, doc) == by_jsonpath_ng(path, doc)


@pytest.mark.parametrize("path, fast", [(p, True) for p in PLAIN] + [(p, False) for p in OTHER])
def test_only_plain_paths_are_walked_without_jsonpath_ng(path, fast):
    assert (Locator(parse(path)).fast is not None) is fast
