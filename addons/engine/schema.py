"""JSON Schema validation with errors that name the file and the field.

The configuration and the rule files are both described by JSON Schema documents under
`addons/engine/schemas/`, so the format is documented in one place and editors can check it too.

A document that validated once is remembered by digest (of the schema and the document's
canonical JSON) in the user's cache directory, so the command line and the bridges do not
load the validator for a file that has not changed since it was last checked.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jsonschema

SCHEMAS = Path(__file__).parent / "schemas"


@functools.cache
def validator(name: str) -> jsonschema.protocols.Validator:
    import jsonschema

    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def field_path(parts) -> str:
    """`['connections', 0, 'credential']` -> `connections[0].credential`."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _unknown_fields(error: jsonschema.ValidationError) -> str:
    """`unknown field ('rulez' was unexpected), did you mean 'rules'?`: the misspelled keys,
    each with the closest field the schema knows there."""
    known = list(error.schema.get("properties", {}))
    extra = [k for k in error.instance if k not in known] if isinstance(error.instance, dict) else []
    out = []
    for key in extra:
        close = difflib.get_close_matches(str(key), known, n=1)
        out.append(f"unknown field ({key!r} was unexpected), " + (f"did you mean {close[0]!r}?" if close else
                                                                    f"known fields: {', '.join(known)}"))
    return "; ".join(out) or error.message


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return _unknown_fields(error)
    if error.validator in ("oneOf", "anyOf") and error.context:
        # Prefer what is wrong inside the branch of the right type over "is not of type".
        specific = [e for e in error.context if e.validator != "type"] or error.context
        from jsonschema.exceptions import best_match

        return _message(best_match(specific))
    return error.message


def _known_valid(name: str, document: Any) -> Path | None:
    """Where the mark that `document` validated against schema `name` lives (None: no cache)."""
    try:
        text = json.dumps(document, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return None
    key = hashlib.sha256((SCHEMAS / f"{name}.json").read_bytes() + b"\0" + text.encode()).hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "custody" / "valid"
    return cache / key


def errors(name: str, document: Any) -> list[tuple[str, str]]:
    """All schema violations of `document` as (field path, message), in document order."""
    mark = _known_valid(name, document)
    if mark is not None and mark.exists():
        return []
    found = sorted(validator(name).iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    if not found and mark is not None:
        try:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.touch()
        except OSError:
            pass  # no cache here (read-only home): validating again next time is all it costs
    return [(field_path(e.absolute_path), _message(e)) for e in found]
