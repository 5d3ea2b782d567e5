"""The public names of ``kdcache``: what type checkers see (the ``TYPE_CHECKING`` imports) is
what ``__all__`` lists and what the lazy look-up loads, and ``import kdcache`` stays light."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import kdcache

INIT = Path(kdcache.__file__)


def type_checking_imports() -> dict[str, str]:
    """name -> module of the imports under ``if TYPE_CHECKING:`` in ``kdcache/__init__.py``."""
    tree = ast.parse(INIT.read_text())
    blocks = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    ]
    assert len(blocks) == 1, "expected one `if TYPE_CHECKING:` block"
    out = {}
    for node in blocks[0].body:
        assert isinstance(node, ast.ImportFrom) and node.module is not None
        for alias in node.names:
            assert alias.asname is None, f"{alias.name} is imported under another name"
            out[alias.name] = node.module
    return out


def test_the_type_checking_names_are_all_of_all():
    seen = type_checking_imports()
    assert sorted(seen) == sorted(set(kdcache.__all__) - {"__version__"})
    assert len(kdcache.__all__) == len(set(kdcache.__all__))


def test_each_name_comes_from_the_module_the_lazy_look_up_uses():
    seen = type_checking_imports()
    assert seen == kdcache._WHERE
    for name, module in seen.items():
        assert getattr(kdcache, name) is getattr(importlib.import_module(module), name)


def test_import_kdcache_loads_no_heavy_library():
    code = "import sys, kdcache; print(sorted({'torch', 'zarr', 'ray'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
