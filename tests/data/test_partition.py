"""Tests for fedlearn.data.partition: coverage, determinism, skew and errors of every partition method."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedlearn.data import PARTITIONS, label_counts, partition_indices, split_train_test
from fedlearn.data.partition import DIRICHLET_TRIES, natural_group_count
from fedlearn.errors import ConfigError, DataError


def _labels(n: int = 2000, classes: int = 10, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def _groups(n: int = 2000, count: int = 25, seed: int = 2) -> np.ndarray:
    # Group ids are sparse and shuffled so "id order" differs from first-appearance order.
    return np.random.default_rng(seed).permutation(np.arange(count) * 7)[np.arange(n) % count]


def _parts(method: str, labels: np.ndarray, clients: int = 20, seed: int = 0, **kw) -> list[np.ndarray]:
    if method == "natural":
        kw.setdefault("groups", _groups(labels.shape[0]))
    return partition_indices(labels, clients, method, seed=seed, **kw)


def _total_variation(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> float:
    overall = np.bincount(labels, minlength=classes) / labels.shape[0]
    dists = [np.bincount(labels[p], minlength=classes) / p.shape[0] for p in parts]
    return float(np.mean([0.5 * np.abs(d - overall).sum() for d in dists]))


@pytest.mark.parametrize("method", PARTITIONS)
def test_disjoint_cover_sorted_int64(method: str) -> None:
    labels = _labels()
    clients = 25 if method == "natural" else 20
    parts = _parts(method, labels, clients)
    assert len(parts) == clients
    for p in parts:
        assert p.dtype == np.int64
        assert p.size >= 1
        assert np.all(np.diff(p) > 0)  # sorted, no repeats
    joined = np.concatenate(parts)
    assert joined.size == np.unique(joined).size  # disjoint
    np.testing.assert_array_equal(np.sort(joined), np.arange(labels.size))  # covers everything


@pytest.mark.parametrize("method", PARTITIONS)
def test_deterministic_per_seed_and_differs_across_seeds(method: str) -> None:
    labels = _labels()
    first, again, other = (_parts(method, labels, seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    if method != "natural":  # natural ignores the seed by design
        assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [p.size for p in _parts("iid", _labels(2003), clients=10)]
    assert sum(sizes) == 2003 and max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = _labels(3000)
    skew = {
        alpha: np.mean([_total_variation(labels, _parts("dirichlet", labels, 10, seed=s, alpha=alpha), 10)
                        for s in range(4)])
        for alpha in (0.1, 1.0, 100.0)
    }
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.1 and skew[0.1] > 0.4


def test_dirichlet_respects_min_size() -> None:
    parts = _parts("dirichlet", _labels(3000), clients=30, alpha=0.3, min_size=20)
    assert min(p.size for p in parts) >= 20


def test_dirichlet_gives_up_with_clear_error() -> None:
    # 200 clients sharing 2 classes of 300 samples at alpha 0.01: some client always ends up empty.
    with pytest.raises(DataError, match=f"after {DIRICHLET_TRIES} draws.*raise --alpha"):
        partition_indices(_labels(300, classes=2), 200, "dirichlet", seed=0, alpha=0.01)


def test_shards_pure_when_classes_align_with_shards() -> None:
    labels = np.repeat(np.arange(10), 100)  # 1000 samples -> 200 shards of 5, never crossing a class
    parts = partition_indices(labels, 100, "shards", seed=0, shards_per_client=2)
    assert all(p.size == 10 for p in parts)
    assert max(np.unique(labels[p]).size for p in parts) <= 2


def test_shards_each_shard_is_a_label_sorted_run() -> None:
    # Uneven classes: a shard may cross one class boundary, so a client holds at most 2 labels per shard,
    # and the labels a client holds form at most shards_per_client contiguous runs of label values.
    labels = _labels(1000, classes=10, seed=5)
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 1000 // 200  # every class is longer than a shard, so a shard spans <= 2 labels
    for per_client in (1, 2, 3):
        parts = partition_indices(labels, 200 // per_client, "shards", seed=1, shards_per_client=per_client)
        for p in parts:
            present = np.unique(labels[p])
            assert present.size <= 2 * per_client
            runs = 1 + np.count_nonzero(np.diff(present) > 1)
            assert runs <= per_client


def test_shards_far_more_skewed_than_iid() -> None:
    labels = _labels(2000)
    shard_labels = [np.unique(labels[p]).size for p in _parts("shards", labels, 100)]
    iid_labels = [np.unique(labels[p]).size for p in _parts("iid", labels, 100)]
    assert max(shard_labels) <= 4 and np.mean(iid_labels) > 7


def test_quantity_sizes_vary_and_sum_to_n() -> None:
    labels = _labels(5000)
    sizes = np.array([p.size for p in _parts("quantity", labels, 50, quantity_sigma=1.0, min_size=5)])
    assert sizes.sum() == 5000 and sizes.min() >= 5
    assert sizes.std() / sizes.mean() > 0.5
    equal = np.array([p.size for p in _parts("quantity", labels, 50, quantity_sigma=0.0)])
    assert equal.max() - equal.min() <= 1


def test_natural_maps_each_client_to_one_group_in_id_order() -> None:
    labels = _labels()
    groups = _groups()
    parts = partition_indices(labels, 25, "natural", seed=0, groups=groups)
    owners = [np.unique(groups[p]) for p in parts]
    assert all(o.size == 1 for o in owners)
    assert [int(o[0]) for o in owners] == sorted(np.unique(groups).tolist())
    for p, o in zip(parts, owners):
        np.testing.assert_array_equal(p, np.flatnonzero(groups == o[0]))


def test_natural_with_fewer_clients_takes_first_groups_and_says_so(caplog) -> None:
    groups = _groups()
    with caplog.at_level(logging.WARNING, logger="fedlearn.data.partition"):
        parts = partition_indices(_labels(), 5, "natural", seed=0, groups=groups)
    assert [int(groups[p[0]]) for p in parts] == sorted(np.unique(groups).tolist())[:5]
    left = groups.size - sum(p.size for p in parts)
    assert left > 0
    assert f"only the first 5 of the dataset's 25 groups (writers) take part, because --clients is 5; {left} of " \
           f"{groups.size} training samples are left out. Give --clients 25" in caplog.text


def test_natural_without_a_client_count_uses_every_group(caplog) -> None:
    groups = _groups()
    with caplog.at_level(logging.INFO, logger="fedlearn.data.partition"):
        parts = partition_indices(_labels(), None, "natural", seed=0, groups=groups)
    assert len(parts) == natural_group_count(groups) == 25
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(groups.size))
    assert "25 clients, one per group" in caplog.text and "WARNING" not in caplog.text
    assert natural_group_count(None) is None
    with pytest.raises(ConfigError, match="needs a number of clients"):
        partition_indices(_labels(), None, "iid", seed=0)


def test_natural_on_the_real_femnist_uses_all_105_writers(shared_dataset, caplog) -> None:
    from fedlearn.data import load_dataset

    bundle = load_dataset("femnist", shared_dataset("femnist_leaf"), download=False)
    labels = bundle.train.y.numpy()
    assert natural_group_count(bundle.train_groups) == 105
    parts = partition_indices(labels, None, "natural", seed=0, groups=bundle.train_groups)
    assert len(parts) == 105 and sum(p.size for p in parts) == 14708
    assert all(np.unique(bundle.train_groups[p]).size == 1 for p in parts)
    with caplog.at_level(logging.WARNING, logger="fedlearn.data.partition"):
        ten = partition_indices(labels, 10, "natural", seed=0, groups=bundle.train_groups)
    assert len(ten) == 10
    assert "only the first 10 of the dataset's 105 groups" in caplog.text and "--clients 105" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"num_clients": 2001, "method": "iid"}, ConfigError, r"--clients 2001 is more than the 2000 .*at most 2000"),
        ({"num_clients": 0, "method": "iid"}, ConfigError, "at least 1"),
        ({"num_clients": 5, "method": "zipf"}, ConfigError, "unknown partition 'zipf'.*iid, dirichlet"),
        ({"num_clients": 5, "method": "dirichlet", "alpha": 0.0}, ConfigError, "alpha must be a positive"),
        ({"num_clients": 5, "method": "dirichlet", "alpha": -1.0}, ConfigError, "alpha must be a positive"),
        ({"num_clients": 5, "method": "shards", "shards_per_client": 0}, ConfigError, "at least 1"),
        ({"num_clients": 1000, "method": "shards", "shards_per_client": 3}, ConfigError, "3000 shards, more than"),
        ({"num_clients": 5, "method": "quantity", "quantity_sigma": -1.0}, ConfigError, "quantity_sigma"),
        ({"num_clients": 100, "method": "iid", "min_size": 50}, ConfigError, "need 5000 samples"),
        ({"num_clients": 5, "method": "natural"}, ConfigError, "natural owners such as femnist"),
        ({"num_clients": 26, "method": "natural", "groups": _groups()}, ConfigError, "25 groups.*at most 25"),
        ({"num_clients": 5, "method": "natural", "groups": _groups()[:10]}, ConfigError, "one group per sample"),
        ({"num_clients": 5, "method": "natural", "groups": _groups(), "min_size": 500}, DataError, "min_size=500"),
    ],
)
def test_errors(kwargs: dict, error: type, pattern: str) -> None:
    kwargs = dict(kwargs)
    with pytest.raises(error, match=pattern):
        partition_indices(_labels(), kwargs.pop("num_clients"), kwargs.pop("method"), seed=0, **kwargs)


def test_split_train_test() -> None:
    indices = np.arange(100, 150)
    train, test = split_train_test(indices, 0.2, seed=7)
    assert (train.size, test.size) == (40, 10)
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), indices)
    again = split_train_test(indices, 0.2, seed=7)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(split_train_test(indices, 0.2, seed=8)[1], test)


def test_split_train_test_edges() -> None:
    assert [a.size for a in split_train_test(np.arange(10), 0.0, 0)] == [10, 0]
    assert [a.size for a in split_train_test(np.arange(10), 0.25, 0)] == [7, 3]  # 2.5 rounds up
    assert [a.size for a in split_train_test(np.arange(1), 0.9, 0)] == [1, 0]  # train keeps one
    assert [a.size for a in split_train_test(np.arange(4), 0.9, 0)] == [1, 3]
    assert [a.size for a in split_train_test(np.arange(0), 0.5, 0)] == [0, 0]
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="test_fraction"):
            split_train_test(np.arange(10), bad, 0)


def test_label_counts() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    assert label_counts(labels, np.array([1, 2, 3, 5]), 4) == [0, 2, 2, 0]
    assert label_counts(labels, np.array([], dtype=np.int64), 3) == [0, 0, 0]
    with pytest.raises(DataError, match="num_classes"):
        label_counts(labels, np.arange(6), 2)
