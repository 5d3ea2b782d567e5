"""The source checkout this kdcache runs from, for the commands that need one (demo, bench).

An editable install runs ``src/kdcache/`` in place, so the checkout is the folder above ``src``
that holds ``pyproject.toml``; an install from a wheel has none.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
"""``src/kdcache`` in a checkout, ``site-packages/kdcache`` in an installed wheel."""


def source_checkout() -> Path | None:
    """The repository root when kdcache runs from a src-layout checkout, else None."""
    src = PACKAGE.parent
    root = src.parent
    if src.name == "src" and (root / "pyproject.toml").is_file():
        return root
    return None
