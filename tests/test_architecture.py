"""The package keeps the shape ``docs/architecture.md`` draws: layers, no cycles, small parts.

Read from the source with ``ast`` (nothing is imported). Run it as a script to print the
figures: ``python tests/test_architecture.py``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "quakeray"

LAYERS: dict[str, int] = {
    "quakeray.errors": 1,
    "quakeray.config": 2,
    "quakeray.config_files": 2,
    "quakeray.storage": 2,
    "quakeray.locks": 2,
    "quakeray.tables": 2,
    "quakeray.data": 3,
    "quakeray.models": 3,
    "quakeray.losses": 3,
    "quakeray.optim": 3,
    "quakeray.metrics": 3,
    "quakeray.checkpoint": 3,
    "quakeray.seeds": 3,
    "quakeray.tracking": 4,
    "quakeray.inference": 4,
    "quakeray.evaluate": 4,
    "quakeray.plots": 4,
    "quakeray.runtime": 4,
    "quakeray.preflight": 4,
    "quakeray.train": 5,
    "quakeray.predict": 5,
    "quakeray.search": 6,
    "quakeray.report": 6,
    "quakeray.cli": 7,
    "quakeray.__main__": 7,
    "quakeray": 0,  # the package's own __init__: the version only
}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100
MAX_LOOP_LINES = 80


@dataclass
class Module:
    name: str
    lines: int
    imports: set[str] = field(default_factory=set)
    private_uses: list[str] = field(default_factory=list)
    functions: dict[str, int] = field(default_factory=dict)
    has_all: bool = False


def layer(module: str) -> int:
    """The layer of a module: the longest prefix listed in LAYERS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(f"{module} has no layer in LAYERS; add it (and to docs/architecture.md)")


def scan() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    files = sorted(PACKAGE.rglob("*.py"))
    names = {_module_name(f) for f in files}
    for path in files:
        text = path.read_text()
        tree = ast.parse(text)
        mod = Module(_module_name(path), len(text.splitlines()))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("quakeray"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    mod.imports.add(full if full in names else str(node.module))
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        mod.private_uses.append(f"{node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                mod.imports |= {a.name for a in node.names if a.name.startswith("quakeray")}
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                end = node.end_lineno or node.lineno
                mod.functions[node.name] = max(
                    mod.functions.get(node.name, 0), end - node.lineno + 1
                )
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and f"quakeray.{node.value.id}" in names
            ):
                mod.private_uses.append(f"{node.value.id}.{node.attr}")
        mod.has_all = any(
            isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)
            for n in tree.body
        )
        mod.imports.discard(mod.name)
        modules[mod.name] = mod
    for mod in modules.values():
        mod.imports = {i for i in mod.imports if i in modules}
    return modules


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in modules[v].imports:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in modules:
        if name not in index:
            visit(name)
    return found


def layer_breaks(modules: dict[str, Module]) -> list[str]:
    return [
        f"{m.name} (layer {layer(m.name)}) imports {i} (layer {layer(i)})"
        for m in modules.values()
        for i in sorted(m.imports)
        if layer(i) > layer(m.name) and not (m.name == "quakeray" or i.startswith(m.name + "."))
    ]


def long_functions(modules: dict[str, Module]) -> list[str]:
    return [
        f"{m.name}.{f} ({n} lines)"
        for m in modules.values()
        for f, n in m.functions.items()
        if n > MAX_FUNCTION_LINES
    ]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


# --------------------------------------------------------------------------- the tests

MODULES = scan()


def test_imports_form_layers_without_cycles() -> None:
    assert cycles(MODULES) == []
    assert layer_breaks(MODULES) == []


def test_no_module_uses_another_modules_private_names() -> None:
    assert [f"{m.name}: {u}" for m in MODULES.values() for u in m.private_uses] == []


def test_modules_and_functions_stay_small() -> None:
    assert [m.name for m in MODULES.values() if m.lines > MAX_MODULE_LINES] == []
    assert long_functions(MODULES) == []
    assert MODULES["quakeray.train.loop"].functions["train_loop_per_worker"] <= MAX_LOOP_LINES


def test_every_module_states_all() -> None:
    assert [
        m.name for m in MODULES.values() if not m.has_all and m.name != "quakeray.__main__"
    ] == []


def test_the_checker_sees_a_cycle_a_layer_break_and_a_private_reach_in() -> None:
    # The checks above must be able to fail: feed them a made-up package.
    fake = {
        "quakeray.config": Module("quakeray.config", 10, imports={"quakeray.train.loop"}),
        "quakeray.train.loop": Module("quakeray.train.loop", 10, imports={"quakeray.config"}),
    }
    assert cycles(fake) == [["quakeray.config", "quakeray.train.loop"]]
    assert layer_breaks(fake) == ["quakeray.config (layer 2) imports quakeray.train.loop (layer 5)"]
    fake["quakeray.config"].functions["huge"] = MAX_FUNCTION_LINES + 1
    assert long_functions(fake) == [f"quakeray.config.huge ({MAX_FUNCTION_LINES + 1} lines)"]


if __name__ == "__main__":
    biggest = sorted(MODULES.values(), key=lambda m: -m.lines)[:5]
    longest = sorted(
        ((n, f"{m.name}.{f}") for m in MODULES.values() for f, n in m.functions.items()),
        reverse=True,
    )[:5]
    print(f"modules: {len(MODULES)}, lines: {sum(m.lines for m in MODULES.values())}")
    print("largest modules:", ", ".join(f"{m.name} {m.lines}" for m in biggest))
    print("longest functions:", ", ".join(f"{name} {n}" for n, name in longest))
    print(
        "worker loop:", MODULES["quakeray.train.loop"].functions["train_loop_per_worker"], "lines"
    )
    print("import cycles:", cycles(MODULES) or "none")
    print("layer breaks:", layer_breaks(MODULES) or "none")
    print("private reach-ins:", [u for m in MODULES.values() for u in m.private_uses] or "none")
    print("modules without __all__:", [m.name for m in MODULES.values() if not m.has_all] or "none")
