"""Typed YAML configs with dotted-key overrides, shared by precompute and train.

Every component config is a pydantic model with ``extra="forbid"``; loading turns pydantic's
errors into one :class:`ConfigError` whose lines each name the dotted key, what was expected and
what was found, and lists the valid names for an unknown key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from kdcache.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment,
    and NaN or infinite numbers are refused wherever a float is expected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    try:
        value = _acyclic(yaml.safe_load(raw)) if raw != "" else ""
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"{key}: the override value {raw!r} is not valid YAML ({_yaml_reason(exc)})"
        ) from None
    return key.split("."), _number_or(value)


def _yaml_reason(exc: Exception) -> str:
    """One line: PyYAML's problem (its messages span several lines), or the constructor's error
    (``2020-13-01`` reads as a date and fails with a ValueError, not a YAMLError)."""
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if problem:
        return f"{context}: {problem}" if context else str(problem)
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _acyclic(value: Any) -> Any:
    """Refuse values that contain themselves (YAML anchors: ``&a [*a]``)."""
    try:
        json.dumps(value, default=str)
    except ValueError as exc:
        if "ircular" in str(exc):
            raise ValueError(
                "the value refers to itself (a YAML alias inside its own anchor)"
            ) from None
    except RecursionError:
        raise ValueError("the value is nested too deeply") from None
    return value


def _number_or(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string; read it as the number users mean."""
    if isinstance(value, str) and any(ch.isdigit() for ch in value):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``dotted.key=value`` in a nested dict (lists are indexed by number)."""
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            node = _child(node, part, path[: depth + 1])
        _assign(node, path[-1], value, path)
    return data


def _child(node: Any, part: str, where: list[str]) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"{'.'.join(where[:-1])}: is not a mapping, cannot set {part!r}")
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def _assign(node: Any, part: str, value: Any, path: list[str]) -> None:
    if isinstance(node, list):
        node[_list_index(node, part, path)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError(f"{'.'.join(path[:-1])}: is not a mapping, cannot set {part!r}")


def _list_index(node: list, part: str, where: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(
            f"{'.'.join(where)}: expected a list index below {len(node)}, found {part!r}"
        )
    return int(part)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = _acyclic(yaml.safe_load(path.read_text())) or {}
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r}: expected a mapping at the top, found {type(data).__name__}"
        )
    return data


BASE_KEY = "base"
"""A config's key naming the config(s) it builds on."""


def read_config(path: str | Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config with its bases merged in.

    ``base: other.yaml`` (or a list of files, merged in order) names configs this one builds on;
    a relative name is resolved against the folder of the file that says it, not the working
    directory. This file's keys win over its bases': mappings merge key by key, any other value
    (lists included, e.g. ``stages``) replaces the base's. A file that includes itself, directly
    or through its bases, is refused, naming the chain."""
    path = Path(path)
    here = path.resolve()
    if here in _including:
        chain = " -> ".join(str(p) for p in (*_including[_including.index(here) :], here))
        raise ConfigError(f"config {str(path)!r}: base configs form a cycle: {chain}")
    data = read_yaml(path)
    if BASE_KEY not in data:
        return data
    merged: dict[str, Any] = {}
    for name in _base_names(path, data.pop(BASE_KEY)):
        base = Path(name) if Path(name).is_absolute() else path.parent / name
        if base.is_dir():
            raise ConfigError(
                f"config {str(path)!r}: base {name!r} is a directory ({str(base)!r}), not a "
                "config file: name the YAML file in it, e.g. base: student_base.yaml"
            )
        if not base.is_file():
            raise ConfigError(
                f"config {str(path)!r}: base {name!r} does not exist (looked for {str(base)!r})"
            )
        merged = merge_configs(merged, read_config(base, (*_including, here)))
    return merge_configs(merged, data)


def _base_names(path: Path, value: Any) -> list[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"config {str(path)!r}: base: expected a file name or a list of file names, "
            f"found {value!r}"
        )
    return names


def merge_configs(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``: nested mappings merged key by key, other values replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_configs(out[key], value)
        else:
            out[key] = value
    return out


def validate(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    """Validate ``data`` as ``model``, raising one ConfigError that lists every bad dotted key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [line for err in exc.errors() for line in _lines(model, err)]
        raise ConfigError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def load_config(model: type[M], path: str | Path, overrides: list[str] | None = None) -> M:
    """Read YAML (its ``base`` configs merged in), apply ``dotted.key=value`` overrides,
    validate."""
    data = apply_overrides(read_config(path), list(overrides or []))
    return validate(model, data, source=f"config {str(path)!r}")


def _lines(model: type[BaseModel], err: ErrorDetails) -> list[str]:
    """The lines of one pydantic error. A model-level error (a cross-field rule; empty location)
    is its message as it stands, one line per problem, each naming its own keys; pydantic's
    ``Value error, `` prefix is dropped."""
    if err["loc"]:
        return [_describe(model, err)]
    message = err["msg"].removeprefix("Value error, ")
    return [line.strip() for line in message.splitlines() if line.strip()]


def _describe(model: type[BaseModel], err: ErrorDetails) -> str:
    parts, models = _walk(model, tuple(err["loc"][:-1]))
    last = err["loc"][-1:] if err["loc"] else ()
    if last and isinstance(last[0], str) and any(_is_tagged(m, last[0]) for m in models):
        last = ()  # an error of a union member as a whole (its model validator): name the union
    key = ".".join(str(p) for p in (*parts, *last))
    if err["type"] == "extra_forbidden":
        valid = sorted({name for m in models for name in m.model_fields})
        return f"{key}: unknown key; valid keys here: {', '.join(valid)}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    if "storage_options" in (*parts, *last):  # may hold credentials: never echo the value
        return f"{key}: {err['msg']} (found a value of type {type(err.get('input')).__name__})"
    return f"{key}: {err['msg']} (found {err.get('input')!r})"


def _walk(model: type[BaseModel], loc: tuple) -> tuple[list[Any], list[type[BaseModel]]]:
    """The user-facing key parts of ``loc`` (union tags dropped) and the models found there."""
    parts: list[Any] = []
    models: list[type[BaseModel]] = [model]
    for part in loc:
        if isinstance(part, int):
            parts.append(part)
            continue
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        if field is not None:
            parts.append(part)
            models = _models_in(field.annotation)
            continue
        tagged = [m for m in models if _is_tagged(m, part)]
        if tagged:  # pydantic puts a discriminated union's tag in the location
            models = tagged
        else:
            parts.append(part)
            models = []
    return parts, models


def _is_tagged(model: type[BaseModel], tag: str) -> bool:
    """Whether ``tag`` names ``model`` in a union: a Literal of one of its fields, or the
    ``union_tag`` it declares (a member chosen by a discriminator function)."""
    if getattr(model, "union_tag", None) == tag:
        return True
    return any(
        tag in getattr(f.annotation, "__args__", ())
        for f in model.model_fields.values()
        if getattr(f.annotation, "__origin__", None) is Literal
    )


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in (getattr(annotation, "__args__", ()) or ()) for m in _models_in(arg)]


REDACTED = "<redacted>"


def dump_config(config: BaseModel) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (saved beside outputs and in the cache), with the
    values of every ``storage_options`` mapping (credentials) replaced by ``<redacted>``."""
    return redact_storage_options(config.model_dump(mode="json"))


def redact_storage_options(data: Any) -> Any:
    """``data`` with each ``storage_options`` mapping's values replaced by ``<redacted>``
    (keys kept)."""
    if isinstance(data, dict):
        return {
            key: {name: REDACTED for name in value}
            if key == "storage_options" and isinstance(value, dict)
            else redact_storage_options(value)
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [redact_storage_options(value) for value in data]
    return data
