"""The house rules of the layout, read from the source: what each package may import (DESIGN.md's
table), no import cycle between modules, and no test inside an installed package."""

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("gpt_spec", "gpt_torch", "gpt_flax", "parity_tests", "parity_cli", "parity_bench")
# What each package must never import (top-level names), anywhere in it.
FORBIDDEN = {
    "gpt_spec": {
        "torch",
        "jax",
        "flax",
        "optax",
        "gpt_torch",
        "gpt_flax",
        "parity_tests",
        "parity_cli",
        "parity_bench",
    },
    "gpt_torch": {"jax", "flax", "optax", "gpt_flax", "parity_tests", "parity_cli", "parity_bench"},
    "gpt_flax": {"torch", "gpt_torch", "parity_tests", "parity_cli", "parity_bench"},
    "parity_tests": {"argparse", "rich", "matplotlib", "parity_cli", "parity_bench"},
    "parity_bench": {"argparse", "rich", "matplotlib", "parity_cli"},
    "parity_cli": set(),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, *, top_level: bool = False) -> set[str]:
    """Every module `path` imports, at any depth of its code or at its top level only, resolved to
    absolute names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_the_design_allows(package):
    """At module level: where a function needs more (gpt_spec reading the book's torch.save files
    needs torch's unpickler), it imports it when called, so importing the package never does."""
    bad = {
        (name, imported)
        for name, path in _modules().items()
        if name.split(".")[0] == package
        for imported in _imports(name, path, top_level=True)
        if imported.split(".")[0] in FORBIDDEN[package]
    }
    assert not bad, sorted(bad)


@pytest.mark.subprocess
@pytest.mark.parametrize("package", ["gpt_torch", "gpt_flax"])  # gpt_spec: tests/gpt_spec/test_modules.py
def test_importing_a_package_loads_no_framework_it_does_not_need(package):
    frameworks = sorted(m for m in FORBIDDEN[package] if m in ("torch", "jax", "flax"))
    code = f"import sys, {package}; print(sorted(m for m in {frameworks!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]", out


def test_no_module_imports_itself_through_others():
    modules = _modules()
    # A module's own packages are imported before it, never through it: no edge to them.
    graph = {
        name: {m for m in _imports(name, path) if m in modules and m != name and not name.startswith(m + ".")}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [name, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_installed_packages_hold_no_tests():
    tests = [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("test_*.py")]
    assert tests == []


def _distributions(requirements: list[str], extras: dict[str, list[str]]) -> set[str]:
    """The import names of the distributions `requirements` name, this project's extras expanded."""
    names = set()
    for req in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)  # type: ignore[union-attr]
        if name == "gpt-twins":
            for extra in re.search(r"\[(.*)\]", req).group(1).split(","):  # type: ignore[union-attr]
                names |= _distributions(extras[extra.strip()], extras)
        else:
            names.add(name.replace("-", "_").lower())
    return names


def _third_party(package: str) -> set[str]:
    roots = set()
    for name, path in _modules().items():
        if name.split(".")[0] == package:
            roots |= {m.split(".")[0] for m in _imports(name, path)}
    roots = {ALIASES.get(r, r) for r in roots}
    return roots - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"}


ALIASES = {"tiktoken_ext": "tiktoken", "orbax": "orbax_checkpoint"}  # tiktoken_ext: a namespace tiktoken installs
# Imported only inside the function that needs it, and refused in one line where it is missing:
# gpt_spec reads the book's torch.save files with torch's own unpickler; parity_tests runs an HF
# candidate (diagnose --hf) in transformers, which the dev extra installs.
OPTIONAL = {"gpt_spec": {"torch"}, "parity_tests": {"transformers"}}


def test_the_extras_install_what_each_package_imports_and_nothing_else():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    core = _distributions(project["dependencies"], extras)
    needs = {
        "gpt_spec": core,
        "gpt_torch": core | _distributions(extras["torch"], extras),
        "gpt_flax": core | _distributions(extras["flax"], extras),
        **{p: core | _distributions(extras["parity"], extras) for p in ("parity_tests", "parity_cli", "parity_bench")},
    }
    for package, allowed in needs.items():
        missing = _third_party(package) - allowed - OPTIONAL.get(package, set())
        assert not missing, f"{package} imports {sorted(missing)}, which its extra does not install"
    assert _distributions(extras["torch"], extras) <= _third_party("gpt_torch")
    assert _distributions(extras["flax"], extras) <= _third_party("gpt_flax")
    assert {"rich", "matplotlib"} <= _third_party("parity_cli")


MAX_LINES = 500


def test_a_module_over_max_lines_says_at_its_top_why():
    long = {
        name: path
        for name, path in _modules().items()
        if len(path.read_text(encoding="utf-8").splitlines()) > MAX_LINES
    }
    unexplained = [
        name
        for name, path in long.items()
        if "Long on purpose:" not in (ast.get_docstring(ast.parse(path.read_text())) or "")
    ]
    assert unexplained == []
