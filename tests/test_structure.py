"""The package's shape: no import cycles (lazy imports inside functions count), and stages that meet only
through artifacts. Run alone: `pytest tests/test_structure.py` (no TensorFlow, a second)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "convcache"
STAGES = ("export", "extract", "train", "serve")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the convcache modules it imports anywhere in its file (top level or inside a function).
    `from package import name` counts as importing package.name when that is a module."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # convcache.x.y.attr -> the module that defines it
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    found = cycles(import_graph())
    assert not found, "import cycles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_stages_meet_only_through_artifacts():
    """No stage imports another stage, the CLI or the orchestration (`pipeline`)."""
    graph = import_graph()
    bad = []
    for module, edges in graph.items():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in STAGES:
            continue
        for target in edges:
            tparts = target.split(".")
            if len(tparts) > 1 and tparts[1] != parts[1] and (tparts[1] in STAGES or tparts[1] in ("cli", "pipeline")):
                bad.append(f"{module} -> {target}")
    assert not bad, "\n".join(sorted(bad))


def test_the_readme_layout_names_every_module_and_package():
    readme = (ROOT.parent / "README.md").read_text()
    block = readme[readme.index("## Layout") :].split("```")[1]
    top = [p.name for p in ROOT.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    packages = [p.name + "/" for p in ROOT.iterdir() if (p / "__init__.py").is_file()]
    missing = [n for n in top + packages if n not in block]
    for package in packages:  # each subpackage's modules are named on its line(s)
        start = block.index(package)
        nxt = min((block.index(p, start + 1) for p in packages if p != package and block.find(p, start + 1) > 0),
                  default=len(block))
        text = block[start:nxt]
        missing += [f"{package}{m.stem}" for m in (ROOT / package).glob("*.py")
                    if m.stem != "__init__" and m.stem not in text]
    assert not missing, f"README layout misses: {', '.join(sorted(missing))}"
