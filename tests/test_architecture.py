"""The house's shape, checked from the sources: the floors import downward
only (emu -> guestkernel -> policies -> dmfrag), no module imports another's
private name, and no two modules import each other, however indirectly
(imports under TYPE_CHECKING and inside functions included: a subsystem
takes what it needs, not the Kernel)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("emu", "guestkernel", "policies", "dmfrag")
#: what each floor may import from the project
ALLOWED = {"emu": {"emu"}, "guestkernel": {"emu", "guestkernel"},
           "policies": {"emu", "guestkernel", "policies"},
           "dmfrag": {"emu", "guestkernel", "policies", "dmfrag"}}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(mod: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) for every import."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, path, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES
                           else (target, a.name, node.lineno))
    return out


def _project_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, _name, _line in _imports(mod, path):
            dep = _project_module(target)
            # A package importing its own submodules is how it re-exports them.
            if dep and dep != mod and not (dep.startswith(mod + ".")):
                g[mod].add(dep)
    return g


def test_floors_import_downward_only():
    bad = []
    for mod, path in MODULES.items():
        floor = mod.split(".")[0]
        for target, _name, line in _imports(mod, path):
            top = target.split(".")[0]
            if top in PACKAGES and top not in ALLOWED[floor]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {floor} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for mod, path in MODULES.items():
        for target, name, line in _imports(mod, path):
            dep = _project_module(target)
            if name and name.startswith("_") and not name.startswith("__") and dep != mod:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target}.{name}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:       # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strongconnect(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_guestkernel_never_imports_policies_and_finds_them_by_entry_point():
    from importlib.metadata import entry_points

    from guestkernel.policy import ENTRY_POINT_GROUP, policy_names
    declared = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert {"baseline", "pte-mapped-cache", "migrate-unmapped", "unmapped-alloc",
            "per-user-caches", "cpa-merge", "cpa-collapse", "prog-pack"} <= declared
    assert declared <= set(policy_names())
    for mod, path in MODULES.items():
        if mod.startswith("guestkernel"):
            assert not any(t.split(".")[0] == "policies" for t, _n, _l in _imports(mod, path)), mod
