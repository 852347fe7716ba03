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


def _imports_of(path: Path) -> set[str]:
    """Top-level names of every package a file imports (anywhere in it)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_store_package_touches_zarr():
    """One owner of the storage format (as xarray's backends/zarr.py): everything else goes through
    `convcache.store`."""
    bad = sorted(str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")
                 if "zarr" in _imports_of(p) and p.relative_to(ROOT).parts[0] != "store")
    assert not bad, f"import zarr outside convcache/store/: {', '.join(bad)}"


def test_only_artifacts_touches_onnx_metadata():
    """Every model artifact's contract is written and read in `convcache.artifacts`."""
    bad = sorted(str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")
                 if "metadata_props" in p.read_text() and p.relative_to(ROOT).parts[0] != "artifacts")
    assert not bad, f"metadata_props outside convcache/artifacts/: {', '.join(bad)}"
    assert not (ROOT / "onnxmeta.py").exists() and not (ROOT / "onnxtools.py").exists()


def _edits_sys_path(path: Path) -> bool:
    """Whether a file calls sys.path.insert / append / extend (or assigns sys.path)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        target = node.func if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
        if target is not None and target.attr in ("insert", "append", "extend"):
            target = target.value
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            target = (node.targets[0] if isinstance(node, ast.Assign) else node.target)
        else:
            continue
        if isinstance(target, ast.Attribute) and target.attr == "path" and getattr(target.value, "id", None) == "sys":
            return True
    return False


def test_nothing_edits_sys_path():
    """Experiments and tests import the installed package, never a path spliced in by hand."""
    top = ROOT.parent
    files = [*top.glob("convcache/**/*.py"), *top.glob("experiments/**/*.py"), *top.glob("tests/**/*.py")]
    bad = sorted(str(p.relative_to(top)) for p in files if _edits_sys_path(p))
    assert not bad, f"sys.path edited in: {', '.join(bad)}"


def test_the_structure_checks_can_fail(tmp_path):
    """The checks above find what they look for (on files made to break them)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport zarr.storage\nsys.path.insert(0, 'x')\n")
    assert "zarr" in _imports_of(bad) and _edits_sys_path(bad)
    (tmp_path / "ok.py").write_text("import sys\nprint(sys.path[0])\nfrom zarrlike import x\n")
    assert "zarr" not in _imports_of(tmp_path / "ok.py") and not _edits_sys_path(tmp_path / "ok.py")


def test_nothing_in_the_package_imports_the_command_line():
    """The command line sits on top: it imports the stages, never the other way round (`__main__` runs it)."""
    graph = import_graph()
    bad = sorted(m for m, edges in graph.items() if "convcache.cli" in edges and m != "convcache.__main__")
    assert not bad, f"these import convcache.cli: {', '.join(bad)}"


def test_the_serving_hooks_have_one_call_site():
    """decode -> batch -> infer -> postprocess are called in `convcache.serve.loop` only (as LitServe's loop
    calls a LitAPI's hooks): nothing else reaches into a predictor's hooks."""
    hooks = {"decode", "infer", "postprocess", "to_pixels", "run_pixels", "to_prediction"}
    bad = []
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).as_posix() in ("serve/loop.py", "serve/predictor.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in hooks:
                owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
                if owner in ("predictor", "hooks", "p") or owner.endswith("predictor"):
                    bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {owner}.{node.attr}")
    assert not bad, "serving hooks called outside convcache/serve/loop.py:\n" + "\n".join(bad)


def test_the_readme_commands_run_without_an_activated_venv():
    """Every command line in the README's shell blocks that runs convcache, python or pytest goes through
    `.venv/bin/` (what `make install` creates), and every `convcache <stage>` names a stage the CLI has."""
    import re

    from convcache.cli import build_parser

    stages = set(build_parser()._subparsers._group_actions[0].choices)
    readme = (ROOT.parent / "README.md").read_text()
    bare, unknown = [], []
    for block in readme.split("```")[1::2]:
        if not block.startswith(("bash", "sh")):
            continue
        for line in block.splitlines()[1:]:
            if re.match(r"\s*(convcache|python3?|pytest|dask) ", line):
                bare.append(line.strip())
            m = re.match(r"\s*\.venv/bin/convcache (\S+)", line)
            if m and m.group(1) not in stages:
                unknown.append(line.strip())
    assert not bare and not unknown, (bare, unknown)
