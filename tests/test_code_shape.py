"""The package's shape, checked like its behaviour (docs/design.md, "Architecture"):

- only the model-family registry looks at `arch`;
- inference/, hf/, adaptive/, models/, data/ and checkpoint/ stand without training/;
- config.py, the ground floor, imports no project module but its own field table;
- no module over 500 lines and no function over 100 without a one-line reason at its top (a function's may
  also stand first in its body).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "megatron_tempnet"
SOURCES = sorted([*PACKAGE.rglob("*.py"), *(REPO / "kernels").rglob("*.py")])
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 100
# The reason a long module or function gives for its length: a comment among its first lines.
REASON = re.compile(r"^\s*# Over (500|100) lines", re.MULTILINE)


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_only_the_registry_branches_on_arch():
    branch = re.compile(r"arch ==|arch !=|\.arch in")
    found = [f"{_relative(p)}:{i}" for p in PACKAGE.rglob("*.py") if p.name != "registry.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if branch.search(line)]
    assert not found, f"model-family branches outside models/registry.py: {found}"


def _project_imports(path: Path) -> list[str]:
    """Every module `path` imports from the package, as dotted names relative to megatron_tempnet."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(PACKAGE).parent.parts
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                target = ".".join(base + ([node.module] if node.module else []))
                names += [target] if node.module else [".".join(base + [a.name]) for a in node.names]
            elif node.module and node.module.startswith("megatron_tempnet"):
                names.append(node.module.removeprefix("megatron_tempnet").lstrip("."))
        elif isinstance(node, ast.Import):
            names += [a.name.removeprefix("megatron_tempnet").lstrip(".") for a in node.names
                      if a.name.startswith("megatron_tempnet")]
    return [n.strip(".") for n in names]


@pytest.mark.parametrize("layer", ["inference", "hf", "adaptive", "models", "data", "checkpoint"])
def test_layer_stands_without_training(layer):
    found = [f"{_relative(p)} imports {name}" for p in (PACKAGE / layer).rglob("*.py")
             for name in _project_imports(p) if name == "training" or name.startswith("training.")]
    assert not found, found


def test_config_imports_only_its_own_helpers():
    imported = set(_project_imports(PACKAGE / "config.py"))
    assert imported <= {"config_fields"}, f"config.py imports {sorted(imported - {'config_fields'})}"


def _has_reason(path: Path, limit: int) -> bool:
    """A '# Over <limit> lines: why' comment at the module's top: before its first import."""
    head = []
    for line in path.read_text().splitlines():
        if line.startswith(("import ", "from ")) and not line.startswith("from __future__"):
            break
        head.append(line)
    return any(m.group(1) == str(limit) for m in REASON.finditer("\n".join(head)))


def test_no_long_module_without_a_reason():
    long = [f"{_relative(p)} ({n} lines)" for p in SOURCES
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES and not _has_reason(p, MAX_MODULE_LINES)]
    assert not long, f"modules over {MAX_MODULE_LINES} lines with no '# Over 500 lines: why' at the top: {long}"


def test_no_long_function_without_a_reason():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                own = "\n".join(path.read_text().splitlines()[node.lineno - 1: node.body[0].end_lineno + 2])
                if n > MAX_FUNCTION_LINES and not REASON.search(own) and not _has_reason(path, MAX_FUNCTION_LINES):
                    long.append(f"{_relative(path)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines with no '# Over 100 lines: why' at its top: {long}"
