"""The package's layout holds: dependencies point one way (entry points -> engine -> run -> record -> load ->
plan -> config and models), no import circle, no module reaching for another's private name, and no
module over 300 lines without a reason at its top. Read from the source with ast (nothing imported),
so a violation anywhere, even in an import inside a function, fails here."""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Wing -> tier: a module may import from its own tier or lower ones, never a higher one.
TIERS = {
    "pipeinfer.config": 0, "pipeinfer.models": 0,
    "pipeinfer.plan": 1,
    "pipeinfer.load": 2,
    "pipeinfer.record": 3,
    "pipeinfer.run": 4,
    "pipeinfer.engine": 5,               # requests in, results out: the one loop every front end calls
    "pipeinfer.report": 6,               # entry points: read results files back
    "pipeinfer.sweep": 6,                # entry point: expands, plans and runs a grid of configs
    "pipeinfer.evaluate": 6,             # lm-eval's pipeinfer model and its launcher, a caller of the engine
    "pipeinfer.serve": 6,                # entry point: the OpenAI-compatible server, a caller of the engine
    "run_distributed_inference": 6,      # the batch runner, a caller of the engine
}
ENTRY = 6         # any __main__ module is an entry point too (python -m pipeinfer.plan: the dry run)
MAX_LINES = 300
REASON = re.compile(r"over 300 lines", re.IGNORECASE)


def _modules() -> dict[str, str]:
    """{dotted module name: path} for the package and the entry script."""
    out = {"run_distributed_inference": os.path.join(ROOT, "run_distributed_inference.py")}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "pipeinfer")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _tier(module: str) -> int:
    if module.endswith(".__main__"):
        return ENTRY
    wing = max((w for w in TIERS if module == w or module.startswith(w + ".")), key=len, default=None)
    assert wing is not None, f"{module} is in no wing: add its wing to TIERS in tests/test_layout.py"
    return TIERS[wing]


def _imports(module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported pipeinfer module, names taken from it) for every import in `module`, at any depth."""
    tree = ast.parse(open(MODULES[module], encoding="utf-8").read())
    package = module if MODULES[module].endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "pipeinfer"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "pipeinfer":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:  # `from pipeinfer.run import comm`: the submodule itself
                    out.append((node.lineno, sub, []))
                else:
                    out.append((node.lineno, base, [a.name]))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {dst for _, dst, _ in _imports(m) if dst in MODULES and dst != m} for m in MODULES}


def test_every_import_resolves_to_a_module_of_the_package():
    unknown = [f"{m}:{line} imports {dst}" for m in MODULES for line, dst, _ in _imports(m) if dst not in MODULES]
    assert not unknown, unknown


def test_no_import_points_upward():
    upward = [f"{m}:{line} (tier {_tier(m)}) imports {dst} (tier {_tier(dst)})"
              for m in MODULES for line, dst, _ in _imports(m) if dst in MODULES and _tier(dst) > _tier(m)]
    assert not upward, "imports from a higher wing:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and modules importing themselves."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert not _cycles(_graph())


def test_the_circle_check_finds_a_circle():
    """The checker itself: a made-up graph with a circle is caught, one without is not."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_private_name_crosses_modules():
    reached = [f"{m}:{line} takes {name} from {dst}" for m in MODULES for line, dst, names in _imports(m)
               for name in names if name.startswith("_") and not name.startswith("__") and dst != m]
    assert not reached, reached


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    with open(MODULES[module], encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) > MAX_LINES:
        assert any(REASON.search(line) for line in lines[:30]), \
            f"{module} has {len(lines)} lines: split it, or say at its top why it is over 300 lines"
