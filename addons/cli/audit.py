"""`custody audit …`: read the audit store as evidence.

    custody audit tail [-n 20] [--follow]
    custody audit sessions [--from T] [--principal S] [-n 20]   (who, when, how many requests)
    custody audit show SEQ_OR_EVENT_FLOW_SESSION_OR_APPROVAL
    custody audit replay SESSION | --run RUN [--follow]
    custody audit why SEQ_OR_EVENT                         (prompt → completion → command → decision → …)
    custody audit export --format jsonl|csv|har|flows -o FILE [--from T] [--to T] [--principal S] …
    custody audit report --from T [--to T] [-o BASE]      (BASE.html and BASE.json)
    custody audit verify [--export FILE] [--public-key PEM]
    custody audit prune --before T (--archive FILE | --no-archive)
    custody audit key                                      (the signing key's public half)
    custody audit migrate --to postgresql://…              (copy this store into another)

`--db` names the store directly: a SQLite file, or a postgresql:// URL (the password may
come from $PGPASSWORD); by default it is the configuration's `store`.

Every id a command prints is one the next command takes: `tail` prints sequence numbers
and session ids, `sessions` prints session ids, and `show` and `replay` take them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from addons.cli.base import CliError, with_config

if TYPE_CHECKING:
    from addons.engine.config import StoreConfig
    from addons.engine.signing import Signer
    from addons.engine.store import AuditStore as Store
    from addons.evidence.timeline import Selection

POLL = 0.5


# where things are


def _configured(args: argparse.Namespace) -> StoreConfig | None:
    """The configuration's store settings; None when --db names the store directly."""
    from addons.engine import config

    if args.db:
        return None
    try:
        return config.load(config.find(args.config), secrets=False).store
    except config.ConfigError as e:
        raise CliError(str(e)) from None


def _is_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def open_store(args: argparse.Namespace) -> Store:
    from addons.engine import store

    settings = _configured(args)
    location = args.db or settings.path
    if location and not _is_url(location) and not os.path.exists(location):
        raise CliError(f"no audit store at {location}")
    try:
        return store.open_location(args.db) if args.db else store.open_store(settings)
    except store.StoreError as e:
        raise CliError(str(e)) from None


def _key_path(args: argparse.Namespace) -> str:
    settings = _configured(args)
    if getattr(args, "signing_key", None):
        return args.signing_key
    if settings is not None and settings.signing_key:
        return settings.signing_key
    if args.db:
        directory = Path.cwd() if _is_url(args.db) else Path(args.db).resolve().parent
    else:
        directory = settings.directory
    return str(directory / "audit-signing.key")


def _signer(args: argparse.Namespace) -> Signer:
    from addons.engine.signing import Signer, SigningError

    path = _key_path(args)
    fresh = not os.path.exists(path)
    try:
        signer = Signer.open(path)
    except SigningError as e:
        raise CliError(str(e)) from None
    if fresh:
        print(f"created the audit signing key {path} ({signer.key_id}); give auditors its public half: "
              "custody audit key > custody-audit.pub")
    return signer


def _pinned(args: argparse.Namespace):
    """The key signatures must be by: --public-key, store.verify_key, else the local signing key."""
    from addons.engine.signing import SigningError, load_public

    settings = _configured(args)
    path = args.public_key or (settings.verify_key if settings is not None else "") or None
    if path is None and os.path.exists(_key_path(args)):
        path = _key_path(args)
    if path is None:
        return None
    try:
        return load_public(path)
    except SigningError as e:
        raise CliError(str(e)) from None


def _time(text: str | None, option: str) -> float | None:
    from addons.evidence.timeline import parse_time

    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as e:
        raise CliError(f"{option}: {e}") from None


def _selection(args: argparse.Namespace) -> Selection:
    from addons.evidence.timeline import Selection

    return Selection(start=_time(args.start, "--from"), end=_time(args.end, "--to"), principal=args.principal or "",
                     agent=args.agent or "", connection=args.connection or "", session=args.session or "",
                     run=args.run or "", effect=args.decision or "")


# tail / show


def local_time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="milliseconds")


def format_row(row: dict[str, Any]) -> str:
    outcome = row["effect"] or (str(row["status"]) if row["status"] is not None else "")
    if row["kind"] == "decision" and row["status"]:
        outcome = f"{row['effect']} {row['status']}"
    what = " ".join(x for x in (row["action"], row["resource"]) if x)
    return (
        f"{row['seq']:>6}  {local_time(row['ts'])}  {row['kind']:<8}  {row['subject'] or '-':<16}  "
        f"{row['connection'] or '-':<14}  {what or '-':<28}  {outcome:<10}  {row['reason'] or ''}"
    ).rstrip() + (f"  [session {row['session']}]" if row["session"] else "")


def _printable(row: dict[str, Any]) -> dict[str, Any]:
    from addons.evidence import exports

    out = exports.jsonl_record(row)
    out["time"] = local_time(row["ts"])
    return out


def _follow(fetch: Callable[[int], list[dict[str, Any]]], show: Callable[[dict[str, Any]], None], last: int) -> None:
    """Print what arrives after `last`, until interrupted."""
    try:
        while True:
            time.sleep(POLL)
            for row in fetch(last):
                show(row)
                last = row["seq"]
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a follow ends


def cmd_tail(args: argparse.Namespace) -> int:
    store = open_store(args)
    rows = store.tail(args.n)
    for row in rows:
        print(format_row(row))
    if args.follow:
        _follow(lambda last: store.tail(1000, after=last), lambda r: print(format_row(r), flush=True),
                rows[-1]["seq"] if rows else store.head()[0])
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    store = open_store(args)
    found = store.sessions(_time(args.start, "--from"), args.principal or "", args.n)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print("no sessions" + (" in that period" if args.start else ""))
    for s in found:
        who = s["subjects"] or "-"
        print(f"{s['session']}  {local_time(s['first'])} .. {local_time(s['last'])[11:]}  {who:<16}  "
              f"{s['connections'] or '-':<14}  {s['requests']:>4} requests  {s['denied']:>3} denied  "
              f"{s['held']:>3} held" + (f"  agent {s['agents']}" if s["agents"] else ""))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = open_store(args)
    event = store.event(args.id)
    if event is None and args.id.isdigit():
        event = next(iter(store.where("seq = ?", [int(args.id)])), None)  # as `tail` prints it
    if event is not None:
        related = store.where("flow = ?", [event["flow"]]) if event["flow"] else [event]
        if args.json:
            print(json.dumps({"event": _printable(event), "flow": [_printable(r) for r in related]}, indent=2))
            return 0
        print(json.dumps(_printable(event), indent=2))
        print("\nthe flow it belongs to:")
        for row in related:
            print(format_row(row))
        return 0
    rows = store.where("session = ? OR flow = ? OR approval = ?", [args.id, args.id, args.id])
    if not rows:
        raise CliError(f"no event, flow, session or approval {args.id!r} in {store.location} "
                       "(events by sequence number or id)")
    if args.json:
        print(json.dumps([_printable(r) for r in rows], indent=2))
    else:
        for row in rows:
            print(format_row(row))
    return 0


# replay


def cmd_replay(args: argparse.Namespace) -> int:
    from addons.evidence import exports
    from addons.evidence.timeline import (
        Selection,
        approvals,
        iso,
        records,
        replay_lines,
    )

    if bool(args.session) == bool(args.run):
        raise CliError("name a session, or a crew run with --run (not both)")
    store = open_store(args)
    selection = Selection(session=args.session or "", run=args.run or "")
    rows = sorted(selection.rows(store), key=lambda r: (r["ts"], r["seq"]))  # a request is recorded once decided
    if not rows and not args.follow:
        what = f"session {args.session!r}" if args.session else f"run {args.run!r}"
        raise CliError(f"no events of {what} in {store.location} (sessions are listed by `custody audit sessions`)")
    # Approval steps (votes, decisions) are recorded in the session of the flow they hold.
    stories = approvals(records(rows))

    def show(row: dict[str, Any]) -> None:
        rec = next(records([row]))
        if args.json:
            print(json.dumps(exports.jsonl_record(row), ensure_ascii=False), flush=True)
            return
        if rec["approval"]:
            stories.update({k: v for k, v in approvals([rec]).items() if k not in stories})
        for line in replay_lines(rec, stories, args.body_limit):
            print(line, flush=True)

    if rows and not args.json:
        first = next(records(rows[:1]))
        subjects = sorted({r["subject"] for r in rows if r["subject"]})
        protocols = sorted({r["protocol"] for r in rows if r["protocol"]})
        print(f"{'session ' + args.session if args.session else 'run ' + args.run}: {len(rows)} events, "
              f"{iso(rows[0]['ts'])} to {iso(rows[-1]['ts'])}; {', '.join(protocols) or '-'}; "
              f"principals {', '.join(subjects) or '-'}"
              + (f"; agent {first.attribute('agent')}" if first.attribute("agent") else ""))
    for row in rows:
        show(row)
    if args.follow:
        _follow(lambda last: selection.rows(store, after=last), show, max((r["seq"] for r in rows), default=store.head()[0]))
    return 0


# why


def cmd_why(args: argparse.Namespace) -> int:
    from addons.evidence import why

    store = open_store(args)
    found = why.chain(store, args.id)
    if found is None:
        raise CliError(f"no event {args.id!r} in {store.path} (events by sequence number or id: `custody audit tail`)")
    if args.json:
        print(json.dumps(found.as_dict(), indent=2, ensure_ascii=False))
        return 0
    for line in why.lines(found, args.body_limit):
        print(line)
    return 0


# export / report


def cmd_export(args: argparse.Namespace) -> int:
    from addons.evidence import exports

    if args.format not in exports.FORMATS:
        raise CliError(f"--format: one of {', '.join(exports.FORMATS)}")
    store = open_store(args)
    signer = _signer(args)
    try:
        bundle = exports.export(store, _selection(args), args.format, args.output, signer)
    except exports.ExportError as e:
        raise CliError(str(e)) from None
    m = bundle.manifest
    output = os.path.abspath(args.output)
    print(f"wrote {output}: {m['events']} events as {args.format}; manifest {exports.manifest_path(output)} "
          f"(chain head {m['chain_head']['seq']} {m['chain_head']['hash'][:16]}…, signed by {signer.key_id})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from addons.evidence import report
    from addons.evidence.timeline import Selection

    store = open_store(args)
    start = _time(args.start, "--from")
    end = _time(args.end, "--to") if args.end else time.time()
    if end <= start:
        raise CliError("--to must be after --from")
    verification = store.verify()
    chain = {"ok": verification.ok, "events": verification.count, "head": verification.head,
             **({} if verification.ok else {"broken_at": verification.broken_at, "problem": verification.problem})}
    document = report.build(Selection(start=start, end=end).rows(store), start, end, chain)
    base = os.path.abspath(args.output)
    try:
        Path(base).parent.mkdir(parents=True, exist_ok=True)
        Path(base + ".json").write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        Path(base + ".html").write_text(report.render_html(document))
    except OSError as e:
        raise CliError(f"cannot write the report: {e}") from None
    t = document["totals"]
    print(f"wrote {base}.html and {base}.json: {t['requests']} requests, {t['denied']} denied, "
          f"{t['approvals']} approvals, {t['masked_values']} values masked")
    return 0 if verification.ok else 1


# verify / prune / key


def _verify_checkpoints(store: Store, pinned) -> list[str]:
    from addons.engine.signing import SigningError, check
    from addons.evidence.timeline import iso

    said, previous = [], None
    for c in store.checkpoints():
        doc = c["document"]
        try:
            kid = check(doc, c["signature"], pinned)
        except SigningError as e:
            raise CliError(f"BROKEN: checkpoint at event {doc.get('seq')}: {e}") from None
        expected = {"seq": previous["seq"], "hash": previous["hash"]} if previous else None
        if doc.get("previous") != expected:
            raise CliError(f"BROKEN: checkpoint at event {doc['seq']} does not follow the checkpoint before it")
        said.append(f"checkpoint: events {doc['first_seq']}–{doc['seq']} pruned ({iso(doc['first_ts'])} to "
                    f"{iso(doc['last_ts'])}), signed by {kid}" + ("" if pinned else " (key not pinned)"))
        previous = doc
    return said


def _ok(headline: str, proven: list[str]) -> int:
    print(headline)
    for line in proven:
        print(f"  {line}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from addons.evidence import exports

    pinned = _pinned(args)
    if args.export:
        try:
            store = open_store(args)
        except CliError as e:
            print(f"{e}: checking the file and its signature only")
            store = None
        try:
            said = exports.verify_bundle(args.export, store, pinned)
        except exports.ExportError as e:
            print(f"BROKEN: {e}")
            return 1
        return _ok(f"ok: {args.export}", said)
    store = open_store(args)
    try:
        said = _verify_checkpoints(store, pinned)
        anchor = None if args.full else _anchor(store, pinned)
    except CliError as e:
        print(e)
        return 1
    result = store.verify(anchor["document"] if anchor else None)
    if not result.ok:
        print(f"BROKEN at event {result.broken_at}: {result.problem}")
        return 1
    _sign_anchor(args, store, result)
    if anchor is None:
        return _ok(f"ok: {result.count} events, chain head {result.head}", said)
    doc = anchor["document"]
    walked = f"events {result.first}–{result.last}" if result.count else "no new events"
    return _ok(f"ok: {walked} after the signed anchor at event {doc['seq']} ({local_time(doc['created'])}), "
               f"chain head {result.head}; --full walks the whole chain", said)


def _anchor(store: Store, pinned) -> dict[str, Any] | None:
    """The newest anchor, its signature checked: where this verification may start. None
    without a key to check it by (then the whole chain is walked)."""
    from addons.engine.signing import SigningError, check

    anchors = store.anchors()
    if not anchors or pinned is None:
        return None
    try:
        check(anchors[0]["document"], anchors[0]["signature"], pinned)
    except SigningError as e:
        raise CliError(f"BROKEN: anchor at event {anchors[0]['document'].get('seq')}: {e}") from None
    return anchors[0]


def _sign_anchor(args: argparse.Namespace, store: Store, result) -> None:
    """Where this verification got to, signed, for the next one to start from (only where the
    audit signing key is: an auditor holding only its public half verifies, and anchors nothing)."""
    from addons.engine.signing import Signer, SigningError

    path = _key_path(args)
    if result.last < 1 or not os.path.exists(path):
        return
    try:
        signer = Signer.open(path, create=False)
    except SigningError:
        return
    document = {"seq": result.last, "hash": result.head, "created": time.time(), "verified_from": result.first}
    store.add_anchor(document, signer.sign(document).as_dict())


def cmd_prune(args: argparse.Namespace) -> int:
    from addons.engine.store import StoreError
    from addons.evidence import exports
    from addons.evidence.timeline import iso

    before = _time(args.before, "--before")
    if before > time.time():
        raise CliError("--before is in the future: that would prune events still being written")
    store = open_store(args)
    signer = _signer(args)
    if args.archive and os.path.exists(args.archive):
        raise CliError(f"{args.archive} exists; choose a new archive file")
    try:
        document = store.prune(before, lambda doc: signer.sign(doc).as_dict(),
                               exports.archive_writer(args.archive, signer) if args.archive else None)
    except (StoreError, exports.ExportError) as e:
        raise CliError(f"prune refused: {e}") from None
    if document is None:
        print(f"nothing recorded before {iso(before)} (beyond any earlier checkpoint)")
        return 0
    print(f"pruned {document['pruned']} events ({document['first_seq']}–{document['seq']}, {iso(document['first_ts'])} "
          f"to {iso(document['last_ts'])}); checkpoint {document['hash'][:16]}… signed by {signer.key_id}"
          + (f"; archived to {args.archive}" if args.archive else "; not archived"))
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    from addons.engine.signing import Signer, SigningError, key_id

    path = _key_path(args)
    try:
        signer = Signer.open(path, create=False)
    except SigningError as e:
        raise CliError(f"{e} (it is created by the first `custody audit export` or `prune`)") from None
    print(signer.public_pem(), end="")
    print(f"# {key_id(signer.public)}", file=sys.stderr)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Copy the whole store (events, bodies, checkpoints, anchors, approvals) into an empty
    one, row for row, and verify the chain there."""
    from addons.engine import store as stores

    source = open_store(args)
    try:
        target = stores.open_location(args.to)
    except stores.StoreError as e:
        raise CliError(str(e)) from None
    try:
        copied = source.copy_into(target)
    except stores.StoreError as e:
        raise CliError(f"migrate refused: {e}") from None
    result = target.verify()
    if not result.ok:
        print(f"BROKEN in {target.location} at event {result.broken_at}: {result.problem}")
        return 1
    print(f"copied {copied} events from {source.location} to {target.location}; the chain verifies there: "
          f"{result.count} events, chain head {result.head}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("audit", help="read, replay, export, report, verify and prune the audit log")
    a = a.add_subparsers(dest="audit_command", required=True)

    def audit(name: str, help: str, func: Callable) -> argparse.ArgumentParser:
        sp = with_config(a.add_parser(name, help=help))
        sp.add_argument("--db", help="audit store: a SQLite path or a postgresql:// URL "
                                     "(default: from the configuration)")
        sp.set_defaults(func=func)
        return sp

    def filters(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--from", dest="start", help="from this time (ISO 8601, UTC unless a zone is given)")
        sp.add_argument("--to", dest="end", help="up to (not including) this time")
        sp.add_argument("--principal", help="only this subject")
        sp.add_argument("--agent", help="only this agent")
        sp.add_argument("--connection", help="only this connection")
        sp.add_argument("--session", help="only this session")
        sp.add_argument("--run", help="only this crew run")
        sp.add_argument("--decision", choices=("allow", "deny", "review"), help="only flows decided so")

    def keys(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--signing-key", help="the Ed25519 signing key (default: store.signing_key, "
                                              "else audit-signing.key beside the store)")

    at = audit("tail", "print the latest events", cmd_tail)
    at.add_argument("-n", type=int, default=20)
    at.add_argument("-f", "--follow", action="store_true")
    ass = audit("sessions", "sessions, latest first: who, when, how many requests (ids for `replay`)", cmd_sessions)
    ass.add_argument("--from", dest="start", help="active since this time")
    ass.add_argument("--principal", help="only sessions of this subject")
    ass.add_argument("-n", type=int, default=20)
    ass.add_argument("--json", action="store_true")
    ash = audit("show", "print one event (by sequence number or id) with its flow, or a whole flow, session "
                        "or approval", cmd_show)
    ash.add_argument("id")
    ash.add_argument("--json", action="store_true")
    ar = audit("replay", "a session's (or crew run's) timeline: requests, decisions, approvals, responses", cmd_replay)
    ar.add_argument("session", nargs="?", help="the session id (see `custody audit tail` / `show`)")
    ar.add_argument("--run", help="every session of this crew run instead")
    ar.add_argument("-f", "--follow", action="store_true", help="keep printing events as they are recorded")
    ar.add_argument("--json", action="store_true", help="one JSON object per event (the export's JSONL columns)")
    ar.add_argument("--body-limit", type=int, default=2000, help="characters of each body to print (default 2000)")
    aw = audit("why", "one event's chain: the prompt and completion that asked for it, the command, its decision, "
                      "approval and response (or, for a model call, the commands it led to)", cmd_why)
    aw.add_argument("id", help="an event's sequence number or id (any event of the request or model call)")
    aw.add_argument("--json", action="store_true")
    aw.add_argument("--body-limit", type=int, default=600, help="characters of each text to print (default 600)")
    ae = audit("export", "write events as JSONL, CSV, HAR or mitmproxy flows, with a signed manifest", cmd_export)
    ae.add_argument("--format", required=True, help="jsonl, csv, har or flows")
    ae.add_argument("-o", "--output", required=True, help="the file to write (and FILE.manifest.json)")
    filters(ae)
    keys(ae)
    arp = audit("report", "a compliance summary of a period, as HTML and JSON", cmd_report)
    arp.add_argument("--from", dest="start", required=True)
    arp.add_argument("--to", dest="end", help="default: now")
    arp.add_argument("-o", "--output", default="custody-report", help="writes OUTPUT.html and OUTPUT.json")
    av = audit("verify", "walk the hash chain (or check an exported bundle) and report the first broken link",
               cmd_verify)
    av.add_argument("--export", help="check this exported file against its manifest and the store")
    av.add_argument("--full", action="store_true", help="walk the whole chain, not only what came after the last "
                                                        "signed anchor (the default once one exists)")
    av.add_argument("--public-key", help="the signing key signatures must be by (default: store.verify_key, "
                                         "else the local signing key)")
    keys(av)
    apr = audit("prune", "remove events before a time, leaving a signed checkpoint", cmd_prune)
    apr.add_argument("--before", required=True, help="remove events recorded before this time")
    where = apr.add_mutually_exclusive_group(required=True)
    where.add_argument("--archive", help="write the removed events here first (a JSONL bundle)")
    where.add_argument("--no-archive", action="store_true", help="remove them without keeping a copy")
    keys(apr)
    keys(audit("key", "print the public half of the audit signing key (for auditors to pin)", cmd_key))
    am = audit("migrate", "copy this store into an empty one (SQLite to PostgreSQL) and verify the chain there",
               cmd_migrate)
    am.add_argument("--to", required=True, help="the store to copy into: a postgresql:// URL (password from "
                                                "$PGPASSWORD) or a SQLite path")
