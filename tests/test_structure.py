"""Structure checks on the package tree, by static analysis (``ast``), so they run without torch.

* no import cycle inside ``repinf_lens``: the import graph counts module-level AND function-level (lazy) imports,
  and those under ``if TYPE_CHECKING:``, since hiding an import does not remove the dependency (imports by string,
  ``importlib.import_module("...")``, are not seen: the package has none);
* imports point down the layers (:data:`LAYERS`: core < analysis/viz < pipeline < entry points);
* no ``_private`` name of one module imported or read by another: ``from x import _y``, ``x._y`` on an imported
  module, and ``obj._y`` where ``_y`` is a private method/attribute of a class of ANOTHER module (leading-underscore
  MODULES such as ``repinf_lens._shards`` are package-internal and may be imported by name; their public names
  are the API);
* every ``__all__`` is sorted (ruff's isort-style order, RUF022) and each of its names exists and, for a function,
  class or module, has a docstring (this part imports the package).

How the graph treats packages: a package ``__init__`` is a node that imports what it imports. ``from repinf_lens.x
import y`` is an edge to the module ``repinf_lens.x.y`` when that is a module, else to ``repinf_lens.x``. The parent
packages that Python runs first are NOT edges (else every module would sit in a cycle through the top-level
``__init__`` that re-exports it), so a submodule that reads a name from ``repinf_lens`` itself (``__version__``) IS
a cycle: such shared names live in a small leaf module (``repinf_lens._version``).

Each checker is a plain function over ``{module: source}``, and the self-tests at the bottom feed it synthetic
violations, so a check that could never fail would show.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = "repinf_lens"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Violations that live in files owned by the lead (edited in parallel there), each with the fix it needs. An entry
# that no longer matches a violation fails its test, so these lists only shrink.
KNOWN_CYCLES: dict[frozenset[str], str] = {}  # owned by the lead, to fix
KNOWN_LAYERS: dict[str, str] = {}  # owned by the lead, to fix
KNOWN_UNSORTED: dict[str, str] = {}  # owned by the lead, to fix: `ruff check --select RUF022 --fix FILE`

# Layers, lowest first: the path the data takes. A module imports only from its own layer or lower ones (inside a
# layer, the no-cycle check orders them). Core = everything not named here: errors, _io, _cache, _stats, _tree,
# _version, _resources, testing, assets.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("repinf_lens.models",),  # loading TransformerLens models, what a HookedTransformer does
    ("repinf_lens.data",),  # datasets -> rows
    ("repinf_lens.task",),  # rows -> tokens, loss positions, the attributed loss
    ("repinf_lens._fingerprint", "repinf_lens._shards"),  # identities of (model, task, data) and crash-safe shards
    ("repinf_lens.split", "repinf_lens._dist"),  # the model cut at a hook, the SAE spliced in, theta2
    ("repinf_lens.saes",),  # SAE training, sweep, loading, publishing
    ("repinf_lens.curvature",),  # HVPs and inverse-HVP solvers
    ("repinf_lens.influence",),  # the swap, the engine, results, the prefilter
    ("repinf_lens.analysis", "repinf_lens.viz"),  # measurements and reports over results
    ("repinf_lens.workflows",),  # the stage runners, finetuning, the demo
    ("repinf_lens.cli", "repinf_lens.distributed", "repinf_lens.__main__", "repinf_lens"),  # entry points, facade
)


# ----------------------------------------------------------------------------------------------------- sources


def package_sources(root: Path = ROOT, package: str = PACKAGE) -> dict[str, tuple[str, bool]]:
    """``{dotted module name: (source, is_package)}`` for every ``.py`` file under ``root``."""
    out: dict[str, tuple[str, bool]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = [package, *rel.parts]
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path.read_text(encoding="utf-8"), is_pkg)
    return out


def _base_package(module: str, is_pkg: bool) -> str:
    return module if is_pkg else module.rpartition(".")[0]


def _resolve_from(module: str, is_pkg: bool, node: ast.ImportFrom) -> str | None:
    """The absolute module a ``from ... import`` statement reads from (relative imports resolved)."""
    if not node.level:
        return node.module
    base = _base_package(module, is_pkg).split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


# ------------------------------------------------------------------------------------------------ import graph


def import_graph(sources: Mapping[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, every import statement counted (module or function level)."""
    modules = set(sources)
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for name, (text, is_pkg) in sources.items():
        for node in ast.walk(ast.parse(text, filename=name)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = _resolve_from(name, is_pkg, node)
                if src is None:
                    continue
                for alias in node.names:
                    sub = f"{src}.{alias.name}"
                    targets.append(sub if sub in modules else src)
            for target in targets:
                # ``import a.b.c`` names a.b.c; keep the longest prefix that is a module of the package
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def import_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted; sorted by first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def cycle_path(graph: Mapping[str, set[str]], component: Iterable[str]) -> list[str]:
    """One concrete cycle ``a -> b -> ... -> a`` inside a strongly connected component (for the failure message)."""
    comp = set(component)
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:  # breadth-first from start, inside the component, until an edge leads back to start
        nxt = []
        for v in frontier:
            if start in graph[v]:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            for w in sorted(graph[v] & comp):
                if w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def _describe_cycles(graph: Mapping[str, set[str]], cycles: list[list[str]]) -> str:
    lines = []
    for comp in cycles:
        lines.append(f"  component {comp}")
        lines.append("    e.g. " + " -> ".join(cycle_path(graph, comp)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- private names


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(sources: Mapping[str, tuple[str, bool]]) -> list[str]:
    """``"importer: module._name"`` for every private name of a package module used by another module.

    Caught: ``from pkg.x import _y`` (``_y`` not a module), and attribute reads ``x._y`` / ``pkg.x._y`` where ``x``
    is bound by an import to a module of the package.
    """
    modules = set(sources)
    tops = {m.split(".")[0] for m in modules}
    found: set[str] = set()
    for name, (text, is_pkg) in sources.items():
        tree = ast.parse(text, filename=name)
        bound: dict[str, str] = {}  # local name -> package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in tops:
                        if alias.asname:
                            bound[alias.asname] = alias.name
                        else:
                            top = alias.name.split(".")[0]
                            bound[top] = top
            elif isinstance(node, ast.ImportFrom):
                src = _resolve_from(name, is_pkg, node)
                if src is None or src.split(".")[0] not in tops:
                    continue
                for alias in node.names:
                    sub = f"{src}.{alias.name}"
                    if sub in modules:
                        bound[alias.asname or alias.name] = sub
                    elif _is_private(alias.name) and src != name:
                        found.add(f"{name}: {src}.{alias.name}")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            chain = []
            cur: ast.expr = node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if not isinstance(cur, ast.Name) or cur.id not in bound:
                continue
            chain.reverse()
            target = bound[cur.id]
            for attr in chain:
                if f"{target}.{attr}" in modules:
                    target = f"{target}.{attr}"
                    continue
                if _is_private(attr) and target != name:
                    found.add(f"{name}: {target}.{attr}")
                break
    return sorted(found)


def _private_members(tree: ast.Module) -> set[str]:
    """Private names a module defines on its classes: methods, class attributes and ``self._x = ...``."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    out.add(item.name)
                elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                    targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                    out.update(t.id for t in targets if isinstance(t, ast.Name))
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        ):
            out.add(node.attr)
    return {n for n in out if _is_private(n)}


def private_attribute_uses(sources: Mapping[str, tuple[str, bool]]) -> list[str]:
    """``"user: owner.obj._name"`` where a module reads ``obj._name`` (``obj`` not ``self``/``cls``) and ``_name`` is a
    private method/attribute that only OTHER modules of the package define (e.g. one module driving another's class
    through its privates). Private names no module of the package defines (torch's ``t._version``) are ignored.
    """
    trees = {name: ast.parse(text, filename=name) for name, (text, _) in sources.items()}
    members = {name: _private_members(tree) for name, tree in trees.items()}
    found = set()
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            owners = sorted(m for m, names in members.items() if node.attr in names)
            if owners and name not in owners:
                found.add(f"{name}: {'|'.join(owners)}.{ast.unparse(node.value)}.{node.attr}")
    return sorted(found)


def layer_of(module: str, layers: Iterable[Iterable[str]] = LAYERS) -> int:
    """The layer index of ``module`` (0 = core; a group names a module, or a subpackage and all under it)."""
    best, depth = 0, -1
    for i, group in enumerate(layers, start=1):
        for prefix in group:
            # the top-level package names its __init__ only, a subpackage everything under it
            under = "." in prefix and module.startswith(prefix + ".")
            if (module == prefix or under) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    return best


def layer_violations(graph: Mapping[str, set[str]], layers: Iterable[Iterable[str]] = LAYERS) -> list[str]:
    """``"a -> b"`` for every import of a module ``b`` in a higher layer than the importer ``a``."""
    layers = [tuple(g) for g in layers]
    return sorted(
        f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b, layers) > layer_of(a, layers)
    )


# ------------------------------------------------------------------------------------------------------ __all__

_CONSTANT = re.compile(r"^[A-Z0-9_]*[A-Z][A-Z0-9_]*$")


def all_sort_key(name: str) -> tuple:
    """Ruff's isort-style ``__all__`` order (RUF022): CONSTANTS, then Classes, then the rest, each natural-sorted."""
    if len(name) > 1 and _CONSTANT.match(name):
        kind = 0
    elif name[:1].isupper():
        kind = 1
    else:
        kind = 2
    natural = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)
    return kind, natural


def static_all(text: str) -> list[str] | None:
    """The module-level ``__all__`` list/tuple of string literals, or None where there is none."""
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            return [ast.literal_eval(e) for e in node.value.elts]  # type: ignore[attr-defined]
    return None


def unsorted_all(sources: Mapping[str, tuple[str, bool]]) -> dict[str, list[str]]:
    """``{module: its __all__ in the expected order}`` for every module whose ``__all__`` is not sorted."""
    out = {}
    for name, (text, _) in sources.items():
        names = static_all(text)
        if names is not None and names != sorted(names, key=all_sort_key):
            out[name] = sorted(names, key=all_sort_key)
    return out


def _ast_docstring(obj: object) -> str | None | bool:
    """The docstring a class/function has in its module's source (``None``: none); False when the source is unknown.

    Read from the AST, not ``__doc__``: a dataclass without a docstring gets a generated ``__doc__`` (its signature).
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    if not module or "<locals>" in qualname:
        return False
    try:
        path = inspect.getsourcefile(importlib.import_module(module))
    except (ImportError, OSError, TypeError):
        return False
    if path is None:
        return False
    scope: list[ast.stmt] = ast.parse(Path(path).read_text(encoding="utf-8")).body
    node: ast.AST | None = None
    for part in qualname.split("."):
        node = next(
            (
                n
                for n in scope
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part
            ),
            None,
        )
        if node is None:
            return False
        scope = node.body  # type: ignore[attr-defined]
    return ast.get_docstring(node)  # type: ignore[arg-type]


def undocumented_exports(module_names: Iterable[str]) -> list[str]:
    """``"module.name: why"`` for each ``__all__`` name that is missing, or an undocumented function/class/module."""
    problems = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for export in getattr(module, "__all__", None) or ():
            if not hasattr(module, export):
                problems.append(f"{module_name}.{export}: in __all__ but not defined")
                continue
            obj = getattr(module, export)
            if isinstance(obj, types.ModuleType):
                doc = obj.__doc__
            elif inspect.isclass(obj) or inspect.isfunction(obj):
                doc = _ast_docstring(obj)
                if doc is False:  # no source (built-in, dynamic): its own __doc__
                    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
            else:
                continue  # a constant or an instance: nothing to document
            if not (doc or "").strip():
                problems.append(f"{module_name}.{export}: no docstring")
    return problems


# --------------------------------------------------------------------------------------------------- the checks


@pytest.fixture(scope="module")
def sources() -> dict[str, tuple[str, bool]]:
    return package_sources()


def test_no_import_cycle(sources):
    graph = import_graph(sources)
    cycles = import_cycles(graph)
    new = [c for c in cycles if frozenset(c) not in KNOWN_CYCLES]
    assert not new, "import cycles inside repinf_lens (lazy imports count):\n" + _describe_cycles(graph, new)
    stale = set(KNOWN_CYCLES) - {frozenset(c) for c in cycles}
    assert not stale, f"KNOWN_CYCLES entries that are fixed now (or changed), update them: {stale}"


def test_layers_point_down(sources):
    found = layer_violations(import_graph(sources))
    new = [f for f in found if f not in KNOWN_LAYERS]
    assert not new, "imports from a higher layer (see LAYERS):\n  " + "\n  ".join(new)
    stale = set(KNOWN_LAYERS) - set(found)
    assert not stale, f"KNOWN_LAYERS entries that are fixed now, remove them: {sorted(stale)}"


def test_no_private_name_across_modules(sources):
    found = private_imports(sources) + private_attribute_uses(sources)
    assert not found, "private names used across modules (make them public or move them):\n  " + "\n  ".join(found)


def test_all_sorted(sources):
    bad = unsorted_all(sources)
    new = {m: order for m, order in bad.items() if m not in KNOWN_UNSORTED}
    assert not new, "unsorted __all__ (`ruff check --select RUF022 --fix FILE` sorts them):\n" + "\n".join(
        f"  {m}: {order}" for m, order in new.items()
    )
    stale = set(KNOWN_UNSORTED) - set(bad)
    assert not stale, f"KNOWN_UNSORTED entries that are sorted now, remove them: {sorted(stale)}"


def test_all_exports_exist_and_documented(sources):
    with_all = [m for m, (text, _) in sources.items() if static_all(text) is not None]
    assert PACKAGE in with_all
    problems = undocumented_exports(with_all)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------- the checks can fail (self-test)


def _synthetic(files: Mapping[str, str]) -> dict[str, tuple[str, bool]]:
    return {name.removesuffix(".__init__"): (text, name.endswith("__init__")) for name, text in files.items()}


def test_checker_finds_a_two_module_cycle():
    src = _synthetic(
        {
            "pkg.__init__": "",
            "pkg.a": "from pkg.b import f\n",
            "pkg.b": "def f():\n    from . import a\n",  # a lazy, relative import still counts
            "pkg.c": "import pkg.a\n",
        }
    )
    graph = import_graph(src)
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b"]]
    assert cycle_path(graph, ["pkg.a", "pkg.b"]) == ["pkg.a", "pkg.b", "pkg.a"]


def test_checker_finds_a_cycle_through_a_package_init():
    src = _synthetic(
        {
            "pkg.__init__": "from pkg.sub import thing\n__version__ = '1'\n",
            "pkg.sub": "from pkg import __version__\n",
            "pkg.leaf": "from pkg.sub import thing\n",
        }
    )
    assert import_cycles(import_graph(src)) == [["pkg", "pkg.sub"]]


def test_checker_finds_private_names():
    src = _synthetic(
        {
            "pkg.__init__": "",
            "pkg._internal": "def public(): ...\ndef _hidden(): ...\n",
            "pkg.a": "def _helper(): ...\n__version__ = '1'\n",
            "pkg.b": (
                "from pkg.a import _helper, __version__\n"
                "from pkg import _internal\n"
                "from pkg._internal import public\n"
                "def f():\n"
                "    import pkg.a\n"
                "    from . import a as alias\n"
                "    return pkg.a._other, alias._third, _internal._hidden, _internal.public\n"
            ),
        }
    )
    assert private_imports(src) == [
        "pkg.b: pkg._internal._hidden",
        "pkg.b: pkg.a._helper",
        "pkg.b: pkg.a._other",
        "pkg.b: pkg.a._third",
    ]


def test_checker_finds_unsorted_all():
    src = _synthetic(
        {"pkg.__init__": "__all__ = ['b', 'A', 'CONST']\n", "pkg.ok": "__all__ = ['X2', 'Cls', 'f9', 'f10']"}
    )
    assert unsorted_all(src) == {"pkg": ["CONST", "A", "b"]}
    assert sorted(["f10", "f9", "Cls", "X2", "SOLVERS", "STestCache", "SolveInfo"], key=all_sort_key) == [
        "SOLVERS",
        "X2",
        "Cls",
        "STestCache",
        "SolveInfo",
        "f9",
        "f10",
    ]


def test_checker_finds_undocumented_exports(tmp_path, monkeypatch):
    (tmp_path / "fake_structure_mod.py").write_text(
        "import dataclasses\n"
        "import os as path_module\n"
        "__all__ = ['CONST', 'Documented', 'Undocumented', 'documented', 'missing', 'path_module', 'undocumented']\n"
        "CONST = 3\n"
        'class Documented:\n    """Has one."""\n'
        "@dataclasses.dataclass\nclass Undocumented:\n    x: int = 0\n"  # __doc__ is generated: 'Undocumented(x...)'
        'def documented():\n    """Has one."""\n'
        "def undocumented():\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert undocumented_exports(["fake_structure_mod"]) == [
        "fake_structure_mod.Undocumented: no docstring",
        "fake_structure_mod.missing: in __all__ but not defined",
        "fake_structure_mod.undocumented: no docstring",
    ]


def test_checker_finds_private_attributes_of_another_modules_class():
    src = _synthetic(
        {
            "pkg.__init__": "",
            "pkg.engine": (
                "class Engine:\n"
                "    _CONST = 1\n"
                "    def __init__(self):\n        self._state = 0\n"
                "    def _step(self):\n        return self._state, self._CONST\n"
                "    def __len__(self):\n        return 0\n"
            ),
            "pkg.driver": (
                "def drive(engine, t):\n"
                "    return engine._step(), engine._state, len(engine), engine.__len__(), t._version\n"
            ),
        }
    )
    assert private_attribute_uses(src) == [
        "pkg.driver: pkg.engine.engine._state",
        "pkg.driver: pkg.engine.engine._step",
    ]


def test_checker_finds_layer_violations():
    graph = {
        "pkg.core": {"pkg.analysis.x"},
        "pkg.analysis.x": {"pkg.core", "pkg.pipeline"},
        "pkg.pipeline": {"pkg.analysis.x", "pkg"},
        "pkg.cli": {"pkg.pipeline"},
        "pkg": {"pkg.cli"},
    }
    layers = (("pkg.analysis",), ("pkg.pipeline",), ("pkg.cli", "pkg"))
    assert layer_of("pkg.core", layers) == 0 and layer_of("pkg", layers) == 3 and layer_of("pkg.cli", layers) == 3
    assert layer_violations(graph, layers) == [
        "pkg.analysis.x -> pkg.pipeline",
        "pkg.core -> pkg.analysis.x",
        "pkg.pipeline -> pkg",
    ]


# --------------------------------------------------------------------------------------------- the public API

MAX_TOP_LEVEL = 32


def test_top_level_api_is_curated():
    """A small top level (the main path), sorted, every name real, documented and on the package docstring's map;
    nothing else public bound there except submodules (``rl.task``, ``rl.split`` ...: reached through the map)."""
    import repinf_lens

    names = repinf_lens.__all__
    assert len(names) <= MAX_TOP_LEVEL, f"{len(names)} top-level names; move some into their subpackage"
    assert names == sorted(names, key=all_sort_key)
    assert len(set(names)) == len(names)
    assert not undocumented_exports([PACKAGE])
    doc = repinf_lens.__doc__ or ""
    missing = [n for n in names if f"``{n}``" not in doc]
    assert not missing, f"names in __all__ not on the API map of repinf_lens/__init__.py's docstring: {missing}"
    for name in names:
        obj = getattr(repinf_lens, name)
        if isinstance(obj, types.ModuleType):
            assert obj.__name__ == f"{PACKAGE}.{name}", name
    extra = [
        n
        for n, obj in vars(repinf_lens).items()
        if not n.startswith("_") and n not in names and not isinstance(obj, types.ModuleType)
    ]
    assert not extra, f"public names at the top level but not in __all__: {extra}"


def test_top_level_imports_and_testing_attribute_in_a_fresh_interpreter():
    """``import repinf_lens as rl`` alone gives ``rl.testing.random_sae`` and every ``__all__`` name."""
    import subprocess
    import sys

    code = (
        "import repinf_lens as rl\n"
        "assert callable(rl.testing.random_sae)\n"
        "exec('from repinf_lens import ' + ', '.join(rl.__all__))\n"
        "print(len(rl.__all__))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) <= MAX_TOP_LEVEL
