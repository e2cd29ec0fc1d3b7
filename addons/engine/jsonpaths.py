"""Where a `fields` mask's JSONPath points in a document, found without jsonpath-ng's
per-node bookkeeping.

jsonpath-ng wraps every node it visits in a DatumInContext with its path, and each update
walks the path again from the root: on a 1,000-pod list, `$..env[*].value` took 60 % of the
time to mask it. The paths masks use are plain — `$`, `.name`, `['name']`, `..name`,
`[*]`, `.*`, `[n]` — so those are read here straight from jsonpath-ng's own parse, with its
semantics (jsonpath_ng/jsonpath.py, 1.16: Fields reads only dicts, Wildcard every member of
an object and element of an array, Index arrays only and negative indices from the end,
Descendants its left match and everything under it, pre-order); a path with anything else
(slices, filters, unions) is left to jsonpath-ng. A test compares the two on a table of
paths and documents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from jsonpath_ng import jsonpath as jp


class Location(NamedTuple):
    """A value a path matched, the dict or list holding it (None for the document itself)
    and its key there; or, for a path jsonpath-ng evaluated, its match."""

    value: Any
    container: Any
    key: Any
    match: jp.DatumInContext | None = None


def _fields(names: tuple[str, ...]) -> Callable[[Any], list[Location]]:
    def find(node: Any) -> list[Location]:
        if not isinstance(node, dict):
            return []
        return [Location(node[n], node, n) for n in names if n in node]
    return find


def _wildcard(node: Any) -> list[Location]:
    if isinstance(node, list):
        return [Location(v, node, i) for i, v in enumerate(node)]
    if isinstance(node, dict):
        return [Location(v, node, k) for k, v in node.items()]
    return []


def _index(indices: tuple[int, ...]) -> Callable[[Any], list[Location]]:
    def find(node: Any) -> list[Location]:
        if not isinstance(node, list):
            return []
        return [Location(node[i], node, i) for i in indices if -len(node) <= i < len(node)]
    return find


def _child(left, right) -> Callable[[Any], list[Location]]:
    def find(node: Any) -> list[Location]:
        return [hit for value, *_ in left(node) for hit in right(value)]
    return find


def _descendants(left, right, names: tuple[str, ...] | None) -> Callable[[Any], list[Location]]:
    """`right` is a plain path not starting with `$` or `@` (finder), so it matches nothing
    in a string or a number: the walk does not ask it of the thousands of leaves. `names`:
    the fields `right` reads, when it is just those (`..name`, what masks mostly say),
    looked up in each dict without a call."""
    def find(node: Any) -> list[Location]:
        hits: list[Location] = []
        stack = [value for value, *_ in reversed(left(node))]
        while stack:
            value = stack.pop()
            if isinstance(value, dict):
                if names is None:
                    hits.extend(right(value))
                else:
                    for n in names:
                        if n in value:
                            hits.append(Location(value[n], value, n))
                stack.extend(reversed(value.values()))
            elif isinstance(value, list):
                hits.extend(right(value))
                stack.extend(reversed(value))
        return hits
    return find


def _itself(node: Any) -> list[Location]:
    return [Location(node, None, None)]


def finder(expr: jp.JSONPath, leftmost: bool = True) -> Callable[[Any], list[Location]] | None:
    """A function giving the locations `expr` matches in a document, or None when `expr`
    uses something besides the plain steps. `$` and `@` are plain only as the first step
    (`$.a.$` is the document's root again in jsonpath-ng, not the node reached)."""
    kind = type(expr)
    if kind in (jp.Root, jp.This):
        return _itself if leftmost else None
    if kind is jp.Fields and not expr._deprecated_wildcard_use:
        return _fields(tuple(expr.fields))
    if kind is jp.Wildcard:
        return _wildcard
    if kind is jp.Index:
        return _index(tuple(expr.indices))
    if kind in (jp.Child, jp.Descendants):
        left, right = finder(expr.left, leftmost), finder(expr.right, False)
        if left is None or right is None:
            return None
        if kind is jp.Child:
            return _child(left, right)
        plain = type(expr.right) is jp.Fields and not expr.right._deprecated_wildcard_use
        return _descendants(left, right, tuple(expr.right.fields) if plain else None)
    return None


class Locator:
    """A parsed JSONPath that finds and replaces what it matches."""

    def __init__(self, expr: jp.JSONPath) -> None:
        self.expr = expr
        self.fast = finder(expr)

    def find(self, doc: Any) -> list[Location]:
        """The locations the path matches in `doc`, in jsonpath-ng's order."""
        if self.fast is not None:
            return self.fast(doc)
        return [Location(m.value, None, None, m) for m in self.expr.find(doc)]

    @staticmethod
    def put(doc: Any, location: Location, value: Any) -> Any:
        """`doc` with `value` at `location` (the value itself for the document's root)."""
        if location.match is not None:
            return location.match.full_path.update(doc, value)
        if location.container is None:
            return value
        location.container[location.key] = value
        return doc
