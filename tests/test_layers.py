"""The package's layers import downward only, and nothing outside a module reaches its private names.

Layers (README, "Layout"): kernels and the compiled extension, then the reference, then the
backend contract (ops), then the public loss API, then unlearning, then the CLI. Imports are
read from the source (module level and inside functions), so a lazy import counts too.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {  # module -> layer; a module may import its own layer or lower ones, never a cycle
    "deepcut_fast._C": 0, "deepcut_fast.kernels": 0, "deepcut_fast.kernels.contrastive": 0, "deepcut_fast.compiled": 0,
    "deepcut_fast.reference": 1,
    "deepcut_fast.ops": 2,
    "deepcut_fast": 3, "deepcut_fast.loss": 3, "deepcut_fast.distributed": 3, "deepcut_fast.queue": 3,
    "deepcut_fast.testing": 3,
    "deepcut_fast.cli": 5, "deepcut_fast.__main__": 5,
}


def module_files():
    files = {"deepcut_fast.kernels": ROOT / "kernels" / "__init__.py",
             "deepcut_fast.kernels.contrastive": ROOT / "kernels" / "contrastive.py"}
    for path in (ROOT / "deepcut_fast").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


FILES = module_files()
EXTENSION = "deepcut_fast._C"  # compiled from csrc/, imports nothing of the package


def layer(module):
    return LAYER.get(module, 4 if module.startswith("deepcut_fast.unlearning") else None)


def imports(path, package):
    """(module, names) of every import of a deepcut_fast module in ``path`` (relative ones resolved)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, []) for a in node.names if a.name.startswith("deepcut_fast"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb level - 1 packages up from ``package``
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("deepcut_fast"):
                yield base, [a.name for a in node.names]


def edges():
    """module -> the deepcut_fast modules it imports (``from pkg import sub`` counts as sub)."""
    graph = {}
    for module, path in FILES.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        targets = set()
        for base, names in imports(path, package):
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in FILES or f"{base}.{n}" == EXTENSION]
            targets.update(subs or [base])
            if subs and len(subs) < len(names):
                targets.add(base)
        graph[module] = {t for t in targets if t != module and t in FILES or t == EXTENSION}
    graph[EXTENSION] = set()
    return graph


def test_every_module_has_a_layer():
    assert [m for m in FILES if layer(m) is None] == []


def test_imports_go_downward():
    upward = [(m, t) for m, targets in edges().items() for t in targets if layer(t) > layer(m)]
    assert upward == []


def test_no_import_cycle():
    graph, state = edges(), {}

    def visit(module, trail):
        if state.get(module) == "open":
            pytest.fail("import cycle: " + " -> ".join(trail + [module]))
        if state.get(module) == "done":
            return
        state[module] = "open"
        for target in sorted(graph[module]):
            visit(target, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def private_uses(path):
    """``from x import _name`` and ``alias._name`` where alias is an imported deepcut_fast/benchmarks module."""
    tree = ast.parse(path.read_text())
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("deepcut_fast", "benchmarks"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{node.module}.{a.name}")
                aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            aliases.update(a.asname or a.name.split(".")[0] for a in node.names
                           if a.name.split(".")[0] in ("deepcut_fast", "benchmarks"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__") and node.attr != "_C"):
            found.append(f"{node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("path", sorted([ROOT / "deepcut_fast" / "cli.py"] + list((ROOT / "tests").glob("*.py"))
                                        + list((ROOT / "benchmarks").glob("*.py"))), ids=lambda p: p.name)
def test_cli_tests_and_benchmarks_use_public_names(path):
    assert private_uses(path) == []
