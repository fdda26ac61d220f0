"""RunConfig's generic rules: every float finite, every number in its range, and a config file that is text."""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path

import pytest

from fedlearn.errors import ConfigError
from fedlearn.registry import settings
from fedlearn.run.config import RunConfig, bounds, load_config_file, max_threads

FIELD_TYPES = typing.get_type_hints(RunConfig)
FLOAT_FIELDS = sorted(name for name, hint in FIELD_TYPES.items() if float in (hint, *typing.get_args(hint)))
COMPONENT_FLOATS = sorted(key for key, s in settings().items() if float in (s.type, *typing.get_args(s.type)))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def test_the_float_settings_are_all_there() -> None:
    """The lists below are derived, not typed in: a new float field is covered without editing this file."""
    assert {"lr", "momentum", "weight_decay", "mu", "clip_norm", "noise_multiplier", "round_timeout", "alpha",
            "fraction", "min_fit_fraction", "client_test_fraction", "delta", "target_epsilon"} <= set(FLOAT_FIELDS)
    assert {"server_lr", "server_momentum", "server_beta1"} <= set(COMPONENT_FLOATS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_FIELDS + COMPONENT_FLOATS)
def test_every_float_setting_refuses_nan_and_inf(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"^{_flag(key)} must be a finite number; got -?(nan|inf)$"):
        RunConfig().updated({key: value}).validate()


def test_an_int_too_large_for_a_float_is_refused_as_a_float() -> None:
    with pytest.raises(ConfigError, match="--lr must be a finite number"):
        RunConfig().updated({"lr": 10**400}).validate()


@pytest.mark.parametrize(("changes", "message"), [
    ({"seed": -1}, re.escape("--seed must be an integer from 0 to 2**63 - 1; got -1")),
    ({"seed": 2**63}, "--seed must be a 64-bit integer"),
    ({"threads": max_threads() + 1}, re.escape(f"--threads must be an integer from 1 to {max_threads()} (4 x this "
                                               "machine's")),
    ({"threads": 0}, "--threads must be an integer from 1"),
    ({"clients": 10**7}, "--clients must be an integer from 1 to 1000000"),
    ({"round_timeout": 0}, re.escape("--round-timeout must be > 0 (seconds)")),
    ({"momentum": -0.1}, "--momentum must be >= 0"),
    ({"fraction": 0.0}, r"--fraction must be in \(0, 1\]"),
    ({"delta": 1.0}, r"--delta must be in \(0, 1\)"),
    ({"secagg_bits": 4}, "--secagg-bits must be an integer from 8 to 64"),
    ({"dataset": "x" * 10_000}, r"--dataset must be one of .*; got 'x+\.\.\.x+'$"),
    ({"data_dir": "a\x00b"}, "--data-dir must be a string without NUL characters"),
    ({"rounds": [1] * 1000}, r"--rounds must be an integer; got \[1, 1, 1, 1, \.\.\.\]$"),
])
def test_ranges_and_types_are_refused_in_one_short_line(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        RunConfig().updated(changes).validate()
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 500


def test_the_thread_ceiling_is_four_per_core_and_at_most_1024() -> None:
    assert max_threads() == min(1024, 4 * (os.cpu_count() or 1))
    RunConfig(threads=max_threads()).validate()


def test_every_bound_names_a_real_field() -> None:
    assert set(bounds()) <= set(FIELD_TYPES)


def test_the_client_test_share_is_zero_under_centralized_evaluation_unless_given() -> None:
    assert RunConfig().effective_client_test_fraction == 0.0
    assert RunConfig(evaluation="federated").effective_client_test_fraction == 0.2
    assert RunConfig(evaluation="both").effective_client_test_fraction == 0.2
    assert RunConfig(client_test_fraction=0.3).effective_client_test_fraction == 0.3  # explicit wins
    assert RunConfig(client_test_fraction=0.0, evaluation="centralized").effective_client_test_fraction == 0.0
    with pytest.raises(ConfigError, match="needs client test data"):
        RunConfig(evaluation="federated", client_test_fraction=0.0).validate()


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe\x00\x01binary", r"not UTF-8 text \(byte 0 is 0xff\)"),
    (b"rounds: 2\nlr: \x80\n", r"not UTF-8 text \(byte 14 is 0x80\)"),
    (b"- 1\n- 2\n", "expected a mapping of keys to values, got list"),
    (b"just text", "expected a mapping of keys to values, got str"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply|not valid YAML"),
    (b"lr: !!python/object/apply:os.system ['true']", "not valid YAML"),
    (b"lr: [unclosed", "not valid YAML at line 1"),
])
def test_a_config_file_that_is_not_a_yaml_mapping_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as refused:
        load_config_file(path)
    assert "\n" not in str(refused.value)


def test_a_huge_file_given_as_config_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="too big for a config file"):
        load_config_file(path)


def test_an_empty_config_file_is_no_settings(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    assert load_config_file(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize("changes", [
    {"dp": "central", "evaluation": "federated"}, {"dp": "local", "evaluation": "both"},
    {"dp": "dpsgd", "evaluation": "federated"},
])
def test_dp_refuses_federated_evaluation_it_does_not_account_for(changes) -> None:
    with pytest.raises(ConfigError, match="test loss, accuracy and count unnoised, which epsilon does not cover"):
        RunConfig(**changes).validate()


@pytest.mark.parametrize("changes", [
    {"secure_aggregation": "secagg", "evaluation": "federated"}, {"he": "ckks", "he_keys": "k", "evaluation": "both"},
])
def test_secure_sums_refuse_federated_evaluation_in_the_clear(changes) -> None:
    with pytest.raises(ConfigError, match="which the secure sum exists to hide"):
        RunConfig(**changes).validate()
