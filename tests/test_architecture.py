"""The import rules of docs/design.md, enforced: what each part of the tree may depend on.

Read from the source (every `import` and `from … import` in a module, top level or not),
and, for the engines, also from a real interpreter: importing every engine module must not
load mitmproxy at all.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gateway import ROOT


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def dotted(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute names (`from a.b import c` counts a.b and a.b.c;
    `from addons import context` counts addons.context: a package's own __init__ is no layer)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module not in ("addons", "pg_bridge", "ssh_bridge"):
                found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def ours(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in ("addons", "pg_bridge", "ssh_bridge", "tests", "examples")}


def violations(package: str, allowed: tuple[str, ...], forbidden_third_party: tuple[str, ...] = ()) -> list[str]:
    out = []
    for path in modules(package):
        names = imports(path)
        for name in sorted(ours(names)):
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                out.append(f"{path.relative_to(ROOT)} imports {name}")
        for name in sorted(names):
            if name.split(".")[0] in forbidden_third_party:
                out.append(f"{path.relative_to(ROOT)} imports {name}")
    return out


RULES = [
    # (package, what it may import of ours, third-party packages it must not import)
    ("addons/engine", ("addons.engine",), ("mitmproxy",)),
    ("addons/classifiers", ("addons.engine", "addons.classifiers"), ("mitmproxy",)),
    ("addons/evidence", ("addons.engine", "addons.evidence"), ()),  # flow files are mitmproxy's format
    ("addons/client", ("addons.engine", "addons.client"), ("mitmproxy",)),
    ("pg_bridge/server", ("addons.engine", "pg_bridge.server"), ("mitmproxy",)),
    ("ssh_bridge/server", ("addons.engine", "ssh_bridge.server"), ("mitmproxy",)),
    ("pg_bridge/terminal", ("addons.engine", "addons.classifiers", "addons.context", "addons.failclosed",
                            "addons.settings", "pg_bridge.terminal"), ()),
    # the samples scripts/run starts run on a fresh clone with only what it installs: never from tests/
    ("examples", ("addons", "pg_bridge", "ssh_bridge", "examples"), ()),
    ("ssh_bridge/terminal", ("addons.engine", "addons.classifiers", "addons.context", "addons.failclosed",
                             "addons.settings", "ssh_bridge.terminal"), ()),
]


@pytest.mark.parametrize("package, allowed, forbidden", RULES, ids=[r[0] for r in RULES])
def test_imports_stay_within_their_layer(package, allowed, forbidden):
    assert modules(package), f"{package} has no modules"
    assert violations(package, allowed, forbidden) == []


@pytest.mark.parametrize("bridge, other", [("pg_bridge", "ssh_bridge"), ("ssh_bridge", "pg_bridge")])
def test_the_bridges_do_not_import_each_other(bridge, other):
    offenders = [f"{p.relative_to(ROOT)} imports {n}" for p in modules(bridge) for n in imports(p)
                 if n.split(".")[0] == other]
    assert offenders == []


def test_importing_every_engine_module_loads_no_mitmproxy():
    names = [dotted(p) for p in modules("addons/engine")]
    script = ("import importlib, json, sys\n"
              f"for n in {names!r}: importlib.import_module(n)\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'mitmproxy')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def chain_modules() -> set[str]:
    """The modules of the addons `chain.build()` lists, and of the gate it installs."""
    from addons import chain
    from addons.gate import Gate

    return {type(a).__module__ for a in [*chain.build(), Gate()]}


def test_the_top_of_addons_is_the_chain_and_what_every_addon_uses():
    top = {f"addons.{p.stem}" for p in (ROOT / "addons").glob("*.py") if p.stem != "__init__"}
    shared = {"addons.chain", "addons.context", "addons.failclosed"}
    listed = {m for m in chain_modules() if m.startswith("addons.") and m.count(".") == 1}
    assert top == listed | shared


def test_every_connection_kind_has_one_classifier():
    from addons.classifiers import CLASSIFIERS

    schema = json.loads((ROOT / "addons" / "engine" / "schemas" / "config.json").read_text())
    kinds = set(schema["$defs"]["connection"]["properties"]["kind"]["enum"])
    assert kinds | {"gateway"} == set(CLASSIFIERS)


def refusal_literals(path: Path) -> list[str]:
    """`error="…"` keyword arguments spelled as string literals instead of an Error member."""
    return [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.keyword) and node.arg == "error" and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)]


def test_refusals_name_their_error_code_from_the_table():
    found = [hit for package in ("addons", "pg_bridge", "ssh_bridge") for p in modules(package)
             for hit in refusal_literals(p)]
    assert found == []
