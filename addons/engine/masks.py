"""Masks: what a rule says to hide, and hiding it in documents, text and streams.

A mask is one of

    fields:  [JSONPath, ...]      values at these paths          ($.users[*].email, $..password)
    keys:    [glob, ...] | builtin values under matching key names (*token*, *secret*, password, ...)
    objects: {kind, fields}       fields of every object of a kind, wherever it is (a Secret's
                                  data in an object, a list, a Table row or a watch event)
    detect:  [entity or group]    entities found in string values (secrets, pii, EMAIL_ADDRESS, ...)

with an operator (`redact` → `[EMAIL_ADDRESS]`, `partial` → `****1111`, `hash` → a keyed
HMAC-SHA256, so equal values stay matchable across records without being readable) and,
for `detect`, a score threshold. The strings `secrets`, `pii` and `secret-keys` are
shorthands for the common cases, and `kubernetes-secrets` / `kubernetes-env` for Secret
data and container environment values.

Protocols hand the masker "structured values with names": a JSON document (an HTTP body,
SQL rows as objects keyed by column, a Kubernetes object). Field and key masks replace
whole values; detection runs on string leaves, on keys, and on numbers long enough to be a
card number (a number found to be one becomes the masked string), so JSON stays valid.
JSON with duplicate keys is re-serialised (one value per key, masked) rather than
forwarded byte for byte: a client could read the other value. Text is decoded in the
charset the response declares (or its byte-order mark) and re-encoded in it; text whose
charset is unknown, or that carries NUL characters (UTF-16 sent as something else), is
refused. Field and key masks need a structure: a body that is not JSON is refused when one
applies, rather than passed through in some other representation. Headers are masked as
name/value pairs: credential headers and names a `keys` mask matches whole, detection on
the rest (`Masker.headers`).

Pure code: the detector is passed in (addons/engine/detectors.py builds the real one).
"""

from __future__ import annotations

import codecs
import fnmatch
import functools
import hashlib
import hmac
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from jsonpath_ng.ext import parse as jsonpath_parse

from addons.engine import sqltext
from addons.engine.bridge import SQL_REQUEST, SQL_RESULTS, SSH_RESULTS
from addons.engine.jsonpaths import Locator

OPERATION = "application/vnd.custody.operation+json"
"""An Operation's details as the recorder stores them (maskpool.operation_doc): the
SQL text in them is masked as statements, the rest as a document."""
REMEMBERED = 2048
"""Strings up to this length have what detection made of them kept (per Masker)."""
OPERATORS = ("redact", "partial", "hash")
BUILTIN_KEYS = ("*token*", "*secret*", "*password*", "*passwd*", "api_key", "apikey", "authorization", "*private_key*")
SECRET_ENTITIES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "GITLAB_TOKEN", "SLACK_TOKEN",
    "JWT", "PRIVATE_KEY", "AUTH_CREDENTIAL", "URL_CREDENTIAL", "GENERIC_SECRET",
)
PII_ENTITIES = ("EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "PHONE_NUMBER", "US_SSN", "IP_ADDRESS")
NER_ENTITIES = ("PERSON", "LOCATION")
GROUPS = {"secrets": SECRET_ENTITIES, "pii": PII_ENTITIES}
ENTITIES = SECRET_ENTITIES + PII_ENTITIES + NER_ENTITIES
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
LAST_APPLIED_NAME = LAST_APPLIED.rpartition("/")[2]
"""The annotation's name after its slash, which JSON may write as \\/."""
ERROR_TEXT_FIELDS = ("M", "D", "H", "W")
QUOTING_ERRORS = {
    "22": (("M", r'"[^"]*"', '"[REDACTED]"'), ("D", r'"[^"]*"', '"[REDACTED]"')),  # invalid input: "<value>"
    "23": (("D", r"=\(.*\)", "=([REDACTED])"), ("D", r"row contains \(.*\)", "row contains ([REDACTED])")),
}
"""Data (22) and integrity (23) errors quote row values; which column they came from is unknown."""

CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
                                "x-auth-token", "proxy-authenticate-info", "authentication-info"})
"""Headers that carry credentials whatever their value looks like: masked whole by secret masks."""
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "content-encoding", "content-type",
                             "connection", "keep-alive", "upgrade", "trailer", "te"})
"""Headers that frame the message: never rewritten (masking them would break the response)."""
CLEAN_KEYS = 50_000
"""How many keys without findings a masker remembers."""
NUMBER_MIN = 10 ** 11
"""The smallest number detection looks at: the shortest card number has 12 digits."""
UNICODE_WIDE = ("utf-16", "utf-32", "utf_16", "utf_32", "utf16", "utf32", "ucs-2", "ucs2", "ucs-4")
BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
        (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))

PRESETS = {
    "secrets": {"detect": ["secrets"]},
    "pii": {"detect": ["pii"]},
    "secret-keys": {"keys": "builtin"},
    "kubernetes-secrets": {"objects": {"kind": "Secret", "fields": ["data", "stringData"]}},
    "kubernetes-env": {"fields": ["$..env[*].value"]},
}


class MaskError(Exception):
    """A body a mask applies to cannot be masked; it must be refused, never passed on."""


class Finder(Protocol):
    def find(self, text: str, entities: frozenset[str], threshold: float, name: str = "") -> list: ...


@dataclass(frozen=True)
class Mask:
    kind: str  # fields | keys | objects | detect
    label: str
    operator: str = "redact"
    paths: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    object_kind: str = ""
    entities: frozenset[str] = frozenset()
    threshold: float = 0.5
    keep: int = 4

    @functools.cached_property
    def compiled(self) -> tuple:
        return tuple(jsonpath_parse(p) for p in self.paths)

    @functools.cached_property
    def locators(self) -> tuple[Locator, ...]:
        return tuple(Locator(expr) for expr in self.compiled)

    def names(self, name: str) -> bool:
        """Does a `keys` mask's glob match this (lower-cased) name?"""
        return self._globs.fullmatch(name) is not None

    @functools.cached_property
    def _globs(self) -> re.Pattern:
        return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in self.keys) or "(?!)", re.DOTALL)


CREDENTIAL_MASK = Mask(kind="keys", label="credential headers", keys=tuple(sorted(CREDENTIAL_HEADERS)))


def parse(raw: Any) -> Mask:
    """One mask from a rule's `masks:` entry; ValueError names what is wrong."""
    if isinstance(raw, str):
        if raw not in PRESETS:
            raise ValueError(f"unknown mask {raw!r} (presets: {', '.join(PRESETS)})")
        spec, label = PRESETS[raw], raw
    else:
        spec, label = raw, ""
    kinds = [k for k in ("fields", "keys", "objects", "detect") if k in spec]
    if len(kinds) != 1:
        raise ValueError("a mask has exactly one of fields, keys, objects or detect")
    kind = kinds[0]
    operator = spec.get("operator", "redact")
    if operator not in OPERATORS:
        raise ValueError(f"operator {operator!r} is not one of {', '.join(OPERATORS)}")
    common = {"kind": kind, "operator": operator, "keep": int(spec.get("keep", 4))}
    values = spec[kind]
    if kind == "fields":
        paths = tuple([values] if isinstance(values, str) else values)
        for p in paths:
            try:
                jsonpath_parse(p)
            except Exception as e:  # jsonpath-ng raises several unrelated types
                raise ValueError(f"not a JSONPath: {p!r}: {e}") from None
        return Mask(label=label or f"fields:{','.join(paths)}", paths=paths, **common)
    if kind == "keys":
        keys = BUILTIN_KEYS if values == "builtin" else tuple([values] if isinstance(values, str) else values)
        return Mask(label=label or f"keys:{','.join(keys)}", keys=tuple(k.lower() for k in keys), **common)
    if kind == "objects":
        if not isinstance(values, dict) or not values.get("kind") or not values.get("fields"):
            raise ValueError("objects needs a kind and fields: {kind: Secret, fields: [data, stringData]}")
        return Mask(label=label or f"objects:{values['kind']}", object_kind=values["kind"],
                    keys=tuple(values["fields"]), **common)
    names = [values] if isinstance(values, str) else values
    entities: set[str] = set()
    for name in names:
        if name in GROUPS:
            entities.update(GROUPS[name])
        elif name in ENTITIES:
            entities.add(name)
        else:
            raise ValueError(f"unknown entity {name!r} (groups: secrets, pii; entities: {', '.join(ENTITIES)})")
    threshold = float(spec.get("threshold", 0.5))
    if not 0 <= threshold <= 1:
        raise ValueError("threshold must be between 0 and 1")
    return Mask(label=label or f"detect:{','.join(names)}", entities=frozenset(entities), threshold=threshold, **common)


def parse_all(raw: list | tuple) -> tuple[Mask, ...]:
    return tuple(parse(m) for m in raw)


@dataclass
class Report:
    """What was masked: counts per mask and per entity, never the values."""

    fields: Counter = field(default_factory=Counter)
    entities: Counter = field(default_factory=Counter)

    @property
    def masked(self) -> int:
        return sum(self.fields.values()) + sum(self.entities.values())

    def add(self, other: Report) -> None:
        self.fields.update(other.fields)
        self.entities.update(other.entities)

    def as_dict(self) -> dict[str, Any]:
        return {"masked": self.masked, "fields": dict(self.fields), "entities": dict(self.entities)}


class Masker:
    """Applies a set of masks, with one detector and one hashing key."""

    def __init__(self, masks: tuple[Mask, ...], finder: Finder | None, hash_key: bytes) -> None:
        self.masks = masks
        self.finder = finder
        self.hash_key = hash_key
        self.structural = tuple(m for m in masks if m.kind != "detect")
        detect = [m for m in masks if m.kind == "detect"]
        self.by_entity: dict[str, Mask] = {}
        for m in detect:
            for e in m.entities:
                self.by_entity.setdefault(e, m)
        self.entities = frozenset(self.by_entity)
        self.threshold = min((m.threshold for m in detect), default=1.0)
        self.clean_keys: set[str] = set()
        self.header_masks: dict[str, Mask | None] = {}
        if self.entities and finder is None:
            raise MaskError("content detection is not available")
        self._detected = functools.lru_cache(maxsize=4096)(self._detect)

    # operators

    def replace(self, value: str, mask: Mask, label: str) -> str:
        if mask.operator == "partial":
            return "****" + value[-mask.keep:] if len(value) > mask.keep * 2 else "****"
        if mask.operator == "hash":
            digest = hmac.new(self.hash_key, value.encode(), hashlib.sha256).hexdigest()[:16]
            return f"[{label}:{digest}]"
        return f"[{label}]"

    def _whole(self, value: Any, mask: Mask) -> str:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
        return self.replace(text, mask, "REDACTED")

    # text

    def text(self, text: str, report: Report, name: str = "") -> str:
        """Mask detected entities in one string. The same short strings come back again and
        again (a statement's command, a table name, the SQL of a request and of its record),
        so what detection made of them is kept."""
        if not self.entities:
            return text
        masked, found = self._detected(text, name) if len(text) <= REMEMBERED else self._detect(text, name)
        if found:
            report.entities.update(found)
        return masked

    def _detect(self, text: str, name: str) -> tuple[str, tuple[str, ...]]:
        findings = [f for f in self.finder.find(text, self.entities, self.threshold, name)
                    if f.score >= self.by_entity[f.entity].threshold]
        for f in sorted(findings, key=lambda f: f.start, reverse=True):
            text = text[:f.start] + self.replace(text[f.start:f.end], self.by_entity[f.entity], f.entity) + text[f.end:]
        return text, tuple(f.entity for f in findings)

    def lines(self, text: str, report: Report) -> str:
        """Mask a text body line by line (a line is to text what a leaf is to JSON), after
        masking what spans lines: PEM private keys."""
        if "PRIVATE_KEY" in self.entities and "PRIVATE KEY-----" in text:
            pem = self.by_entity["PRIVATE_KEY"]
            for f in sorted(self.finder.find(text, frozenset({"PRIVATE_KEY"}), pem.threshold), key=lambda f: -f.start):
                text = text[:f.start] + self.replace(text[f.start:f.end], pem, "PRIVATE_KEY") + text[f.end:]
                report.entities["PRIVATE_KEY"] += 1
        return "\n".join(self.text(line, report) for line in text.split("\n"))

    def json_text(self, text: str, report: Report) -> str | None:
        """Text that is one JSON object or array (tool results often are), masked as a
        document and written back in its layout (one line, or indented); None for other
        text. Text with nothing masked comes back as it was."""
        stripped = text.strip()
        if stripped[:1] not in ("{", "["):
            return None
        try:
            doc = json.loads(stripped)
        except ValueError:
            return None
        if not isinstance(doc, (dict, list)):
            return None
        before = report.masked
        masked = self.document(doc, report)
        if report.masked == before:
            return text
        return json.dumps(masked, ensure_ascii=False, indent=2 if "\n" in stripped else None)

    # documents

    def document(self, doc: Any, report: Report, source: str | None = None) -> Any:
        """Mask a JSON document: field and key masks first, then detection on string leaves.
        `source` is the text it was parsed from, if at hand: an `objects` mask has nothing to
        look for where neither its kind nor kubectl's annotation is in it, and no \\u escape
        could spell them (a 1,000-pod list is then not walked for Secrets)."""
        for mask in self.structural:
            if mask.kind == "fields":
                for locator in mask.locators:
                    for location in locator.find(doc):
                        if not _masked_already(location.value):
                            doc = locator.put(doc, location, self._whole(location.value, mask))
                            report.fields[mask.label] += 1
            elif mask.kind == "objects":
                if source is None or any(word in source for word in (mask.object_kind, LAST_APPLIED_NAME, "\\u")):
                    doc = self._objects(doc, mask, report)
            else:
                doc = self._keys(doc, mask, report)
        if self.entities:
            doc = self._leaves(doc, report, "")
        return doc

    def _keys(self, node: Any, mask: Mask, report: Report) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if mask.names(str(k).lower()) and not _masked_already(v):
                    out[k] = self._whole(v, mask)
                    report.fields[mask.label] += 1
                else:
                    out[k] = self._keys(v, mask, report)
            return out
        if isinstance(node, list):
            return [self._keys(v, mask, report) for v in node]
        return node

    def _objects(self, node: Any, mask: Mask, report: Report, typed: bool = False) -> Any:
        """Every value under the named fields of objects of the kind (each key of a
        Secret's data masked on its own, so the keys stay readable), wherever they are: an
        object, the items of its list (`SecretList` items carry no kind of their own), a
        Table row, a watch event. The copy of an object kubectl keeps in its
        last-applied-configuration annotation is masked the same way."""
        if isinstance(node, list):
            return [self._objects(v, mask, report, typed) for v in node]
        if not isinstance(node, dict):
            return node
        is_list = node.get("kind") == f"{mask.object_kind}List"
        out = {k: self._objects(v, mask, report, is_list and k == "items") for k, v in node.items()}
        if typed or node.get("kind") == mask.object_kind:
            for name in mask.keys:
                value = out.get(name)
                if isinstance(value, dict):
                    out[name] = {k: v if _masked_already(v) else self._whole(v, mask) for k, v in value.items()}
                    report.fields[mask.label] += sum(1 for v in value.values() if not _masked_already(v))
                elif value is not None and not _masked_already(value):
                    out[name] = self._whole(value, mask)
                    report.fields[mask.label] += 1
        annotations = (out.get("metadata") or {}).get("annotations") if isinstance(out.get("metadata"), dict) else None
        if isinstance(annotations, dict) and isinstance(annotations.get(LAST_APPLIED), str):
            out["metadata"] = {**out["metadata"], "annotations": {
                **annotations, LAST_APPLIED: self._embedded(annotations[LAST_APPLIED], mask, report)}}
        return out

    def _embedded(self, text: str, mask: Mask, report: Report) -> str:
        """An object serialised into an annotation: masked as an object, or whole when it
        cannot be read (it might be the kind's)."""
        try:
            inner = json.loads(text)
        except ValueError:
            report.fields[mask.label] += 1
            return self._whole(text, mask)
        before = sum(report.fields.values())
        masked = self._objects(inner, mask, report)
        return text if sum(report.fields.values()) == before else json.dumps(masked, separators=(",", ":"))

    # SQL text

    def masks_name(self, name: str) -> Mask | None:
        """The structural mask that hides a column (or key) of this name: a `keys` glob, or a
        `fields` path whose first step names it ($.password, $..password)."""
        lower = name.lower()
        for mask in self.structural:
            if mask.kind == "keys" and mask.names(lower):
                return mask
            if mask.kind == "fields" and any(top_field(m.full_path) == name
                                             for expr in mask.compiled for m in expr.find({name: ""})):
                return mask
        return None

    def statement(self, sql: str, report: Report) -> str:
        """SQL text masked as a document of values: a literal compared with or assigned to a
        masked column is hidden whole (`password = '…'`, `VALUES ('…')` under it); detection
        runs on the value of each literal written with escapes as the server reads it (an
        E'\\t' is a tab), then on the whole text (literals, comments, identifiers)."""
        out = sql
        for lit in reversed(sqltext.literals(sql)):
            if lit.column and (mask := self.masks_name(lit.column)):
                replacement = sqltext.quoted(self._whole(lit.value or out[lit.start:lit.end], mask))
                report.fields[mask.label] += 1
            elif lit.escaped and lit.value is not None and self.entities and \
                    (found := self.text(lit.value, report, lit.column)) != lit.value:
                replacement = sqltext.quoted(found)  # the text hid it: detection below sees what it reads as
            else:
                continue
            out = out[:lit.start] + replacement + out[lit.end:]
        return self.text(out, report) if self.entities else out

    def sql_request(self, doc: dict[str, Any], report: Report) -> dict[str, Any]:
        """A pg_bridge request: its statement masked as SQL text, each parameter bound to a
        masked column hidden whole, detection on the other parameters."""
        sql = doc.get("sql")
        if isinstance(sql, str):
            params = doc.get("params")
            if isinstance(params, list):
                for n, column in sqltext.parameters(sql).items():
                    if 0 < n <= len(params) and params[n - 1] is not None and (mask := self.masks_name(column)):
                        params[n - 1] = self._whole(params[n - 1], mask)
                        report.fields[mask.label] += 1
            doc["sql"] = self.statement(sql, report)
        return self.document(doc, report)

    def operation(self, node: Any, report: Report) -> Any:
        """Recorded operation details: every `sql` and `*_sql` string masked as SQL text,
        wherever it is nested (the statements of a string, what a PREPARE prepares)."""
        def sql(key: str, value: Any) -> Any:
            if (key == "sql" or key.endswith("_sql")) and isinstance(value, str):
                return self.statement(value, report)
            return None

        return _by_key(node, sql)

    def sql_results(self, doc: dict[str, Any], report: Report) -> dict[str, Any]:
        """pg_bridge results: each column as addons/engine/sqlresults.py plans it from its
        description; detection on the text of errors and notices too (an error's DETAIL
        can quote a row)."""
        from addons.engine import sqlresults  # it builds on this module

        for result in doc.get("results", []):
            if "columns" in result:
                sqlresults.mask_table(self, result["columns"], result.get("rows", []), report)
            if "error" in result:
                result["error"] = self._error_text(result["error"], report)
        doc["notices"] = [self._error_text(n, report) for n in doc.get("notices", [])]
        return doc

    def _error_text(self, fields: dict[str, str], report: Report) -> dict[str, str]:
        """Errors and notices: detection on their text; and when column masks apply, the
        values a data or constraint error quotes (`invalid input syntax for type integer:
        "<a password hash>"`, `Key (email)=(…)`) are hidden, since their column is unknown."""
        if self.structural and fields.get("C", "")[:2] in QUOTING_ERRORS:
            fields = dict(fields)
            for key, pattern, replacement in QUOTING_ERRORS[fields["C"][:2]]:
                if key in fields and (hidden := re.sub(pattern, replacement, fields[key])) != fields[key]:
                    fields[key] = hidden
                    report.fields["error values"] += 1
        if not self.entities:
            return fields
        return {k: self.text(v, report) if k in ERROR_TEXT_FIELDS else v for k, v in fields.items()}

    def json_cell(self, text: str, report: Report, keyed: bool = False) -> str:
        """A json/jsonb cell masked as a document (keys, fields and detection inside it).
        `keyed`: it holds table rows as objects keyed by column name (row_to_json(u)), so the
        values under the names of masked columns are hidden wherever they are in it."""
        try:
            doc = json.loads(text)
        except ValueError:
            return self.text(text, report) if self.entities else text
        before = report.masked
        masked = self.document(self._columns_in(doc, report) if keyed else doc, report)
        return text if report.masked == before else json.dumps(masked, ensure_ascii=False)

    def _columns_in(self, node: Any, report: Report) -> Any:
        def column(key: str, value: Any) -> Any:
            if (mask := self.masks_name(key)) is None or value is None or _masked_already(value):
                return None
            report.fields[mask.label] += 1
            return self._whole(value, mask)

        return _by_key(node, column)

    def _leaves(self, node: Any, report: Report, name: str) -> Any:
        if isinstance(node, str):
            return self.text(node, report, name)
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            clean, text = self.clean_keys, self.text
            for k, v in node.items():
                key = k if k in clean else self._key(k, report)
                while key in out:  # two keys masked to the same text stay two keys
                    key += "'"
                kind = type(v)  # the common leaves first, without a call (a list has tens of thousands)
                if kind is str:
                    out[key] = text(v, report, k)
                elif v is None or kind is bool:
                    out[key] = v
                else:
                    out[key] = self._leaves(v, report, k)
            return out
        if isinstance(node, list):
            return [self._leaves(v, report, name) for v in node]
        if isinstance(node, (int, float)) and not isinstance(node, bool) and abs(node) >= NUMBER_MIN:
            before = report.masked
            text = self.text(str(node), report, name)
            return node if report.masked == before else text
        return node

    def _key(self, key: str, report: Report) -> str:
        """A key masked as text; keys found clean are remembered (documents repeat them)."""
        before = report.masked
        masked = self.text(key, report)
        if report.masked == before and len(self.clean_keys) < CLEAN_KEYS:
            self.clean_keys.add(key)
        return masked

    # headers

    def headers(self, fields: list[tuple[str, str]], report: Report) -> list[tuple[str, str]]:
        """Mask header values: credential headers (for secret masks) and names a `keys`
        mask matches are replaced whole, detection runs on the others with the header's
        name as context; framing headers are left alone. `fields` masks do not apply."""
        secrets = not self.entities.isdisjoint(SECRET_ENTITIES)
        out = []
        for name, value in fields:
            lower = name.lower()
            mask = self._header_mask(lower)
            if lower in FRAMING_HEADERS or not value:
                out.append((name, value))
            elif mask is not None or (secrets and lower in CREDENTIAL_HEADERS):
                mask = mask or CREDENTIAL_MASK
                out.append((name, self.replace(value, mask, "REDACTED")))
                report.fields[mask.label] += 1
            else:
                out.append((name, self.text(value, report, lower)))
        return out

    def _header_mask(self, lower: str) -> Mask | None:
        """The `keys` mask a header's name matches, if any; names repeat on every flow, so
        what each matched is kept (up to CLEAN_KEYS names)."""
        if lower in self.header_masks:
            return self.header_masks[lower]
        mask = next((m for m in self.structural if m.kind == "keys" and any(fnmatch.fnmatchcase(lower, g)
                                                                              for g in m.keys)), None)
        if len(self.header_masks) < CLEAN_KEYS:
            self.header_masks[lower] = mask
        return mask

    # bodies

    def body(self, content: bytes, content_type: str) -> tuple[bytes, Report]:
        """Mask a whole response body. JSON is masked as a document, other text as text."""
        report = Report()
        if not self.masks or not content:
            return content, report
        codec, bom = text_codec(content, content_type)
        try:
            text = content[len(bom):].decode(codec)
        except UnicodeDecodeError:
            raise MaskError(f"the response body ({content_type or 'no content type'}) is not text and cannot be masked") from None
        if "\x00" in text:
            raise MaskError(f"the response body ({content_type or 'no content type'}) has NUL characters: its "
                            "charset is not the one it declares, so it cannot be masked") from None
        masked, report = self._text_body(text, content_type, report)
        if masked is None:
            return content, report
        try:
            return bom + masked.encode(codec), report
        except UnicodeEncodeError:
            raise MaskError(f"the masked body cannot be encoded back to {codec}") from None

    def _text_body(self, text: str, content_type: str, report: Report) -> tuple[str | None, Report]:
        """The masked text (None when it is unchanged and may go as it came)."""
        if content_type.startswith(SSH_RESULTS):
            doc = json.loads(text)
            if self.structural:
                raise MaskError("field and key masks need JSON, and command output is text; use detect masks")
            if doc.get("encoding", "utf-8") != "utf-8":
                raise MaskError("the command's output is not text and cannot be masked")
            for stream in ("stdout", "stderr", "error"):
                if isinstance(doc.get(stream), str):
                    doc[stream] = self.lines(doc[stream], report)
            if not report.masked:
                return None, report
            return json.dumps(doc, ensure_ascii=False), report
        if content_type.startswith((SQL_REQUEST, OPERATION)):
            doc = json.loads(text)
            before = report.masked
            masked_doc = self.sql_request(doc, report) if content_type.startswith(SQL_REQUEST) else \
                self.document(self.operation(doc, report), report)
            if report.masked == before:
                return None, report
            return json.dumps(masked_doc, ensure_ascii=False, separators=(",", ":")), report
        if content_type.startswith(SQL_RESULTS):
            masked_doc = self.sql_results(json.loads(text), report)
            if not report.masked and not self.structural:  # column masks retype columns even with no rows
                return None, report
            return json.dumps(masked_doc, ensure_ascii=False, separators=(",", ":")), report
        doc = parse_json(text, content_type)
        if doc is _NOT_JSON:
            if self.structural:
                raise MaskError(f"field masks need a JSON body, and this {content_type or 'response'} is not JSON")
            masked = self.lines(text, report)
            return (masked if report.masked else None), report
        masked_doc = self.document(doc.value, report, text)
        if not report.masked and not doc.duplicates:
            return None, report
        return json.dumps(masked_doc, ensure_ascii=False, separators=(",", ":")), report

    def record(self, line: bytes, report: Report) -> bytes:
        """Mask one record of a stream: a JSON line, a server-sent-events field, or text."""
        prefix = b""
        payload = line
        if line.startswith(b"data:"):
            prefix, payload = b"data:", line[5:]
        elif line[:1] == b":" or line.startswith((b"event:", b"id:", b"retry:")) or not line.strip():
            return line
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise MaskError("a streamed record is not text and cannot be masked") from None
        masked = self.record_text(text, report)
        return line if masked is None else prefix + masked.encode()

    def record_text(self, text: str, report: Report) -> str | None:
        """Mask one record's text: a JSON document or a line; None when unchanged."""
        if "\x00" in text:
            raise MaskError("a streamed record has NUL characters and cannot be masked")
        doc = parse_json(text.strip(), "") if text.strip()[:1] in ("{", "[") else _NOT_JSON
        before = report.masked
        if doc is _NOT_JSON:
            if self.structural:
                raise MaskError("field masks need JSON records, and this stream carries text")
            masked = self.lines(text, report)
            return None if report.masked == before else masked
        masked_doc = self.document(doc.value, report, text)
        if report.masked == before and not doc.duplicates:
            return None
        return (" " if text.startswith(" ") else "") + json.dumps(masked_doc, ensure_ascii=False, separators=(",", ":"))


_NOT_JSON = object()


@dataclass(frozen=True)
class Parsed:
    """A JSON document, and whether it had duplicate keys (readers may disagree on it)."""

    value: Any
    duplicates: bool


def parse_json(text: str, content_type: str) -> Parsed | object:
    """The JSON document in `text`, or _NOT_JSON. A body that says it is JSON must parse."""
    says_json = "json" in content_type.lower()
    if not says_json and text.lstrip()[:1] not in ("{", "["):
        return _NOT_JSON
    duplicates = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            duplicates.append(True)
        return out

    try:
        return Parsed(json.loads(text, object_pairs_hook=pairs), bool(duplicates))
    except ValueError:
        if says_json:
            raise MaskError(f"the response says it is {content_type} but does not parse as JSON") from None
        return _NOT_JSON


def text_codec(content: bytes, content_type: str) -> tuple[str, bytes]:
    """The codec a body's text is in, and its byte-order mark: the mark wins, then the
    declared charset, then UTF-8. UTF-16/32 must say their byte order (a mark, or -le/-be);
    an unknown charset cannot be masked."""
    for bom, codec in BOMS:
        if content.startswith(bom):
            return codec, bom
    charset = charset_of(content_type)
    if not charset:
        return "utf-8", b""
    try:
        codec = codecs.lookup(charset).name
    except LookupError:
        raise MaskError(f"the response's charset {charset!r} is unknown, so it cannot be masked") from None
    if codec in ("utf-16", "utf-32"):
        raise MaskError(f"the response is {charset} without a byte-order mark: its byte order is ambiguous, so it "
                        "cannot be masked")
    return codec, b""


def charset_of(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"').strip()
    return ""


def _by_key(node: Any, replace) -> Any:
    """A JSON document rebuilt with `replace(key, value)` for the value under each key, at
    any depth; where it answers None, the value is looked into instead."""
    if isinstance(node, list):
        return [_by_key(v, replace) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        replaced = replace(str(k), v)
        out[k] = _by_key(v, replace) if replaced is None else replaced
    return out


def top_field(path) -> str:
    """The first field a JSONPath match went through (the column, for a row)."""
    while hasattr(path, "left"):
        path = path.left
    return path.fields[0] if getattr(path, "fields", None) else ""


def _masked_already(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("[") and value.endswith("]") and value[1:2].isupper()


class TextRecords:
    """Cuts a text stream into the records a masker masks one at a time: lines, with a PEM
    block (which spans lines) kept whole. A partial line waits for its end, so a secret is
    never split between two records, however slowly a program prints it. A record longer
    than `max_record`, or one that is not UTF-8, raises MaskError: it cannot be masked."""

    PEM_START, PEM_END = b"-----BEGIN ", b"-----END "

    def __init__(self, max_record: int) -> None:
        self.max_record = max_record
        self.pending = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        """The complete records `chunk` finishes (b"" when none is complete yet)."""
        self.pending += chunk
        cut = self._cut()
        if cut == 0:
            if len(self.pending) > self.max_record:
                raise MaskError(f"a line of output is longer than {self.max_record} bytes and cannot be masked")
            return b""
        return self._take(cut)

    def flush(self) -> bytes:
        """What is left at the end of the stream: the last record."""
        return self._take(len(self.pending))

    def _cut(self) -> int:
        """Where the complete records end: after the last newline, unless that is inside a
        PEM block whose END line has not come yet."""
        end = self.pending.rfind(b"\n") + 1
        start = self.pending.rfind(self.PEM_START, 0, end)
        if start < 0:
            return end
        close = self.pending.find(self.PEM_END, start)
        if close < 0 or self.pending.find(b"\n", close) < 0:
            return self.pending.rfind(b"\n", 0, start) + 1
        return end

    def _take(self, n: int) -> bytes:
        record, self.pending = bytes(self.pending[:n]), self.pending[n:]
        if len(record) > self.max_record:
            raise MaskError(f"a record of output is longer than {self.max_record} bytes and cannot be masked")
        try:
            record.decode("utf-8")
        except UnicodeDecodeError:
            raise MaskError("the command's output is not text and cannot be masked") from None
        return record
