"""Custody: mitmproxy addons that govern what AI agents do to the infrastructure they touch.

`addons/chain.py` is the entry point for `mitmdump -s`; DESIGN.md names the parts.
"""
