"""The package's shape: layers import only downwards, no import cycle, no module over 400 lines.

Layers, bottom to top (docs/ARCHITECTURE.md): lora_engine.kernels -> the leaves (ops, atomic,
checks) -> engine -> rl -> studies | interop -> cli. Function-level imports count: a lazy import
is still a dependency. ``lora_engine/__init__.py`` (the public API) may import any layer.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"kernels": 0, "ops": 1, "atomic": 1, "checks": 1, "engine": 2, "rl": 3, "studies": 4, "interop": 4,
         "cli": 5}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for lora_engine/ and kernels/ (installed as lora_engine.kernels)."""
    out = {}
    for base, prefix in ((ROOT / "lora_engine", "lora_engine"), (ROOT / "kernels", "lora_engine.kernels")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Modules of the package that ``name`` imports, anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("lora_engine"):
                found.add(t)
    return found


def _layer(name: str) -> int | None:
    parts = name.split(".")
    # The package root (the public API, __version__) sits with the CLI at the top.
    return LAYER.get(parts[1]) if len(parts) > 1 else LAYER["cli"]


def _graph():
    modules = _modules()
    return modules, {n: _imports(n, p, modules) for n, p in modules.items()}


def test_layers_import_only_downwards():
    _, graph = _graph()
    bad = []
    for name, deps in graph.items():
        mine = _layer(name)
        if name == "lora_engine":  # the public API may gather every layer
            continue
        for dep in deps:
            if dep == "lora_engine" and mine == LAYER["cli"]:
                continue
            theirs = _layer(dep)
            if theirs is None or theirs > mine or (theirs == mine and dep.split(".")[1:2] != name.split(".")[1:2]):
                bad.append(f"{name} imports {dep}")
    assert not bad, "layering violations:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    _, graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    """The detector itself: a two-module cycle written on disk is found."""
    (tmp_path / "a.py").write_text("from lora_engine.engine import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from lora_engine.engine import a\n")
    modules = {"lora_engine.engine.a": tmp_path / "a.py", "lora_engine.engine.b": tmp_path / "b.py"}
    assert _imports("lora_engine.engine.a", modules["lora_engine.engine.a"], modules) == {"lora_engine.engine.b"}
    assert _imports("lora_engine.engine.b", modules["lora_engine.engine.b"], modules) == {"lora_engine.engine.a"}


def test_no_module_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"
