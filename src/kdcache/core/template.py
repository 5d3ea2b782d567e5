"""A config as commented YAML: every field of a typed config with its value, each preceded by
its docstring, so ``kdcache config`` prints templates that follow the models and never drift.

Field docstrings are read from the models' source (the string literal after each annotated
field, as the models document themselves); a field's value is the instance's (defaults filled).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from functools import cache
from typing import Any

import yaml
from pydantic import BaseModel

WIDTH = 96
"""Comment lines are wrapped to this many characters, indentation included."""


@cache
def field_docs(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> its docstring, over the model and its bases (nearest class wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(model.__mro__):
        if klass is BaseModel or not issubclass(klass, BaseModel):
            continue
        docs.update(_class_docs(klass))
    return docs


def _class_docs(klass: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):  # defined where no source is kept
        return {}
    klass_def = tree.body[0] if tree.body else None
    if not isinstance(klass_def, ast.ClassDef):  # the source of a class is its class statement
        return {}
    body = klass_def.body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)):
            continue
        doc = after.value.value
        if not isinstance(doc, str):
            continue
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            docs[node.target.id] = inspect.cleandoc(doc)
    return docs


def render(config: BaseModel, comments: bool = True, header: str = "") -> str:
    """``config`` as YAML that loads back to the same config; with ``comments`` each key is
    preceded by its field's docstring."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [""] if header else []
    lines += _model_lines(config, 0, comments)
    return "\n".join(lines) + "\n"


def _model_lines(config: BaseModel, indent: int, comments: bool) -> list[str]:
    docs = field_docs(type(config))
    dumped = config.model_dump(mode="json")
    pad = " " * indent
    lines: list[str] = []
    for name in type(config).model_fields:
        if comments and docs.get(name):
            lines += _comment(docs[name], pad)
        lines += _value_lines(name, getattr(config, name), dumped[name], indent, comments)
    return lines


def _value_lines(name: str, value: Any, dumped: Any, indent: int, comments: bool) -> list[str]:
    pad = " " * indent
    if isinstance(value, BaseModel):
        return [f"{pad}{name}:", *_model_lines(value, indent + 2, comments)]
    if isinstance(value, list | tuple) and value and all(isinstance(v, BaseModel) for v in value):
        lines = [f"{pad}{name}:"]
        for item in value:
            lines += [f"{pad}  -", *_model_lines(item, indent + 4, comments)]
        return lines
    return [f"{pad}{name}: {_scalar(dumped)}"]


def _scalar(value: Any) -> str:
    """One value in YAML flow style (strings quoted only where YAML needs it)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    return text.strip().removesuffix("...").strip()


def _comment(doc: str, pad: str) -> list[str]:
    width = max(40, WIDTH - len(pad) - 2)
    out = []
    for paragraph in doc.split("\n\n"):
        out += textwrap.wrap(" ".join(paragraph.split()), width) or [""]
    return [f"{pad}# {line}" for line in out]
