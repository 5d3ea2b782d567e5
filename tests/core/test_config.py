"""Typed configs: dotted overrides, and rejections that name the dotted key."""

from __future__ import annotations

import pytest
import yaml
from pydantic import Field, model_validator

from kdcache.cli.verify import parse_storage_options
from kdcache.core.config import REDACTED, StrictModel, apply_overrides, dump_config, load_config
from kdcache.core.errors import ConfigError
from kdcache.pipeline.config import PrecomputeConfig
from kdcache.train.config import TrainConfig, config_differences


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
        (
            "path: a\ninner: {sise: 3}\n",
            [],
            r"inner.sise: unknown key; valid keys here: name, size",
        ),
        ("inner: {size: 3}\n", [], r"path: required key is missing"),
        (
            "path: a\n",
            ["inner.size=0"],
            r"inner.size: Input should be greater than or equal to 1 \(found 0\)",
        ),
        ("path: a\n", ["inner.size=big"], r"inner.size: Input should be a valid integer"),
        (
            "path: a\nitems: [{size: 1}]\n",
            ["items.3.size=2"],
            r"items.3: expected a list index below 1",
        ),
        ("path: a\n", ["novalue"], r"override 'novalue': expected dotted.key=value"),
        ("- 1\n- 2\n", [], r"expected a mapping at the top"),
        ("path: [a\n", [], r"is not valid YAML"),
    ],
)
def test_rejections_name_the_dotted_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Outer, write(tmp_path, text), overrides)


class Ranged(StrictModel):
    low: int = 0
    high: int = 1

    @model_validator(mode="after")
    def _ordered(self) -> Ranged:
        if self.low >= self.high:
            raise ValueError(
                f"low: {self.low} is not below high\n  high: {self.high} is not above low"
            )
        return self


def test_a_rule_between_keys_reads_as_its_own_lines(tmp_path):
    """A model-level error has no location: its lines name their keys, with no '<top>' or
    pydantic's 'Value error,' in front."""
    with pytest.raises(ConfigError) as info:
        load_config(Ranged, write(tmp_path, "low: 3\nhigh: 2\n"))
    assert str(info.value).splitlines()[1:] == [
        "  low: 3 is not below high",
        "  high: 2 is not above low",
    ]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


# ---- storage options -----------------------------------------------------------------------------


PRECOMPUTE = {
    "data": {"shards": "x-{000000..000001}.tar", "num_classes": 4},
    "cache": {"path": "/tmp/c"},
    "teachers": [{"name": "t1", "model": {"name": "kd_cnn_tiny"}, "k": 2}],
}
TRAIN = {
    "data": {"shards": "x-000000.tar"},
    "cache": {"path": "/tmp/c"},
    "student": {"name": "kd_mlp"},
    "stages": [{"epochs": 1, "loss": {"name": "ce"}}],
}


@pytest.mark.parametrize(
    "model, base",
    [(PrecomputeConfig, PRECOMPUTE), (TrainConfig, TRAIN)],
    ids=["precompute", "train"],
)
@pytest.mark.parametrize("value", ["key=AKIA-secret", ["secret"], 3])
def test_data_storage_options_must_be_a_mapping(tmp_path, model, base, value):
    path = write(
        tmp_path, yaml.safe_dump({**base, "data": {**base["data"], "storage_options": value}})
    )
    with pytest.raises(
        ConfigError,
        match=r"data\.storage_options: Input should be a valid dictionary "
        r"\(found a value of type \w+\)",
    ) as err:
        load_config(model, path)
    assert "secret" not in str(err.value)  # the value is never echoed: it may hold credentials
    options = load_config(
        model,
        path,
        ["data.storage_options={endpoint_url: 'http://127.0.0.1:9000', secret: s3cr3t}"],
    )
    assert options.data.storage_options == {
        "endpoint_url": "http://127.0.0.1:9000",
        "secret": "s3cr3t",
    }


def test_storage_options_are_saved_redacted_and_may_change_on_resume():
    config = TrainConfig.model_validate(
        {
            **TRAIN,
            "data": {**TRAIN["data"], "storage_options": {"key": "k1", "secret": "s1"}},
            "cache": {"path": "/tmp/c", "storage_options": {"client_kwargs": {"x": 1}}},
        }
    )
    saved = dump_config(config)
    assert saved["data"]["storage_options"] == {"key": REDACTED, "secret": REDACTED}
    assert saved["cache"]["storage_options"] == {"client_kwargs": REDACTED}
    assert config.data.storage_options["secret"] == "s1"  # the config itself keeps them
    rotated = config.model_copy(
        update={"data": config.data.model_copy(update={"storage_options": {"token": "t2"}})}
    )
    assert config_differences(saved, dump_config(rotated)) == []
    assert config_differences(saved, dump_config(rotated), ignore=()) == [
        "data.storage_options.key: checkpoint '<redacted>' vs now '<absent>'",
        "data.storage_options.secret: checkpoint '<redacted>' vs now '<absent>'",
        "data.storage_options.token: checkpoint '<absent>' vs now '<redacted>'",
    ]


def test_verify_storage_option_flags_nest_and_never_echo_values():
    assert parse_storage_options(
        ["endpoint_url=http://h:9000", "anon=false", "client_kwargs.region_name=eu-1", "key=a=b"]
    ) == {
        "endpoint_url": "http://h:9000",
        "anon": False,
        "client_kwargs": {"region_name": "eu-1"},
        "key": "a=b",
    }
    with pytest.raises(ConfigError, match="without '='") as err:
        parse_storage_options(["s3cr3t"])
    assert "s3cr3t" not in str(err.value)
    with pytest.raises(ConfigError, match=r"key 'a\.\.b' with an empty part"):
        parse_storage_options(["a..b=1"])


def test_the_lock_records_the_command_without_storage_option_values():
    from kdcache.cache.lock import redacted_command

    argv = [
        "kdcache",
        "precompute",
        "p.yaml",
        "cache.storage_options.secret=TOPSECRET",
        "ray.num_actors=2",
        "data.storage_options={key: K, secret: S}",
    ]
    command = redacted_command(argv)
    assert "TOPSECRET" not in command and "secret: S" not in command
    assert command == (
        "kdcache precompute p.yaml cache.storage_options.secret=<redacted> ray.num_actors=2 "
        "data.storage_options=<redacted>"
    )
