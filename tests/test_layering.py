"""The import layering of ``src/kdcache``, checked on the source, string imports included.

One rule per subpackage: each may import only the subpackages named for it in ``ALLOWED``
(itself always). The contract is layered ``core`` < ``views``, ``targets``, ``shards`` <
``cache`` < ``models``; the three parts of the product, ``pipeline`` (precompute), ``train`` and
``cache_tools`` (validate, verify, inspect), build on the contract and never on each other; only
``cli`` may import everything, and nothing imports it. The package root (``__init__``,
``__main__``) is the public front and may name any part.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "kdcache"
CONTRACT = ("core", "views", "targets", "shards", "cache", "models")
ALLOWED: dict[str, tuple[str, ...]] = {
    "core": (),
    "views": ("core",),
    "targets": ("core",),
    "shards": ("core",),
    "cache": ("core", "views", "targets"),
    "models": ("core", "views", "targets", "cache"),
    "pipeline": CONTRACT,
    "train": CONTRACT,
    "cache_tools": CONTRACT,
    "cli": (*CONTRACT, "pipeline", "train", "cache_tools"),
}
OLD_TOP_LEVEL = ("cache_tools", "pipeline", "train")
MODULE_NAME = re.compile(r"\bkdcache(?:\.\w+)+")


def subpackage_of(path: Path) -> str | None:
    """The subpackage a source file belongs to (None: the package root's own modules)."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


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


def target_subpackage(name: str) -> str | None:
    """``kdcache.cache.store.X`` -> ``cache``; None for names outside the subpackages."""
    parts = name.split(".")
    if parts[0] != "kdcache" or len(parts) < 2 or parts[1] not in ALLOWED:
        return None
    return parts[1]


def violations(path: Path) -> list[str]:
    own = subpackage_of(path)
    where = path.relative_to(REPO)
    found = []
    for line, name in imported_names(path):
        if name.split(".")[0] in OLD_TOP_LEVEL:
            found.append(f"{where}:{line} imports the old top-level name {name!r}")
    if own is None:
        return found
    named = [(line, name, "imports") for line, name in imported_names(path)]
    named += [(line, name, "names in a string") for line, name in string_names(path)]
    for line, name, how in named:
        target = target_subpackage(name)
        if target is None or target == own or target in ALLOWED[own]:
            continue
        found.append(f"{where}:{line} ({own}) {how} {name}")
    return found


def test_every_subpackage_has_a_rule() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(ALLOWED)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_layering(path: Path) -> None:
    assert violations(path) == []


@pytest.mark.parametrize(
    ("folder", "source", "expected"),
    [
        ("train", "from kdcache.pipeline import worker\n", 2),
        ("cache", "import kdcache.models.build\n", 1),
        ("views", "from kdcache.cache.store import RootMeta\n", 2),
        ("pipeline", "import importlib\nimportlib.import_module('kdcache.train.trainer')\n", 1),
        ("models", "from kdcache.cli import main\n", 2),
    ],
)
def test_the_checker_catches_a_violation(folder: str, source: str, expected: int) -> None:
    """The checker is not vacuous: one probe per kind of rule, by name or by string."""
    bad = PACKAGE / folder / "_layering_probe.py"
    bad.write_text(source)
    try:
        found = violations(bad)
    finally:
        bad.unlink()
    assert len(found) == expected, found


def test_the_checker_allows_what_the_rules_allow() -> None:
    probe = PACKAGE / "models" / "_layering_probe.py"
    probe.write_text("from kdcache.cache.store import RootMeta\nfrom kdcache.core import errors\n")
    try:
        assert violations(probe) == []
    finally:
        probe.unlink()


def test_the_cli_imports_its_commands_directly_and_nothing_edits_sys_path() -> None:
    cli = sorted((PACKAGE / "cli").glob("*.py"))
    assert cli, "no CLI package"
    for path in cli:
        names = [name for _, name in imported_names(path)]
        assert "importlib" not in names, f"{path.name} imports importlib"
    for path in sources() + sorted((REPO / "benchmarks").glob("*.py")):
        assert "sys.path" not in path.read_text(), f"{path.relative_to(REPO)} edits sys.path"
