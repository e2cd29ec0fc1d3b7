"""The audit evidence tools: timelines (replay), exports (JSONL, CSV, HAR, mitmproxy flows)
and the compliance report, read from the audit store (addons/engine/store.py)."""
