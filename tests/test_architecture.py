"""The import graph: the engine never imports the front ends (issue: architecture).

Engine modules (everything outside ``lm``, ``cli``, ``demo``, ``evaluation`` and the
report) must not import those front ends, at module level or inside a function; the
language-model front end must not import the command line or the demo; only the
command line imports the demo.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "datasleuth"
FRONT_ENDS = ("datasleuth.lm", "datasleuth.cli", "datasleuth.demo", "datasleuth.evaluation",
              "datasleuth.report")


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` in the file refers to."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[_module(p) for p in MODULES])
def test_layers_of_the_package_import_only_downwards(path: Path) -> None:
    module = _module(path)
    imported = {n for n in _imports(path) if n.startswith("datasleuth")}
    if _within(module, ("datasleuth.cli", "datasleuth.__main__")):
        return  # the command line may use everything
    if _within(module, ("datasleuth.demo",)):
        forbidden: tuple[str, ...] = ("datasleuth.cli",)
    elif _within(module, ("datasleuth.lm", "datasleuth.evaluation", "datasleuth.report")):
        forbidden = ("datasleuth.cli", "datasleuth.demo")
    else:
        forbidden = FRONT_ENDS
    bad = sorted(n for n in imported if _within(n, forbidden))
    assert not bad, f"{module} imports {bad}"


def test_importing_the_engine_loads_no_front_end() -> None:
    code = ("import sys, datasleuth, datasleuth.scale, datasleuth.estimators; "
            "print(sorted(m for m in sys.modules if m.startswith(('datasleuth.lm', "
            "'datasleuth.cli', 'datasleuth.demo', 'datasleuth.evaluation'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(SRC.parent)})
    assert out.stdout.strip() == "[]", out.stdout
