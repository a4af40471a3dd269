import tomllib
from pathlib import Path

import pytest

from shared.config import ConfigError, RunConfig, from_flat, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_the_config_defaults():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == RunConfig().to_flat()


def test_config_files_parse():
    for path in (ROOT / "configs").glob("*.toml"):
        load_config(path)
    assert load_config(ROOT / "configs" / "default.toml") == RunConfig()


def test_strings_are_coerced_and_bad_values_named():
    cfg = from_flat({"num-rounds": "5", "dp": "both", "private-user-vector": "false", "delta": "1e-6"})
    assert (cfg.num_rounds, cfg.dp, cfg.private_user_vector, cfg.delta) == (5, "both", False, 1e-6)
    assert from_flat({"id-embeddings": True}).use_id_embeddings
    assert not RunConfig(dp="record").use_id_embeddings and RunConfig(dp="none").use_id_embeddings
    with pytest.raises(ConfigError, match="num-round"):
        from_flat({"num-round": 3})
    with pytest.raises(ConfigError, match="dp = 'sometimes'"):
        from_flat({"dp": "sometimes"})
    with pytest.raises(ConfigError, match="noise-multiplier"):
        from_flat({"dp": "record", "noise-multiplier": 0.0})
    with pytest.raises(ConfigError, match="expected an integer"):
        from_flat({"num-rounds": "many"})
