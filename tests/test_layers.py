"""The package's floors: every import inside noprop points to its own floor or one below, so there
is no import circle (docs/design.md §2). Walks the source, function-level imports included."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "noprop"  # read as source: a circle would break `import noprop`
KERNELS = ROOT.parent / "kernels"
# Lowest first. A module's floor is that of the longest prefix listed.
FLOORS = [
    ("ground", ("noprop.schedule", "noprop.embeddings", "noprop.data", "noprop.devices", "noprop.atomic",
                "noprop.stages", "noprop.checkpoint", "noprop.options", "noprop.array_pickle",
                "noprop.messages")),
    ("kernels", ("noprop.kernels",)),
    ("ops", ("noprop.ops", "noprop.dispatch")),
    ("engine", ("noprop.engine",)),
    ("models", ("noprop.models",)),
    ("training", ("noprop.training",)),
    ("commands", ("noprop.cli", "noprop.bench", "noprop.profile", "noprop.info", "noprop.__main__")),
]


def floor_of(module: str) -> int | None:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def modules():
    """(dotted name, path, is_package) of every module of the installed layout (kernels/ as noprop.kernels)."""
    for base, prefix in ((ROOT, "noprop"), (KERNELS, "noprop.kernels")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([prefix, *parts]), path, path.name == "__init__.py"


def imports_of(name: str, path: Path, is_package: bool) -> set[str]:
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from noprop import engine`
    known = {m for m, _, _ in modules()}
    return {t for t in found if t in known}


def test_every_import_points_to_its_floor_or_below():
    wrong = []
    for name, path, is_package in modules():
        if is_package and name in ("noprop", "noprop.kernels"):
            continue  # the package front doors re-export from every floor
        mine = floor_of(name)
        assert mine is not None, f"{name} has no floor in tests/test_layers.py: give it one"
        for target in imports_of(name, path, is_package):
            theirs = floor_of(target)
            if theirs is not None and theirs > mine:
                wrong.append(f"{name} ({FLOORS[mine][0]}) imports {target} ({FLOORS[theirs][0]})")
    assert not wrong, "imports that run up a floor:\n" + "\n".join(wrong)


def test_no_import_circle():
    # `from . import checks` names the parent package, which Python has already imported by then:
    # an edge to an ancestor is no circle.
    graph = {name: {t for t in imports_of(name, path, pkg) if not (name + ".").startswith(t + ".")}
             for name, path, pkg in modules() if name not in ("noprop", "noprop.kernels")}
    seen, on_stack, cycles = set(), [], []

    def visit(node):
        if node in on_stack:
            cycles.append(on_stack[on_stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        on_stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in graph:
                visit(nxt)
        on_stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_function_level_imports():
    """The check would be blind if it read only top-level imports: the package has function-level ones."""
    found = imports_of("noprop.cli", ROOT / "cli.py", False)
    assert "noprop.training.loop" in found or "noprop.training" in found
