"""What a request with many header lines costs identity, and the header bounds' check.

Builds requests with `--lines` X-Custody-* header lines (what an attacker sends to make
every addon walk them) and strips the agent's asserted attributes two ways in the same
run: the baseline pops the headers one by one (the code before issue 15: each pop walks
every field again, so the cost grows with the square of the lines); Custody's
`identity.asserted` takes them in one pass. Both must leave the same headers and find the
same attributes. Also prints the cost of the limits addon's `header_excess`, which refuses
such a request (431) before anything else reads its headers. Microseconds per request,
median of repeats, and the ratio.

    .venv/bin/python bench/headers.py [--lines 100 1000 5000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mitmproxy.http import Headers  # noqa: E402

from addons.engine.config import LimitsConfig  # noqa: E402
from addons.identity import ASSERTED_HEADERS, MAX_ASSERTED, asserted  # noqa: E402
from addons.limits import header_excess  # noqa: E402


def popping(headers: Headers) -> dict[str, str]:
    """The baseline: addons/identity.py's asserted() before issue 15."""
    out = {}
    for header in [h for h in headers if h.lower().startswith("x-custody-")]:
        value = headers.pop(header)
        if (name := ASSERTED_HEADERS.get(header.lower())) is not None:
            out[name] = value[:MAX_ASSERTED]
    return out


def request_fields(lines: int) -> tuple[tuple[bytes, bytes], ...]:
    padding = tuple((f"x-custody-pad-{i}".encode(), b"v") for i in range(lines))
    return ((b"host", b"api.test"), (b"x-custody-task", b"restock"), *padding, (b"accept", b"*/*"))


def timed(fn, fields, repeats: int) -> tuple[float, object, tuple]:
    samples, result, left = [], None, ()
    for _ in range(repeats):
        headers = Headers(fields)
        start = time.perf_counter()
        result = fn(headers)
        samples.append((time.perf_counter() - start) * 1e6)
        left = headers.fields
    return statistics.median(samples), result, left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'lines':>6} {'baseline µs':>12} {'custody µs':>11} {'ratio':>7} {'431 check µs':>13}")
    for lines in args.lines:
        fields = request_fields(lines)
        base, base_attrs, base_left = timed(popping, fields, args.repeats)
        ours, our_attrs, our_left = timed(asserted, fields, args.repeats)
        if (base_attrs, base_left) != (our_attrs, our_left):
            raise SystemExit(f"{lines} lines: the two ways differ")
        check, refused, _ = timed(lambda h: header_excess(h.fields, LimitsConfig()), fields, args.repeats)
        assert (refused is not None) == (len(fields) > LimitsConfig().header_lines)
        print(f"{lines:>6} {base:>12.0f} {ours:>11.0f} {base / ours:>6.1f}x {check:>13.1f}")


if __name__ == "__main__":
    main()
