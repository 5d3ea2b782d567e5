"""Typed configs: dotted overrides, and rejections that name the dotted key."""

from __future__ import annotations

import pytest
from pydantic import Field

from cache_tools.config import StrictModel, apply_overrides, load_config
from cache_tools.errors import ConfigError


class Inner(StrictModel):
    size: int = Field(8, ge=1)
    name: str = "x"


class Outer(StrictModel):
    inner: Inner = Inner()
    items: list[Inner] = []
    path: str


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_overrides_set_nested_keys_and_list_items(tmp_path):
    path = write(tmp_path, "path: a\nitems:\n  - {size: 2}\n")
    cfg = load_config(Outer, path, ["inner.size=5", "items.0.name=y", "path=b"])
    assert cfg.inner.size == 5 and cfg.items[0].name == "y" and cfg.path == "b"


def test_override_values_are_parsed_as_yaml():
    data = apply_overrides({}, ["a.b=[1, 2]", "c=true", "d=null", "e=1e-3"])
    assert data == {"a": {"b": [1, 2]}, "c": True, "d": None, "e": 1e-3}


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("path: a\ninner: {sise: 3}\n", [], r"inner.sise: unknown key; valid keys here: name, size"),
        ("inner: {size: 3}\n", [], r"path: required key is missing"),
        ("path: a\n", ["inner.size=0"], r"inner.size: Input should be greater than or equal to 1 \(found 0\)"),
        ("path: a\n", ["inner.size=big"], r"inner.size: Input should be a valid integer"),
        ("path: a\nitems: [{size: 1}]\n", ["items.3.size=2"], r"items.3: expected a list index below 1"),
        ("path: a\n", ["novalue"], r"override 'novalue': expected dotted.key=value"),
        ("- 1\n- 2\n", [], r"expected a mapping at the top"),
        ("path: [a\n", [], r"is not valid YAML"),
    ],
)
def test_rejections_name_the_dotted_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Outer, write(tmp_path, text), overrides)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
