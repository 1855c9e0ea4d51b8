"""DyCokeConfig: defaults, validation, derived values."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dycoke import ConfigError, DyCokeConfig


def test_defaults() -> None:
    cfg = DyCokeConfig()
    assert cfg.ttm_enabled is True and cfg.dp_enabled is True
    assert cfg.prune_ratio_k == 0.7
    assert cfg.ttm_mode == "reference"
    assert cfg.tokens_per_frame == 196
    assert cfg.dp_layer == 3
    assert cfg.dp_prune_ratio == 0.7
    assert cfg.dp_threshold == 0.9
    assert cfg.frame_keep == 58


@pytest.mark.parametrize("k,keep", [(0.7, 58), (0.5, 98), (0.3, 137), (0.0, 196)])
def test_frame_keep(k: float, keep: int) -> None:
    assert DyCokeConfig(prune_ratio_k=k).frame_keep == keep


def test_frozen() -> None:
    cfg = DyCokeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.prune_ratio_k = 0.5  # type: ignore[misc]


def test_off() -> None:
    cfg = DyCokeConfig.off()
    assert cfg.ttm_enabled is False and cfg.dp_enabled is False


def test_json_roundtrip() -> None:
    cfg = DyCokeConfig(prune_ratio_k=0.5, ttm_mode="complete", dp_prune_ratio=0.8)
    text = cfg.to_json()
    assert " " not in text
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert DyCokeConfig(**json.loads(text)) == cfg
    assert cfg.to_dict()["ttm_mode"] == "complete"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"prune_ratio_k": 1.2}, "prune_ratio_k"),
        ({"prune_ratio_k": 1.0}, "prune_ratio_k"),
        ({"prune_ratio_k": -0.1}, "prune_ratio_k"),
        ({"prune_ratio_k": float("nan")}, "prune_ratio_k"),
        ({"dp_layer": 0}, "dp_layer"),
        ({"dp_layer": -2}, "dp_layer"),
        ({"ttm_mode": "x"}, "ttm_mode"),
        ({"ttm_mode": 3}, "ttm_mode"),
        ({"tokens_per_frame": 0}, "tokens_per_frame"),
        ({"tokens_per_frame": 1.5}, "tokens_per_frame"),
        ({"dp_prune_ratio": 1.0}, "dp_prune_ratio"),
        ({"dp_prune_ratio": -0.5}, "dp_prune_ratio"),
        ({"dp_threshold": 1.5}, "dp_threshold"),
        ({"dp_threshold": float("nan")}, "dp_threshold"),
        # wrong types
        ({"prune_ratio_k": "0.7"}, "prune_ratio_k"),
        ({"prune_ratio_k": None}, "prune_ratio_k"),
        ({"prune_ratio_k": True}, "prune_ratio_k"),
        ({"dp_layer": "3"}, "dp_layer"),
        ({"dp_layer": 3.0}, "dp_layer"),
        ({"dp_layer": True}, "dp_layer"),
        ({"tokens_per_frame": 196.0}, "tokens_per_frame"),
        ({"ttm_enabled": "yes"}, "ttm_enabled"),
        ({"ttm_enabled": 1}, "ttm_enabled"),
        ({"dp_enabled": None}, "dp_enabled"),
        ({"dp_threshold": [0.9]}, "dp_threshold"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        DyCokeConfig(**kwargs)


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_several_problems_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        DyCokeConfig(prune_ratio_k=1.2, dp_layer=0)
    assert "prune_ratio_k" in str(info.value) and "dp_layer" in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prune_ratio_k": 0},
        {"prune_ratio_k": 0.99},
        {"dp_prune_ratio": 0.0},
        {"dp_threshold": -1.0},
        {"dp_threshold": 1},
        {"dp_layer": 1},
        {"tokens_per_frame": 1},
        {"ttm_mode": "complete"},
    ],
)
def test_boundary_values_accepted(kwargs: dict) -> None:
    DyCokeConfig(**kwargs)
