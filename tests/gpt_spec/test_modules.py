"""gpt_spec's shape: its modules import one another without a cycle and without hiding an import of
one another inside a function, none is over MAX_LINES lines, none needs a framework, and its
public surface is the dozen names a user needs, each importable and documented.

The import graph is read from the source (every `import` and `from ... import` statement, at any
depth), not from an interpreter: a cycle a function-level import dodges at run time is still a cycle.
"""

from __future__ import annotations

import ast
import graphlib
import importlib
import inspect
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import gpt_spec

PACKAGE = Path(gpt_spec.__file__).parent
MAX_LINES = 500
MAX_PUBLIC = 15
FRAMEWORKS = ("torch", "jax", "flax", "orbax")


def _modules(package_dir: Path) -> dict[str, Path]:
    """`{dotted name: file}` of every module of the package (a package by its own name)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: Iterable[str]) -> list[tuple[str, int, bool]]:
    """`(module, line, at module level?)` for each module of `modules` an import statement of
    `name` imports: `from X import y` imports the module X.y where there is one, else X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = set(modules)
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1] + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in known else base, child.lineno, top))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), True)
    return [(target, line, top) for target, line, top in found if target in known and target != name]


def _graph(package_dir: Path) -> tuple[dict[str, set[str]], list[str]]:
    """The package's import graph, `{module: modules it imports}`, with the packages a target sits
    in (their `__init__` runs first) but not the importer's own, which are being imported already;
    and every import of one of its modules made inside a function, as 'file:line module'."""
    modules = _modules(package_dir)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    hidden = []
    for name, path in modules.items():
        own = {name.rsplit(".", i)[0] for i in range(name.count(".") + 1)}
        for target, line, top in _imports(name, path, modules):
            parents = {target.rsplit(".", i)[0] for i in range(1, target.count(".") + 1)}
            graph[name] |= {target} | (parents - own)
            if not top:
                hidden.append(f"{path.relative_to(package_dir.parent)}:{line} {target}")
    return graph, hidden


def test_no_gpt_spec_module_imports_another_inside_a_function():
    """A function-level import of a sibling is how a cycle hides: each module imports what it
    needs at its top, so the order modules load in is the graph's."""
    _, hidden = _graph(PACKAGE)
    assert hidden == []


def test_the_import_graph_of_gpt_spec_is_acyclic():
    """Every import counts, wherever it stands: a module imported inside a function closes a cycle
    as surely as one at the top, only later."""
    graph, _ = _graph(PACKAGE)
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
    facade = sorted(name for name, imported in graph.items() if "gpt_spec" in imported)
    assert facade == [], "modules import from the package's __init__ rather than the module that defines it"
    assert order.index("gpt_spec.layout") < min(
        order.index(m) for m in ("gpt_spec.formats.hf", "gpt_spec.checkpoint", "gpt_spec.formats.canonical")
    )


def test_the_graph_reader_sees_a_cycle_and_a_hidden_import(tmp_path):
    """The two tests above can fail: a package whose b imports a inside a function while a imports
    b at its top is reported twice."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("from . import b\nx = 1\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n    return x\n")
    graph, hidden = _graph(pkg)
    assert hidden == ["pkg/b.py:2 pkg.a"]
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}


def test_no_gpt_spec_module_is_over_max_lines():
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules(PACKAGE).items()}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_gpt_spec_loads_no_framework():
    """gpt_spec is framework-free: every module imported, and no torch, JAX or Flax came with them
    (reading a `.pth` imports torch then, and only then)."""
    names = sorted(_modules(PACKAGE))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_the_public_surface_is_small_importable_and_documented():
    """`gpt_spec.__all__` is what a user needs; everything else is imported from its own module.
    Each name is there, listed in the package's docstring, and (a function or class) documents itself."""
    assert len(gpt_spec.__all__) <= MAX_PUBLIC
    assert len(set(gpt_spec.__all__)) == len(gpt_spec.__all__)
    doc = gpt_spec.__doc__ or ""
    for name in gpt_spec.__all__:
        value = getattr(gpt_spec, name)
        assert f"`{name}`" in doc, f"{name} is not described in gpt_spec's docstring"
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{name} has no docstring"
    exec(f"from gpt_spec import {', '.join(gpt_spec.__all__)}", {})
    star = dict[str, object]()
    exec("from gpt_spec import *", star)
    assert set(star) - {"__builtins__"} == set(gpt_spec.__all__)


def test_every_gpt_spec_module_lists_what_it_exports():
    """Each module's `__all__` names only what it has, so `from gpt_spec.X import *` and the
    docs' references resolve."""
    for name in _modules(PACKAGE):
        module = importlib.import_module(name)
        for exported in getattr(module, "__all__", ()):
            assert hasattr(module, exported), f"{name}.__all__ names {exported!r}, which it does not have"
