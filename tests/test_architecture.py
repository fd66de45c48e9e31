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
    "quakeray.compat": 2,
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
MAX_SEARCH_MODULE_LINES = 400
MAX_FUNCTION_LINES = 100
MAX_LOOP_LINES = 80

THIRD_PARTY = ("ray", "optuna", "mlflow")
"""Libraries whose private names only ``quakeray.compat`` may use (it checks their versions)."""
COMPAT = "quakeray.compat"
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}  # public despite the underscore
MUTATORS = {
    "append", "add", "update", "pop", "setdefault", "clear", "extend", "remove", "discard",
    "insert", "popitem",
}  # fmt: skip


@dataclass
class Module:
    name: str
    lines: int
    imports: set[str] = field(default_factory=set)
    private_uses: list[str] = field(default_factory=list)
    functions: dict[str, int] = field(default_factory=dict)
    has_all: bool = False
    third_party_private: list[str] = field(default_factory=list)
    shared_state: list[str] = field(default_factory=list)


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
        mod.third_party_private = third_party_private_uses(tree)
        mod.shared_state = module_state_writes(tree)
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


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _third_party(module: str) -> bool:
    return module.split(".")[0] in THIRD_PARTY


def third_party_private_uses(tree: ast.Module) -> list[str]:
    """Private names of Ray, Tune, Train, Optuna or MLflow that a module uses.

    Seen from the source alone: an import of a private module or name of theirs; an
    attribute ``x._name`` read off anything but ``self``/``cls`` in a module that imports
    them; ``self._name`` in a class built on one of their classes, unless the class sets
    that attribute itself; ``getattr``/``setattr``/``hasattr`` with a private name.
    """
    found: list[str] = []
    imported: set[str] = set()  # names bound to their modules or classes
    touches = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _third_party(alias.name):
                    touches = True
                    imported.add((alias.asname or alias.name).split(".")[0])
                    if any(_is_private(p) for p in alias.name.split(".")):
                        found.append(f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and _third_party(node.module or ""):
            touches = True
            module = node.module or ""
            for alias in node.names:
                imported.add(alias.asname or alias.name)
                if any(_is_private(p) for p in [*module.split("."), alias.name]):
                    found.append(f"from {module} import {alias.name}")
    if not touches:
        return found
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _is_private(node.args[1].value)
        ):
            found.append(f"{node.func.id}(..., {node.args[1].value!r})")
        elif (
            isinstance(node, ast.Attribute)
            and _is_private(node.attr)
            and node.attr not in NAMEDTUPLE_API
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"{ast.unparse(node.value)}.{node.attr}")
        elif isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b).split(".")[0] for b in node.bases}
            if bases & imported:
                found += _inherited_private_reads(node)
    return found


def _inherited_private_reads(cls: ast.ClassDef) -> list[str]:
    """``self._x`` in a subclass of a third-party class where the class never sets ``_x``."""
    own = {n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    own |= {
        node.attr
        for node in ast.walk(cls)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }
    return [
        f"{cls.name}: self.{node.attr}"
        for node in ast.walk(cls)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and _is_private(node.attr)
        and node.attr not in own
    ]


def module_state_writes(tree: ast.Module) -> list[str]:
    """Module-level state a module's functions write: ``global`` or a mutated container.

    Such state carries information from one part (or call) to another behind the callers'
    backs; a part that needs it is handed it instead. A module constant read-only, and a
    cache of a pure function (``functools.lru_cache``), are fine.
    """
    top = {
        t.id
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Name)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found += [f"global {name}" for name in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in top
            and node.func.attr in MUTATORS
        ):
            found.append(f"{node.func.value.id}.{node.func.attr}(...)")
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Store | ast.Del)
            and isinstance(node.value, ast.Name)
            and node.value.id in top
        ):
            found.append(f"{node.value.id}[...] =")
    return found


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


def test_only_the_compat_module_uses_private_names_of_ray_optuna_and_mlflow() -> None:
    assert [
        f"{m.name}: {u}"
        for m in MODULES.values()
        if m.name != COMPAT
        for u in m.third_party_private
    ] == []


def test_no_module_keeps_state_for_other_parts() -> None:
    assert [f"{m.name}: {w}" for m in MODULES.values() for w in m.shared_state] == []


def test_modules_and_functions_stay_small() -> None:
    assert [m.name for m in MODULES.values() if m.lines > MAX_MODULE_LINES] == []
    search = [m for m in MODULES.values() if m.name.startswith("quakeray.search")]
    assert [m.name for m in search if m.lines > MAX_SEARCH_MODULE_LINES] == []
    assert long_functions(MODULES) == []
    assert MODULES["quakeray.train.loop"].functions["train_loop_per_worker"] <= MAX_LOOP_LINES


def undocumented(modules: dict[str, Module], doc: str) -> list[str]:
    """Modules whose file ``docs/architecture.md`` never names (``name.py`` in backticks)."""
    missing = []
    for name in modules:
        parts = name.split(".")[1:]
        if not parts or parts[-1] == "__main__":
            continue
        names = (f"`{parts[-1]}.py`", f"`{parts[-1]}`", f"`{parts[-1]}/`")
        if not any(n in doc for n in names):
            missing.append(name)
    return missing


def test_docs_name_every_module() -> None:
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert undocumented(MODULES, doc) == []


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


def test_the_docs_check_sees_a_missing_module() -> None:
    fake = {"quakeray.search.layout": Module("quakeray.search.layout", 1)}
    assert undocumented(fake, "`layout.py` draws it") == []
    assert undocumented(fake, "nothing here") == ["quakeray.search.layout"]


def test_the_checker_sees_private_names_of_ray_and_optuna_and_shared_state() -> None:
    reach_ins = ast.parse(
        "from ray._private.state import state\n"
        "import optuna\n"
        "from ray.tune.search import Searcher\n"
        "class Mine(Searcher):\n"
        "    def __init__(self):\n"
        "        self._own = 1\n"
        "    def f(self, dist, tuner):\n"
        "        self._own, self._spare = 2, self._helper()\n"
        "        getattr(tuner, '_local_tuner')\n"
        "        parts = dist._replace(a=1)\n"
        "        return dist._contains(1), self._mode\n"
        "    def _helper(self):\n"
        "        return self._own\n"
    )
    assert sorted(third_party_private_uses(reach_ins)) == sorted(
        [
            "from ray._private.state import state",
            "getattr(..., '_local_tuner')",
            "dist._contains",
            "Mine: self._mode",
        ]
    )
    # A module that imports none of them is not read for attributes (our own names).
    assert third_party_private_uses(ast.parse("def f(ds):\n    return ds._read_into\n")) == []
    state = ast.parse(
        "_offers = {}\n_pool = None\nLIMIT = {'a': 1}\n"
        "def offer(k, v):\n    _offers[k] = v\n"
        "def start():\n    global _pool\n    _pool = 1\n"
        "def take(k):\n    return _offers.pop(k)\n"
        "def read():\n    return LIMIT['a']\n"
    )
    assert sorted(module_state_writes(state)) == [
        "_offers.pop(...)",
        "_offers[...] =",
        "global _pool",
    ]


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
    print(
        "module state written:",
        {m.name: m.shared_state for m in MODULES.values() if m.shared_state} or "none",
    )
    print(
        "third-party private names:",
        {m.name: m.third_party_private for m in MODULES.values() if m.third_party_private},
    )
