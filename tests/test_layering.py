"""The import layering of the kdcache namespace, checked on the source, string imports included.

``kdcache.pipeline`` (write) and ``kdcache.train`` (read) build on the cache contract (the
modules of ``cache_tools/``, the package root) and never on each other; the contract and its
tools import neither half; nothing below the command line imports ``kdcache.cli``; nothing
imports the folders by their old top-level names; the CLI imports its commands directly.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {
    "kdcache": REPO / "cache_tools",
    "kdcache.pipeline": REPO / "pipeline",
    "kdcache.train": REPO / "train",
}
FORBIDDEN = {
    "contract": ("kdcache.pipeline", "kdcache.train", "kdcache.cli"),
    "tools": ("kdcache.pipeline", "kdcache.train", "kdcache.cli"),
    "pipeline": ("kdcache.train", "kdcache.cli"),
    "train": ("kdcache.pipeline", "kdcache.cli"),
}
OLD_TOP_LEVEL = ("cache_tools", "pipeline", "train")
MODULE_NAME = re.compile(r"\bkdcache(?:\.\w+)+")


def layer_of(path: Path) -> str | None:
    """Which layer a source file belongs to (None: the CLI, the namespace root, __main__)."""
    parts = path.relative_to(REPO).parts
    if parts[0] in ("pipeline", "train"):
        return parts[0]
    if parts[1] == "cli" or parts[-1] in ("__init__.py", "__main__.py") and len(parts) == 2:
        return None
    return "tools" if parts[1] == "tools" else "contract"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    package = {"cache_tools": "kdcache", "pipeline": "kdcache.pipeline", "train": "kdcache.train"}
    name = ".".join((package[parts[0]], *parts[1:]))
    return name.removesuffix(".__init__")


def sources() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS.values() for p in d.rglob("*.py"))


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import statement, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            out.append((node.lineno, base))
    return out


def string_names(path: Path) -> list[tuple[int, str]]:
    """(line, module) for module names inside string constants that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            docstrings.add(id(first.value))
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            out += [(node.lineno, m.group(0)) for m in MODULE_NAME.finditer(node.value)]
    return out


def violations(path: Path) -> list[str]:
    layer = layer_of(path)
    where = path.relative_to(REPO)
    found = []
    for line, name in imported_names(path):
        if name.split(".")[0] in OLD_TOP_LEVEL:
            found.append(f"{where}:{line} imports the old top-level name {name!r}")
        if layer is not None and name.startswith("kdcache.cli"):
            found.append(f"{where}:{line} imports the command line ({name})")
        for banned in FORBIDDEN.get(layer, ()):
            if name == banned or name.startswith(banned + "."):
                found.append(f"{where}:{line} ({layer}) imports {name}")
    for line, name in string_names(path):
        for banned in FORBIDDEN.get(layer, ()):
            if name == banned or name.startswith(banned + "."):
                found.append(f"{where}:{line} ({layer}) names {name} in a string")
    return found


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_layering(path: Path) -> None:
    assert violations(path) == []


def test_the_checker_catches_a_violation(tmp_path) -> None:
    """The checker is not vacuous: a train module importing pipeline, by name or by string."""
    bad = REPO / "train" / "_layering_probe.py"
    bad.write_text(
        "import importlib\nfrom kdcache.pipeline import worker\n"
        "importlib.import_module('kdcache.pipeline.runner')\n"
    )
    try:
        found = violations(bad)
    finally:
        bad.unlink()
    assert len(found) == 3  # the import, its module, the string
    assert any("in a string" in f for f in found)


def test_the_cli_imports_its_commands_directly_and_nothing_edits_sys_path() -> None:
    cli = sorted((REPO / "cache_tools" / "cli").glob("*.py"))
    assert cli, "no CLI package"
    for path in cli:
        names = [name for _, name in imported_names(path)]
        assert "importlib" not in names, f"{path.name} imports importlib"
    for path in sources() + sorted((REPO / "benchmarks").glob("*.py")):
        assert "sys.path" not in path.read_text(), f"{path.relative_to(REPO)} edits sys.path"
