"""The code's layering: six boxes, every import pointing one way, no cycle between
files, no class name used twice.

Static analysis of the source (the import statements, including those inside
functions, and dotted paths in strings, such as the rq job a dispatcher
queues): nothing crosses a wire, so no peer is involved.

    rules          rules as data: models, matcher, morphing (imports none of the others)
    router.kernel  config, spool, queues, errors, statuses, DICOM wire vocabulary, file meta
    router.ingest  the ingest SCP                         workers   routing, forwarding, sending
    router.services  Q/R, worklist, MPPS: what the ingest answers besides C-STORE (they send
                   with the workers' sender; the ingest knows them by a protocol only)
    app            router.cli, cli_rules, preflight, supervisor, embedded_redis
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("router", "rules", "workers")
DOTTED = re.compile(r"(?:router|rules|workers)(?:\.\w+)+")
"""A string that may name one of the router's modules (or what is in it) by its
path; it counts when it does (``"router.tls"`` is a configuration key)."""
ALLOWED = {
    "rules": set(),
    "kernel": {"rules"},
    "ingest": {"kernel", "rules"},
    "workers": {"kernel", "rules"},
    "services": {"kernel", "rules", "workers"},
    "app": {"kernel", "rules", "ingest", "workers", "services"},
}


def _box(module: str) -> str | None:
    for prefix, box in (("rules", "rules"), ("router.kernel", "kernel"), ("router.ingest", "ingest"),
                        ("router.services", "services"), ("workers", "workers"), ("router", "app")):
        if module == prefix or module.startswith(prefix + "."):
            return box
    return None


def _imports() -> dict[str, set[str]]:
    """Module -> the router's own modules (and packages) it imports."""
    found: dict[str, set[str]] = {}
    dotted: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            names: set[str] = set()
            dotted[module] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module)
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
                elif isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and DOTTED.fullmatch(node.value):
                    dotted[module].add(node.value)
            found[module] = {n for n in names if n.split(".")[0] in PACKAGES}
    modules = [m for m in found if "." in m]
    for module, strings in dotted.items():
        found[module] |= {s for s in strings if any(s == m or s.startswith(m + ".") for m in modules)}
    return found


def test_every_import_points_down_the_five_boxes():
    """No module imports from a box above its own (the kernel never from the ingest, the ingest never from workers)."""
    crossing = [f"{module} -> {target}" for module, targets in _imports().items() for target in targets
                if _box(target) != _box(module) and _box(target) not in ALLOWED[_box(module)]]
    assert crossing == []


def test_no_two_files_import_each_other_even_through_others():
    """The import graph between files has no cycle (Tarjan's strongly connected components)."""
    imports = _imports()
    graph = {m: {t for t in targets if t in imports and t != m} for m, targets in imports.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []


def test_no_two_classes_share_a_name():
    """Each class name names one class in the project, so a traceback or a review names one thing."""
    found: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    found.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in found.items() if len(paths) > 1} == {}
