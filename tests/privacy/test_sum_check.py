"""The key holder's checks on a decrypted sum: exact integers, in range, with the named clients' check values."""

from __future__ import annotations

import numpy as np
import pytest

from fedlearn.errors import ConfigError
from fedlearn.privacy.sum_check import (
    CHECK_BITS,
    CHECK_SLOTS,
    SumCheckError,
    check_values,
    expected_checks,
    load_group_key,
    new_group_key,
    verified_sum,
)

KEY = bytes(range(32))


def test_check_values_are_keyed_per_round_and_client() -> None:
    values = check_values(KEY, 3, "c0")
    assert values.shape == (CHECK_SLOTS,) and values.dtype == np.int64
    assert values.min() >= 0 and values.max() < 2**CHECK_BITS
    assert np.array_equal(values, check_values(KEY, 3, "c0"))  # every party derives the same
    others = [check_values(KEY, 4, "c0"), check_values(KEY, 3, "c1"), check_values(new_group_key(), 3, "c0")]
    assert not any(np.array_equal(values, other) for other in others)
    assert np.array_equal(expected_checks(KEY, 3, ["c0", "c1"]), values + check_values(KEY, 3, "c1"))


def _decrypted(data: list[float], contributors: list[str], rnd: int = 1, noise: float = 1e-6) -> np.ndarray:
    """A decryption as CKKS gives it: the integers plus a small error."""
    exact = np.concatenate([np.asarray(data, dtype=np.float64), expected_checks(KEY, rnd, contributors)])
    return exact + noise * np.sin(np.arange(exact.size) + 1.0)


def test_an_honest_sum_comes_back_as_its_exact_integers() -> None:
    total = verified_sum(_decrypted([5, 0, 1023], ["a", "b"]), KEY, 1, ["a", "b"], 1023)
    assert total.dtype == np.int64 and total.tolist() == [5, 0, 1023]


@pytest.mark.parametrize(("values", "contributors", "limit", "message"), [
    (_decrypted([5, 6], ["a", "b"]), ["a"], 100, "at least 2"),
    (_decrypted([5, 6], ["a", "b"]), ["a", "a"], 100, "distinct client ids"),
    (_decrypted([5, 6], ["a", "b"]), "a,b", 100, "distinct client ids"),
    (_decrypted([5, 6], ["a", "b"]), ["a", ""], 100, "distinct client ids"),
    (_decrypted([5, 6], ["a"]), ["a", "b"], 100, "not the round-1 sum of the 2 clients"),
    (_decrypted([5, 6], ["a", "b"], rnd=2), ["a", "b"], 100, "not the round-1 sum"),
    (_decrypted([5, 6.5], ["a", "b"]), ["a", "b"], 100, "does not decrypt to integers"),
    (_decrypted([5, 6], ["a", "b"], noise=0.2), ["a", "b"], 100, "does not decrypt to integers"),
    (_decrypted([5, 101], ["a", "b"]), ["a", "b"], 100, "outside the range"),
    (_decrypted([-1, 6], ["a", "b"]), ["a", "b"], 100, "outside the range"),
    (np.array([1.0, np.nan, *range(CHECK_SLOTS)]), ["a", "b"], 100, "not a finite sum"),
    (np.zeros(CHECK_SLOTS), ["a", "b"], 100, "not a finite sum"),
])
def test_anything_else_is_refused(values, contributors, limit, message) -> None:
    with pytest.raises(SumCheckError, match=message):
        verified_sum(values, KEY, 1, contributors, limit)


def test_a_missing_or_short_group_key_says_what_to_do(tmp_path) -> None:
    with pytest.raises(ConfigError, match="every client needs the group.key written by `fedlearn he keygen`"):
        load_group_key(tmp_path)
    (tmp_path / "group.key").write_bytes(b"short")
    with pytest.raises(ConfigError, match="holds 5 bytes, not 32"):
        load_group_key(tmp_path)
    (tmp_path / "group.key").write_bytes(KEY)
    assert load_group_key(tmp_path) == KEY
