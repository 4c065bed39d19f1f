"""The import rules of the layout, checked by walking the source with `ast` (function-level imports included)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("retriever", "app", "demo")
JOBS = ("index", "evaluate", "train", "explain")  # sibling job packages of retriever/
# Leaves every job may read: the dataset readers and the metrics (numpy/torch only, no jobs behind them).
SHARED_LEAVES = ("retriever.evaluate.data", "retriever.evaluate.metrics")
FORBIDDEN_IN_LIBRARY = ("app", "demo", "gradio", "folium", "branca", "matplotlib", "pyrosm")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    found = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    found["app_entry"] = REPO / "app.py"
    return found


MODULES = source_modules()


def is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against the importer)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str) -> Iterator[tuple[str, list[str], int]]:
    """(module, imported names, line) for every import statement in module `name`."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never executed
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            yield resolve(name, node), [a.name for a in node.names], node.lineno


def edges(name: str) -> set[str]:
    """The project modules that importing `name` may execute (`from pkg import sub` counts pkg.sub, not pkg)."""
    out: set[str] = set()
    for target, names, _ in imports(name):
        submodules = {f"{target}.{imported}" for imported in names} & set(MODULES)
        out |= submodules
        if target in MODULES and (not names or len(submodules) < len(names)):
            out.add(target)
    out.discard(name)
    return out


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {name: edges(name) for name in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    return found


def job_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "retriever" and parts[1] in JOBS else None


def test_the_walk_sees_the_layout() -> None:
    # guards the test itself: an empty walk would pass every rule below
    assert {"retriever.index", "retriever.models.encoder", "retriever._io", "app.callbacks"} <= set(MODULES)
    assert "retriever.models.config" in edges("retriever.models.encoder")


def test_no_import_cycles() -> None:
    assert cycles() == []


def test_no_private_names_across_modules() -> None:
    bad = [
        f"{name}:{line} imports {target}.{imported}"
        for name in MODULES
        for target, names, line in imports(name)
        for imported in names
        if imported.startswith("_") and not imported.startswith("__") and target != name
    ]
    assert bad == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("retriever")))
def test_library_never_imports_app_demo_or_ui(name: str) -> None:
    bad = [
        f"{name}:{line} imports {target}"
        for target, _, line in imports(name)
        if target.split(".")[0] in FORBIDDEN_IN_LIBRARY
    ]
    assert bad == []


def test_only_main_modules_import_across_sibling_jobs() -> None:
    bad = []
    for name in MODULES:
        own = job_of(name)
        if own is None or name.endswith("__main__"):
            continue
        for target, names, line in imports(name):
            candidates = [target] + [f"{target}.{n}" for n in names]
            other = {job_of(c) for c in candidates} - {None, own}
            if other and not any(c.startswith(SHARED_LEAVES) for c in candidates):
                bad.append(f"{name}:{line} imports {target}")
    assert bad == []


def test_a_cycle_and_a_private_import_would_be_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the checker on a two-module fixture: proves that it can fail
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import _helper\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg import a\n")
    fake = {module_name_in(tmp_path, p): p for p in (tmp_path / "pkg").rglob("*.py")}
    monkeypatch.setattr(f"{__name__}.MODULES", fake)
    assert cycles() == [["pkg.a", "pkg.b"]]
    assert any(n.startswith("_") for _, names, _ in imports("pkg.a") for n in names)


def module_name_in(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
