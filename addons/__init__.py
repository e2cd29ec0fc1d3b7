"""Custody: mitmproxy addons that govern what AI agents do to the infrastructure they touch.

The top level of this package is the chain (`addons/chain.py` lists it in order, and is the
entry point for `mitmdump -s`), the shared services it holds, and what every addon uses:
the flow's context, the fail-closed helpers and the settings. Everything else lives in a
subpackage of its own (docs/design.md):

    classifiers/   one module per connection kind: a request -> an Operation
    engine/        configuration, rules, masks and detectors, tokens, the audit store and
                   signing, approval records, notifications, the bridge contract; no mitmproxy
    evidence/      replay timelines, exports and the compliance report
    cli/           the `custody` command and the bridges' start-up
    client/        the agent-side helper and its CrewAI instrumentation
"""
