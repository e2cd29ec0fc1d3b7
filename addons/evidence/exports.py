"""exports: the audit log as files an auditor takes away — JSONL and CSV (one row per
event), HAR (HTTP and Kubernetes flows), and mitmproxy flow files that open in
`mitmweb -r` with each flow's decision and approval as its comment.

Every export is a bundle: the data file and `FILE.manifest.json`, which holds the file's
SHA-256, the selection, the hash-chain head at export time and an Ed25519 signature, so
`custody audit verify --export FILE` can prove the file is what the gateway recorded:
JSONL rows carry every hashed column and are re-hashed; every format names each event's
sequence number and hash, which are checked against the store.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from addons.engine.model import AGENT_ATTRIBUTES, MARKERS, canonical_json
from addons.engine.signing import Signer, SigningError, check
from addons.engine.store import COLUMNS, HASHED, Store, chain_hash, digest
from addons.evidence.timeline import (
    Record,
    Selection,
    approvals,
    by_flow,
    comment,
    iso,
    records,
    tool_calls,
    tool_results,
)

FORMATS = ("jsonl", "csv", "har", "flows")
JSON_COLUMNS = ("rules", "principal", "operation", "detail")
CSV_COLUMNS = (
    "seq", "id", "time", "kind", "session", "flow", "approval", "subject", "issuer", "groups",
    *AGENT_ATTRIBUTES, "asserted", "connection", "protocol", "action", "resource", "summary", "risk",
    "effect", "rules", "reason", "status", "step", "approver", "body_size", "body_digest", "prev_hash", "hash",
)
WEB_PROTOCOLS = ("http", "kubernetes", "mcp")


class ExportError(Exception):
    """The export cannot be written, or does not verify; the message says which and why."""


def manifest_path(path: str) -> str:
    return path + ".manifest.json"


# JSONL: every column, JSON columns parsed, the body as text (or base64).


def jsonl_record(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for column in COLUMNS:
        if column == "body":
            continue
        value = row[column]
        if column in JSON_COLUMNS and value is not None:
            parsed = json.loads(value)
            value = parsed if canonical_json(parsed) == value else value  # re-encodes exactly, else kept raw
        out[column] = value
        if column == "ts":
            out["time"] = iso(value)
    body = row["body"]
    if body is not None:
        try:
            out["body"] = body.decode()
        except UnicodeDecodeError:
            out["body_base64"] = base64.b64encode(body).decode()
    rec = Record.of(row)
    if calls := tool_calls(rec):
        out["tool_calls"] = calls  # derived from the columns above (not hashed)
    if results := tool_results(rec):
        out["tool_results"] = results
    return out


def row_of(record: dict[str, Any]) -> dict[str, Any]:
    """The store row a JSONL record came from (what its hash covers)."""
    row = {c: record.get(c) for c in HASHED}
    for column in JSON_COLUMNS:
        if row[column] is not None and not isinstance(row[column], str):
            row[column] = canonical_json(row[column])
    if "body" in record:
        row["body"] = record["body"].encode()
    elif "body_base64" in record:
        row["body"] = base64.b64decode(record["body_base64"])
    else:
        row["body"] = None
    return row


def write_jsonl(rows: Iterable[dict[str, Any]], out: io.TextIOBase) -> list[tuple[int, str]]:
    chain = []
    for row in rows:
        out.write(json.dumps(jsonl_record(row), ensure_ascii=False, sort_keys=False) + "\n")
        chain.append((row["seq"], row["hash"]))
    return chain


# CSV: one row per event, the stable columns in CSV_COLUMNS.


def csv_row(rec: Record) -> dict[str, Any]:
    r = rec.row
    out = {c: r.get(c) for c in CSV_COLUMNS if c in r}
    out.update({
        "time": iso(r["ts"]),
        "groups": ";".join(rec.principal.get("groups") or []),
        **{n: rec.attribute(n) for n in AGENT_ATTRIBUTES},
        "asserted": ";".join(rec.asserted()),
        "summary": rec.operation.get("summary", ""),
        "rules": ";".join(rec.rules),
        "step": rec.step,
        "approver": rec.approver,
    })
    return {c: "" if out.get(c) is None else out[c] for c in CSV_COLUMNS}


def write_csv(rows: Iterable[dict[str, Any]], out: io.TextIOBase) -> list[tuple[int, str]]:
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    chain = []
    for rec in records(rows):
        writer.writerow(csv_row(rec))
        chain.append((rec["seq"], rec["hash"]))
    return chain


# HAR and mitmproxy flows: one entry per recorded flow.


@dataclass
class FlowRecord:
    """A flow as the store holds it: request, decision(s), response, messages."""

    id: str
    events: list[Record]
    request: Record
    response: Record | None
    comment: str

    @property
    def chain(self) -> list[tuple[int, str]]:
        return [(e["seq"], e["hash"]) for e in self.events]


def flow_records(rows: list[dict[str, Any]], protocols: tuple[str, ...] | None = None) -> list[FlowRecord]:
    recs = list(records(rows))
    stories = approvals(recs)
    out = []
    for flow_id, events in by_flow(recs).items():
        request = next((e for e in events if e["kind"] == "request"), None)
        if request is None or (protocols and request["protocol"] not in protocols):
            continue
        response = next((e for e in reversed(events) if e["kind"] == "response"), None)
        out.append(FlowRecord(flow_id, events, request, response, comment(events, stories)))
    return out


def _body(rec: Record) -> bytes:
    return rec["body"] or b""


def _mime(headers: list[list[str]]) -> str:
    return next((v for k, v in headers if k.lower() == "content-type"), "")


def _har_content(rec: Record, headers: list[list[str]]) -> dict[str, Any]:
    body = _body(rec)
    content: dict[str, Any] = {"size": rec["body_size"] or len(body), "mimeType": _mime(headers)}
    try:
        content["text"] = body.decode()
    except UnicodeDecodeError:
        content["text"], content["encoding"] = base64.b64encode(body).decode(), "base64"
    if rec["body"] is None and rec["body_size"]:
        content["comment"] = "body not kept by the store (store.bodies)"
    return content


def har_entry(f: FlowRecord) -> dict[str, Any]:
    req, resp = f.request, f.response
    headers = req.detail.get("headers", [])
    url = req.detail.get("url", "")
    request = {
        "method": req.detail.get("method", ""), "url": url, "httpVersion": req.detail.get("http_version", "HTTP/1.1"),
        "cookies": [], "headers": [{"name": k, "value": v} for k, v in headers],
        "queryString": [{"name": k, "value": v} for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)],
        "headersSize": -1, "bodySize": req["body_size"] or 0,
    }
    if req["body_size"]:
        content = _har_content(req, headers)
        request["postData"] = {"mimeType": content["mimeType"], "text": content.get("text", ""),
                               **({"comment": "base64"} if content.get("encoding") else {})}
    if resp is not None:
        rheaders = resp.detail.get("headers", [])
        response = {"status": resp["status"] or 0, "statusText": "", "httpVersion": request["httpVersion"],
                    "cookies": [], "headers": [{"name": k, "value": v} for k, v in rheaders],
                    "content": _har_content(resp, rheaders), "redirectURL": "", "headersSize": -1,
                    "bodySize": resp["body_size"] or 0}
        elapsed = resp.detail.get("elapsed_ms", 0) or 0
    else:
        response = {"status": 0, "statusText": "", "httpVersion": request["httpVersion"], "cookies": [],
                    "headers": [], "content": {"size": 0, "mimeType": ""}, "redirectURL": "", "headersSize": -1,
                    "bodySize": -1, "comment": "no response was recorded"}
        elapsed = 0
    return {
        "startedDateTime": iso(req["ts"]), "time": elapsed, "request": request, "response": response,
        "cache": {}, "timings": {"send": 0, "wait": elapsed, "receive": 0}, "comment": f.comment,
        "_custody": {"flow": f.id, "session": req["session"], "subject": req["subject"],
                     **{n: req.attribute(n) for n in AGENT_ATTRIBUTES}, "connection": req["connection"],
                     **({"tool_calls": calls} if (calls := tool_calls(req)) else {}),
                     "events": [{"seq": s, "hash": h} for s, h in f.chain]},
    }


def write_har(rows: list[dict[str, Any]], out: io.TextIOBase, head: dict[str, Any]) -> list[tuple[int, str]]:
    flows = flow_records(rows, WEB_PROTOCOLS)
    document = {"log": {
        "version": "1.2", "creator": {"name": "custody", "version": "0.1.0"},
        "comment": f"custody audit export; chain head {head['seq']} {head['hash']}",
        "_custody": {"chain_head": head},
        "pages": [], "entries": [har_entry(f) for f in flows],
    }}
    json.dump(document, out, ensure_ascii=False, indent=1)
    return [pair for f in flows for pair in f.chain]


def mitm_flow(f: FlowRecord):
    """A mitmproxy HTTPFlow rebuilt from the record (bodies as recorded: masked)."""
    from mitmproxy import connection, http, websocket

    req = f.request
    url = req.detail.get("url", "")
    parts = urlsplit(url)
    client = req.detail.get("client") or ["0.0.0.0", 0]
    flow = http.HTTPFlow(
        connection.Client(peername=(client[0], client[1] if len(client) > 1 else 0), sockname=("0.0.0.0", 0),
                          timestamp_start=req["ts"]),
        connection.Server(address=(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))),
    )
    request = http.Request.make(req.detail.get("method", "GET"), url, _body(req),
                                [(k.encode(), v.encode()) for k, v in req.detail.get("headers", [])])
    request.http_version = req.detail.get("http_version", "HTTP/1.1")
    request.timestamp_start = request.timestamp_end = req["ts"]
    flow.request = request
    if f.response is not None:
        resp = f.response
        flow.response = http.Response.make(resp["status"] or 502, _body(resp),
                                           [(k.encode(), v.encode()) for k, v in resp.detail.get("headers", [])])
        flow.response.timestamp_start = flow.response.timestamp_end = resp["ts"]
    messages = [e for e in f.events if e["kind"] == "message"]
    if messages:
        flow.websocket = websocket.WebSocketData()
        for m in messages:
            opcode = websocket.Opcode.TEXT if m.detail.get("text") else websocket.Opcode.BINARY
            flow.websocket.messages.append(websocket.WebSocketMessage(
                opcode, bool(m.detail.get("from_client")), _body(m), m["ts"], dropped=bool(m.detail.get("dropped"))))
    decision = next((e for e in f.events if e["kind"] == "decision" and e["effect"]), None)
    flow.comment = f.comment
    flow.marked = MARKERS.get(decision["effect"], "") if decision else ""
    flow.metadata["custody"] = {"session": req["session"], "subject": req["subject"],
                                "events": [{"seq": s, "hash": h} for s, h in f.chain]}
    return flow


def write_flows(rows: list[dict[str, Any]], out: io.BufferedIOBase) -> list[tuple[int, str]]:
    from mitmproxy import io as mio

    writer = mio.FlowWriter(out)
    chain = []
    for f in flow_records(rows):
        writer.add(mitm_flow(f))
        chain += f.chain
    return chain


# the bundle


@dataclass(frozen=True)
class Bundle:
    path: str
    manifest: dict[str, Any]


def export(store: Store, selection: Selection, fmt: str, path: str, signer: Signer | None) -> Bundle:
    """Write the selected events as `fmt` to `path`, and its signed manifest beside it."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    head_seq, head_hash = store.head()
    rows = selection.rows(store)
    rows = [r for r in rows if r["seq"] <= head_seq]
    return write_bundle(rows, fmt, path, signer, {"seq": head_seq, "hash": head_hash},
                        selection={k: v for k, v in asdict(selection).items() if v not in (None, "")},
                        checkpoint=store.checkpoint())


def write_bundle(rows: Iterable[dict[str, Any]], fmt: str, path: str, signer: Signer | None, head: dict[str, Any],
                 selection: dict[str, Any], checkpoint: dict[str, Any] | None = None) -> Bundle:
    tmp = path + ".partial"
    try:
        if fmt == "flows":
            with open(tmp, "wb") as fh:
                chain = write_flows(list(rows), fh)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                if fmt == "jsonl":
                    chain = write_jsonl(rows, fh)
                elif fmt == "csv":
                    chain = write_csv(rows, fh)
                else:
                    chain = write_har(list(rows), fh, head)
        with open(tmp, "rb") as fh:
            sha = hashlib.file_digest(fh, "sha256").hexdigest()
        manifest = {
            "custody_export": 1, "format": fmt, "file": os.path.basename(path), "sha256": sha,
            "events": len(chain), "first_seq": min((s for s, _ in chain), default=None),
            "last_seq": max((s for s, _ in chain), default=None), "selection": selection,
            "chain_head": head, "checkpoint": {"seq": checkpoint["seq"], "hash": checkpoint["hash"]} if checkpoint else None,
            "exported_at": iso(time.time()),
        }
        if signer is not None:
            manifest["signature"] = signer.sign(manifest).as_dict()
        os.replace(tmp, path)
        with open(manifest_path(path), "w") as fh:
            json.dump(manifest, fh, indent=2)
            fh.write("\n")
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Bundle(path, manifest)


# verifying a bundle


def _chain_of(path: str, fmt: str) -> tuple[list[tuple[int, str]], int]:
    """Each event's (seq, hash) as the file names it, and how many JSONL rows re-hashed."""
    if fmt == "jsonl":
        chain, rehashed = [], 0
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                record = json.loads(line)
                row = row_of(record)
                if row["body"] is not None and digest(row["body"]) != row["body_digest"]:
                    raise ExportError(f"{path}:{number}: event {record.get('seq')}: body does not match its digest")
                if chain_hash(row["prev_hash"], row) != record.get("hash"):
                    raise ExportError(f"{path}:{number}: event {record.get('seq')}: contents do not match its hash")
                if chain and chain[-1][0] + 1 == record["seq"] and chain[-1][1] != row["prev_hash"]:
                    raise ExportError(f"{path}:{number}: event {record['seq']} does not link to event {chain[-1][0]}")
                chain.append((record["seq"], record["hash"]))
                rehashed += 1
        return chain, rehashed
    if fmt == "csv":
        with open(path, encoding="utf-8", newline="") as fh:
            return [(int(r["seq"]), r["hash"]) for r in csv.DictReader(fh)], 0
    if fmt == "har":
        with open(path, encoding="utf-8") as fh:
            entries = json.load(fh)["log"]["entries"]
        return [(e["seq"], e["hash"]) for entry in entries for e in entry["_custody"]["events"]], 0
    from mitmproxy import io as mio

    with open(path, "rb") as fh:
        return [(e["seq"], e["hash"]) for f in mio.FlowReader(fh).stream()
                for e in f.metadata.get("custody", {}).get("events", [])], 0


def verify_bundle(path: str, store: Store | None, pinned) -> list[str]:
    """Check an exported bundle; returns what was proven, line by line, or raises ExportError."""
    try:
        with open(manifest_path(path)) as fh:
            manifest = json.load(fh)
        with open(path, "rb") as fh:
            sha = hashlib.file_digest(fh, "sha256").hexdigest()
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read the bundle {path}: {e}") from None
    said = []
    if sha != manifest.get("sha256"):
        raise ExportError(f"{path}: the file's SHA-256 does not match its manifest: it was changed after export")
    said.append(f"file matches its manifest (sha256 {sha[:16]}…)")
    signature = manifest.get("signature")
    if signature is None:
        said.append("manifest is NOT signed")
    else:
        try:
            kid = check({k: v for k, v in manifest.items() if k != "signature"}, signature, pinned)
        except SigningError as e:
            raise ExportError(f"{path}: manifest signature: {e}") from None
        said.append(f"manifest signed by {kid}" + ("" if pinned is not None else " (key not pinned: pass --public-key)"))
    try:
        chain, rehashed = _chain_of(path, manifest["format"])
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path}: not a readable {manifest.get('format')} export: {e}") from None
    if len(chain) != manifest.get("events"):
        raise ExportError(f"{path}: the manifest says {manifest.get('events')} events, the file has {len(chain)}")
    if rehashed:
        said.append(f"{rehashed} events re-hashed from their contents")
    if store is None:
        return said
    checkpoint = store.checkpoint()
    pruned_upto = checkpoint["seq"] if checkpoint else 0
    anchors = {c["document"]["seq"]: c["document"]["hash"] for c in store.checkpoints()}
    matched = pruned = 0
    for seq, h in chain:
        if seq <= pruned_upto:
            if seq in anchors and anchors[seq] != h:
                raise ExportError(f"{path}: event {seq} differs from the store's signed checkpoint of it")
            if seq in anchors:
                said.append(f"event {seq} is the store's signed checkpoint")
            pruned += 1
            continue
        if store.hash_at(seq) != h:
            raise ExportError(f"{path}: event {seq} is not in the store as exported")
        matched += 1
    said.append(f"{matched} events match the store" + (f"; {pruned} were pruned since (checkpoint {pruned_upto})" if pruned else ""))
    head = manifest["chain_head"]
    if head["seq"] > pruned_upto:
        if store.hash_at(head["seq"]) != head["hash"]:
            raise ExportError(f"{path}: the store's event {head['seq']} is not the chain head the export names")
        said.append(f"chain head {head['seq']} is in the store")
    elif checkpoint and head["seq"] == checkpoint["seq"] and head["hash"] != checkpoint["hash"]:
        raise ExportError(f"{path}: the chain head it names differs from the store's checkpoint {checkpoint['seq']}")
    return said


def archive_writer(path: str, signer: Signer) -> Any:
    """For prune: write the pruned prefix as a JSONL bundle; returns a description of it."""
    def write(rows: Iterator[dict[str, Any]], upto: int, head: str) -> dict[str, Any]:
        bundle = write_bundle(rows, "jsonl", path, signer, {"seq": upto, "hash": head},
                              selection={"pruned_upto": upto})
        return {"file": os.path.abspath(path), "sha256": bundle.manifest["sha256"], "events": bundle.manifest["events"]}
    return write

