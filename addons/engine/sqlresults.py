"""Masking pg_bridge results (SQL_RESULTS): what happens to each result column.

A column is to SQL what a key is to JSON. What happens to a column is decided from its
description alone — name, type, where the server says it comes from (`origin`), and, for a
computed column, what the terminal found it may be computed from (`sources`, `keyed`,
`opaque`: pg_bridge/terminal/columns.py) — never from the rows: a statement described
before it runs (a prepared statement, a portal) must be announced with the type and
format its rows will arrive in, or a client decodes `[REDACTED]` as an integer.

    masked whole   a masked column (keys globs, a fields path's first step), one computed
                   from one, one whose origin cannot be told: every value replaced; a type
                   other than text becomes text
    JSON           json/jsonb: masked as a document (keys and fields inside, detection on
                   its strings); a column of whole rows as objects (row_to_json(u)) has the
                   keys of masked columns hidden wherever they are in it
    detection      text types, and text arrays (still arrays), in place; types whose text
                   can carry anything (records, composites, inet, unknown types) become text;
                   numbers are checked, and a number detection would mask refuses the result
                   (it cannot be masked in its type); dates, booleans, UUIDs are left alone

Cells are text (the terminal asks the server for text when masks apply, and re-encodes in
the client's formats afterwards), or base64 of the binary form for the types whose binary
form is their text.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from addons.engine.masks import Mask, Masker, MaskError, Report, top_field

TEXT_OID = 25
TEXT_OIDS = frozenset({25, 1043, 1042, 19, 18, 114, 142, 705})
"""text, varchar, bpchar, name, char, json, xml, unknown: their binary form is their text."""
JSON_OIDS = frozenset({114, 3802})
TEXT_ARRAY_OIDS = frozenset({1009, 1015, 1014, 1003})
"""text[], varchar[], bpchar[], name[]: a masked element is still a valid array literal."""
NUMBER_OIDS = frozenset({21, 23, 20, 1700, 790, 1005, 1007, 1016, 1231, 791, 3904, 3926, 3906, 3905, 3927, 3907,
                         4451, 4536, 4532})
"""Integers, numeric, money, their arrays and ranges: a card number can be stored as one."""
PLAIN_OIDS = frozenset({16, 700, 701, 1082, 1083, 1266, 1114, 1184, 1186, 2950, 17, 1560, 1562, 26, 28, 5069, 29, 27,
                        3220, 24, 2202, 2203, 2204, 2205, 2206, 3734, 3769, 4089, 4096, 22, 30, 1000, 1021, 1022,
                        1182, 1183, 1270, 1115, 1185, 1187, 2951, 1001, 1028, 3908, 3910, 3912, 3909, 3911, 3913,
                        4533, 4534, 4535})
"""Booleans, floats, dates and times, UUIDs, bytea, OIDs and their arrays and ranges: no
name, address or key can be written in one."""
RECORD_OIDS = frozenset({2249, 2287})
"""record, record[]: no server reads an anonymous record back from its text, so a masked
result sends them as the text they arrive in."""
JSONB_VERSION = b"\x01"


@dataclass(frozen=True)
class Plan:
    """What happens to one column, decided from its description."""

    whole: Mask | None = None
    json: bool = False
    keyed: bool = False
    detect: bool = False
    strict: bool = False
    """A value detection would change cannot be sent in this type: refuse the result."""
    retype: bool = False


def plan(masker: Masker, column: dict[str, Any]) -> Plan:
    oid = column["type_oid"]
    text_like = oid in TEXT_OIDS
    names = [column["name"], column.get("origin") or "", *(column.get("sources") or ())]
    whole = next((m for m in map(masker.masks_name, filter(None, names)) if m is not None), None)
    if whole is None and column.get("opaque") and masker.structural:
        whole = masker.structural[0]
    if whole is not None:
        return Plan(whole=whole, retype=not text_like)
    if oid in JSON_OIDS:
        return Plan(json=True, keyed=bool(column.get("keyed")))
    if oid in RECORD_OIDS:
        return Plan(detect=bool(masker.entities), retype=True)
    if not masker.entities or oid in PLAIN_OIDS:
        return Plan()
    if text_like or oid in TEXT_ARRAY_OIDS:
        return Plan(detect=True)
    if oid in NUMBER_OIDS:
        return Plan(detect=True, strict=True)
    return Plan(detect=True, retype=True)  # records, composites, inet, types of extensions: their text, as text


def mask_table(masker: Masker, columns: list[dict[str, Any]], rows: list[list[Any]], report: Report) -> None:
    """Mask one result's rows in place and retype its columns, as their plans say."""
    plans = [plan(masker, c) for c in columns]
    names = [c["name"] for c in columns]
    fields = [m for m in masker.structural if m.kind == "fields"]
    for row in rows:
        hit = _field_hits(fields, columns, row, report) if fields else {}
        for i, cell in enumerate(row):
            if cell is None:
                continue
            p, column = plans[i], columns[i]
            mask = p.whole or hit.get(i)
            if mask is not None:
                if p.whole is None and column["type_oid"] not in TEXT_OIDS:
                    raise MaskError(f"a fields mask matched column {names[i]!r} in some rows only, and its type "
                                    f"({column['type_oid']}) cannot hold a masked value; the result was not sent")
                row[i] = _encode(masker._whole(_decode(cell, column, strict=False), mask), column)
                report.fields[mask.label] += 1
            elif p.json or p.detect:
                text = _decode(cell, column)
                before = report.masked
                masked = masker.json_cell(text, report, p.keyed) if p.json else masker.text(text, report, names[i])
                if report.masked == before:
                    continue
                if p.strict:
                    raise MaskError(f"column {names[i]!r} holds a number that looks like "
                                    f"{', '.join(sorted(report.entities)) or 'a masked value'}; a masked value "
                                    f"cannot be sent as that type, so the result was not sent")
                row[i] = _encode(masked, column)
    for column, p in zip(columns, plans):
        if p.retype:
            column.update(type_oid=TEXT_OID, type_size=-1, type_modifier=-1)


def _field_hits(fields: list, columns: list[dict[str, Any]], row: list[Any], report: Report) -> dict[int, Mask]:
    """`fields` masks with conditions see each row as {column: value}: the columns they hit."""
    as_object: dict[str, Any] = {}
    for column, cell in zip(columns, row):
        as_object.setdefault(column["name"], None if cell is None else _decode(cell, column, strict=False))
    hits: dict[int, Mask] = {}
    for mask in fields:
        for expr in mask.compiled:
            for match in expr.find(as_object):
                top = top_field(match.full_path)
                for i, column in enumerate(columns):
                    if column["name"] == top:
                        hits.setdefault(i, mask)
    return hits


def _decode(cell: str, column: dict[str, Any], strict: bool = True) -> str:
    """A cell's text: text cells as they are; binary cells of types whose binary form is
    their text (jsonb: after its version byte)."""
    if column.get("format") != 1:
        return cell
    raw = base64.b64decode(cell)
    if column["type_oid"] == 3802 and raw[:1] == JSONB_VERSION:
        return raw[1:].decode("utf-8", "replace")
    if column["type_oid"] in TEXT_OIDS:
        return raw.decode("utf-8", "replace")
    if strict:
        raise MaskError(f"column {column['name']!r} arrived in binary, which cannot be inspected; "
                        "the result was not sent")
    return raw.hex()


def _encode(text: str, column: dict[str, Any]) -> str:
    if column.get("format") != 1:
        return text
    raw = text.encode()
    return base64.b64encode(JSONB_VERSION + raw if column["type_oid"] == 3802 else raw).decode()

