"""How long a short `custody` command takes to start and finish.

A throwaway configuration (development issuer, a store holding a few hundred events, an
approvals URL nobody listens on) and, in the same run: the baseline — the same Python
interpreter starting and exiting (`python -c pass`), the floor no command can go under —
and each short command. Prints the median wall time of `--repeat` runs of each, the
difference from the baseline, and whether it meets the 300 ms goal.

    .venv/bin/python bench/cli.py [--repeat 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from addons.engine.model import Decision, Operation, Principal  # noqa: E402
from addons.engine.store import Event, Store  # noqa: E402

BIN = Path(sys.executable).parent
GOAL = 0.300


def setup(work: Path) -> dict[str, str]:
    (work / "rules").mkdir()
    (work / "rules" / "a.yaml").write_text(yaml.safe_dump(
        {"rules": [{"id": "read", "match": {"action": "read"}, "effect": "allow"}]}))
    (work / "custody.yaml").write_text(yaml.safe_dump({
        "identity": {"dev_issuer": {"enabled": True, "key_file": "dev.pem"}},
        "connections": [{"name": "api", "kind": "http", "hosts": ["api.internal"]}],
        "rules": "rules",
        "store": {"path": "audit.db"},
        "approvals": {"public_url": "http://127.0.0.1:9"},
    }))
    store = Store(str(work / "audit.db"))
    who = Principal("crew", "http://custody.gateway", ("analysts",))
    op = Operation("http", "api", "read", "/items", 10, "GET /items on api")
    store.append([Event(id=f"e{i}", kind="decision", session="s1", principal=who, operation=op,
                        decision=Decision("allow", ("read",), "ok")) for i in range(500)])
    store.close()
    return {**os.environ, "CUSTODY_CONFIG": str(work / "custody.yaml")}


def timed(cmd: list[str], env: dict[str, str], repeat: int) -> float:
    subprocess.run(cmd, env=env, capture_output=True)  # warm: page cache and the validation mark
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = setup(Path(tmp))
        custody = str(BIN / "custody")
        baseline = timed([sys.executable, "-c", "pass"], env, args.repeat)
        print(f"load average {os.getloadavg()[0]:.2f}; {args.repeat} runs each, median wall time")
        print(f"{'baseline: python -c pass':<40} {baseline * 1000:7.1f} ms")
        for name, cmd in [
            ("custody --help", [custody, "--help"]),
            ("custody token", [custody, "token", "--sub", "crew", "--groups", "analysts"]),
            ("custody approvals list (no API)", [custody, "approvals", "list", "--token", "x"]),
            ("custody audit tail", [custody, "audit", "tail"]),
            ("custody rules check", [custody, "rules", "check"]),
        ]:
            t = timed(cmd, env, args.repeat)
            verdict = "meets" if t <= GOAL else "misses"
            print(f"{name:<40} {t * 1000:7.1f} ms  (+{(t - baseline) * 1000:.1f} ms over baseline, "
                  f"{t / baseline:.1f}x; {verdict} the {GOAL * 1000:.0f} ms goal)")


if __name__ == "__main__":
    main()
