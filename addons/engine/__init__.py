"""The engines: everything Custody decides and keeps, as plain Python with no mitmproxy.

Configuration and its schemas, rules, masks and detectors, tokens and the development
issuer, the audit store and its signing, approval records and tallies, notification
formats, the error codes, and the bridge contract. The chain's addons, the bridges, the
CLI and the evidence tools all build on these; a test asserts nothing here imports
mitmproxy (tests/test_architecture.py).
"""
