"""Test-only mitmproxy script: make one Custody addon fail on purpose.

Loaded before addons/chain.py (`-s tests/support/faults.py -s addons/chain.py`). A request
with `X-Test-Fault: NAME` makes the function behind that addon raise while that request is
in the chain; `NAME@response` does it while the response is. The chain itself is untouched:
what is tested is how the real addons behave when something inside them breaks.
"""

from __future__ import annotations

import functools
import inspect

from addons import credentials, identity, recorder
from addons.classifiers import http as httpops
from addons.engine import rules, store, tokens

current = ""


def _fault(name: str, fn):
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def broken_async(*args, **kwargs):
            if current == name:
                raise RuntimeError(f"injected fault in {name}")
            return await fn(*args, **kwargs)
        return broken_async

    @functools.wraps(fn)
    def broken(*args, **kwargs):
        if current == name:
            raise RuntimeError(f"injected fault in {name}")
        return fn(*args, **kwargs)
    return broken


tokens.Verifier.verify = _fault("identity", tokens.Verifier.verify)
identity.asserted = _fault("identity-headers", identity.asserted)
httpops.classify = _fault("classify", httpops.classify)
rules.RuleSet.decide = _fault("policy", rules.RuleSet.decide)
recorder.headers_for_record = _fault("recorder", recorder.headers_for_record)
recorder.body_fields = _fault("recorder@response", recorder.body_fields)
credentials.apply = _fault("credentials", credentials.apply)
store.Store.commit = _fault("store", store.Store.commit)
store.Store.commit = _fault("store@response", store.Store.commit)


class Faults:
    def requestheaders(self, flow):
        global current
        value = flow.request.headers.get("x-test-fault", "")
        current = "" if "@" in value else value

    def request(self, flow):
        self.requestheaders(flow)

    def http_connect(self, flow):
        self.requestheaders(flow)

    def responseheaders(self, flow):
        global current
        value = flow.request.headers.get("x-test-fault", "")
        current = value if "@" in value else ""

    def response(self, flow):
        self.responseheaders(flow)


addons = [Faults()]
