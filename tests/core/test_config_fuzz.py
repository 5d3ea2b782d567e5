"""Property-based tests: random and wrong values thrown at the precompute and train configs.

Random types at random dotted keys, unknown keys, non-finite and out-of-range numbers, and YAML-ish
strings through the ``dotted.key=value`` override path. Every rejection must be a ConfigError whose
message names the dotted key (or, for a rule between keys or a whole sub-model, its section);
nothing may end in another exception type. Deterministic (``derandomize``) so CI is repeatable;
``KDCACHE_FUZZ_EXAMPLES=5000 pytest tests/core/test_config_fuzz.py`` explores with random
seeds.
"""

from __future__ import annotations

import copy
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from kdcache.core.config import load_config, validate
from kdcache.core.errors import ConfigError
from kdcache.pipeline.config import PrecomputeConfig
from kdcache.train.config import TrainConfig

EXPLORE = os.environ.get("KDCACHE_FUZZ_EXAMPLES")
"""Set (e.g. ``KDCACHE_FUZZ_EXAMPLES=5000``) to explore with random seeds instead of the fixed CI
sample."""
FUZZ = settings(
    max_examples=int(EXPLORE or 120),
    deadline=None,
    derandomize=not EXPLORE,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

PRECOMPUTE = {
    "data": {"shards": "x-{000000..000001}.tar", "num_classes": 10, "on_error": "raise"},
    "cache": {"path": "/tmp/c", "num_views": 2, "recipe": {"size": 16, "scale": [0.3, 1.0]}},
    "teachers": [{"name": "t1", "model": {"name": "kd_cnn_tiny"}, "k": 5}],
    "ray": {"num_actors": 2},
    "runtime": {"batch_size": 32},
}
TRAIN = {
    "run": {"dir": "/tmp/run", "log_every": 2},
    "data": {"shards": ["a-000000.tar"], "batch_size": 8, "num_workers": 0},
    "cache": {"path": "/tmp/c"},
    "student": {"name": "kd_mlp", "kwargs": {"hidden": 16}},
    "teacher": {"mode": "cache", "name": "tiny"},
    "optimizer": {"lr": 0.1},
    "scheduler": {"name": "cosine"},
    "stages": [
        {"epochs": 1, "loss": {"name": "kd", "alpha": 0.5}},
        {
            "epochs": 1,
            "loss": {"name": "ce"},
            "optimizer": {"lr": 0.01},
            "scheduler": {"name": "constant"},
        },
    ],
    "ema": {"enabled": False},
}


# ---- the schemas' dotted keys --------------------------------------------------------------------


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) is dict:
        return []
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list or any(
        _is_list(a)
        for a in typing.get_args(annotation)
        if typing.get_origin(annotation) is not dict
    )


def schema_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every dotted key of a config model (sections, leaves, list item 0) -> its annotation."""
    out: dict[tuple[str, ...], Any] = {}
    for name, info in model.model_fields.items():
        key = prefix + (name,)
        out[key] = info.annotation
        inner = _models(info.annotation)
        if inner and _is_list(info.annotation):
            key += ("0",)
        for sub in inner:
            out.update(schema_keys(sub, key))
    return out


KEYS = {"precompute": schema_keys(PrecomputeConfig), "train": schema_keys(TrainConfig)}
BASES = {"precompute": PRECOMPUTE, "train": TRAIN}


def _has_float(annotation: Any) -> bool:
    return annotation is float or any(_has_float(a) for a in typing.get_args(annotation))


def float_keys(which: str) -> list[tuple[str, ...]]:
    return sorted(
        k
        for k, a in KEYS[which].items()
        if _has_float(a) and not _models(a) and typing.get_origin(a) is not dict
    )


def check(which: str, data: dict[str, Any]) -> None:
    """Validate as the command would (the rules between keys included: the models hold them)."""
    validate(PrecomputeConfig if which == "precompute" else TrainConfig, data)


def set_key(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set ``path`` in ``data``, making the sections on the way (a list of one item where the
    next part is an index: ``teachers.0.ensemble.members.0.model`` in a config without one)."""
    node: Any = data
    for part, after in zip(path[:-1], path[1:], strict=True):
        if isinstance(node, list):
            node = node[int(part)]
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = [{}] if after.isdigit() else {}
            node = node[part]
    if isinstance(node, list):
        node[int(path[-1])] = value
    else:
        node[path[-1]] = value


def names_key(message: str, path: tuple[str, ...], which: str) -> bool:
    """The message names the key, its deepest schema ancestor, or (rules between keys, sub-model
    checks) that ancestor's section."""
    keys = KEYS[which]
    anchor = max(
        (path[:i] for i in range(1, len(path) + 1) if path[:i] in keys), key=len, default=path[:1]
    )
    candidates = {".".join(path), ".".join(anchor)}
    if len(anchor) > 1:
        candidates.add(".".join(anchor[:-1]))
    # a key below a list the config lacks (teachers.0.ensemble.members.0.model): the override
    # makes a mapping where the list belongs, and the message names that list
    candidates |= {
        ".".join(path[:i]) for i in range(1, len(path)) if _is_list(keys.get(path[:i], None))
    }
    return any(
        re.search(rf"(^|[\s('\[]){re.escape(c)}(?=[.:\s)='\],]|$)", message) for c in candidates
    )


def rejected_properly(which: str, data: dict[str, Any], path: tuple[str, ...]) -> str | None:
    """None if the config is accepted; the message if it is rejected as it should be."""
    try:
        check(which, data)
    except ConfigError as exc:
        assert names_key(str(exc), path, which), f"{'.'.join(path)} not named in: {exc}"
        return str(exc)
    return None


# ---- strategies ----------------------------------------------------------------------------------


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            "0",
            "-1",
            "1e-3",
            "nan",
            "raise",
            "skip",
            "cache",
            "kd",
            "auto",
            "cpu",
            "x-{000000..000001}.tar",
        ]
    ),
)
TRICKY_YAML = st.sampled_from(
    [  # values PyYAML turns into exceptions other than YAMLError, or into odd types
        "2020-13-45",
        "2001-02-30 25:00:00",
        "!!float abc",
        "!!int 1.5",
        "!!timestamp 2020-99-99",
        "&a [*a]",
        "&a {x: *a}",
        "!!set {a}",
        "!!binary aGk=",
        "1:20",
        ".inf",
        "-.inf",
        ".nan",
        "0x1F",
        "1e999",
        "~",
        "[",
        "{a: 1",
        "'",
        "!x y",
    ]
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
YAMLISH = st.text(
    alphabet=st.sampled_from(list("ab019 .-_:,[]{}'\"!&*#|>?%@=\\\t\nxyz")), max_size=16
)
NAME = st.text(
    alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyz_0123456789")), min_size=1, max_size=10
)


def known_key(which: str) -> st.SearchStrategy[tuple[str, ...]]:
    return st.sampled_from(sorted(KEYS[which]))


# ---- properties ----------------------------------------------------------------------------------


@FUZZ
@given(which=st.sampled_from(["precompute", "train"]), data=st.data())
def test_random_values_at_known_keys_are_accepted_or_rejected_naming_the_key(which, data):
    path = data.draw(known_key(which), label="key")
    value = data.draw(VALUES, label="value")
    config = copy.deepcopy(BASES[which])
    set_key(config, path, value)
    rejected_properly(which, config, path)


@FUZZ
@given(which=st.sampled_from(["precompute", "train"]), data=st.data())
def test_unknown_keys_are_rejected_naming_the_dotted_key(which, data):
    keys = KEYS[which]
    sections = sorted({key[:-1] for key in keys})
    parent = data.draw(st.sampled_from(sections), label="section")
    name = data.draw(
        NAME.filter(lambda n: parent + (n,) not in keys and not n.isdigit()), label="name"
    )
    config = copy.deepcopy(BASES[which])
    set_key(config, parent + (name,), data.draw(SCALARS, label="value"))
    message = rejected_properly(which, config, parent + (name,))
    assert (
        message is not None
        and f"{'.'.join(parent + (name,))}: unknown key; valid keys here: " in message
    )


@FUZZ
@given(which=st.sampled_from(["precompute", "train"]), data=st.data())
def test_non_finite_numbers_are_rejected_naming_the_key(which, data):
    path = data.draw(st.sampled_from(float_keys(which)), label="key")
    value = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]), label="value")
    config = copy.deepcopy(BASES[which])
    set_key(
        config,
        path,
        [value, value] if path[-1] in ("scale", "ratio", "betas", "mean", "std") else value,
    )
    assert rejected_properly(which, config, path) is not None, (
        f"{'.'.join(path)}={value} was accepted"
    )


@FUZZ
@given(which=st.sampled_from(["precompute", "train"]), data=st.data())
def test_yamlish_overrides_are_accepted_or_rejected_naming_the_key(tmp_path_factory, which, data):
    path = data.draw(
        st.one_of(known_key(which), st.lists(NAME, min_size=1, max_size=3).map(tuple)), label="key"
    )
    raw = data.draw(
        st.one_of(
            YAMLISH,
            TRICKY_YAML,
            VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
        ),
        label="raw",
    )
    file = Path(tmp_path_factory.getbasetemp()) / f"{which}.yaml"
    file.write_text(yaml.safe_dump(BASES[which]))
    model = PrecomputeConfig if which == "precompute" else TrainConfig
    try:
        load_config(model, file, [f"{'.'.join(path)}={raw}"])
    except ConfigError as exc:
        assert names_key(str(exc), path, which), f"{'.'.join(path)} not named in: {exc}"


@FUZZ
@given(item=st.text(max_size=24))
def test_arbitrary_override_strings_fail_only_with_config_errors(tmp_path_factory, item):
    file = Path(tmp_path_factory.getbasetemp()) / "precompute.yaml"
    file.write_text(yaml.safe_dump(PRECOMPUTE))
    try:
        load_config(PrecomputeConfig, file, [item])
    except ConfigError as exc:
        assert str(exc).strip()


def test_the_fuzzed_schemas_cover_the_configs():
    assert ("cache", "recipe", "scale") in KEYS["precompute"] and (
        "teachers",
        "0",
        "model",
        "name",
    ) in KEYS["precompute"]
    assert ("stages", "0", "loss", "temperature") in KEYS["train"] and (
        "stages",
        "0",
        "optimizer",
        "lr",
    ) in KEYS["train"]
    assert len(float_keys("train")) > 15 and ("runtime",) not in float_keys("precompute")
    for which in BASES:
        check(which, copy.deepcopy(BASES[which]))  # the bases themselves are valid
