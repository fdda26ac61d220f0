"""Split a dataset's sample indices among federated clients: IID, label skew, pathological shards, size skew, natural.

Every function is deterministic for a seed (numpy's default_rng) and returns sorted int64 index arrays.
"""

from __future__ import annotations

import logging

import numpy as np

from fedlearn.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PARTITIONS = ("iid", "dirichlet", "shards", "quantity", "natural")
DIRICHLET_TRIES = 200  # re-draws before giving up on giving every client min_size samples

__all__ = ["PARTITIONS", "label_counts", "natural_group_count", "partition_indices", "split_train_test"]


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Sorted int64 copies of each client's indices."""
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then cut into near-equal parts (sizes differ by at most one)."""
    return np.array_split(rng.permutation(n), num_clients)


def _dirichlet_draw(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """One label-skew draw: each class is shared out by proportions ~ Dir(alpha).

    As in the common recipe (Hsu et al. 2019; Li et al. 2021, NIID-Bench), a client already holding
    more than N / num_clients samples gets no share of later classes, which keeps sizes from exploding.
    """
    n = labels.shape[0]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        drawn = rng.dirichlet(np.full(num_clients, alpha))
        masked = drawn * (sizes < n / num_clients)
        shares = masked / masked.sum() if masked.sum() > 0 else drawn / drawn.sum()
        cuts = (np.cumsum(shares)[:-1] * members.shape[0]).astype(np.int64)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
            sizes[client] += chunk.shape[0]
    return [np.concatenate(p) for p in parts]


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, min_size: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Re-draw until every client has min_size samples, at most DIRICHLET_TRIES times."""
    for _ in range(DIRICHLET_TRIES):
        parts = _dirichlet_draw(labels, num_clients, alpha, rng)
        if min(p.shape[0] for p in parts) >= min_size:
            return parts
    raise DataError(
        f"dirichlet partition: after {DIRICHLET_TRIES} draws some of the {num_clients} clients still had fewer "
        f"than {min_size} sample(s) with alpha={alpha}; raise --alpha, use fewer clients, or let clients hold no "
        "data with --min-partition-size 0 (they are never sampled)"
    )


def _shards(labels: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into num_clients*per_client shards, deal per_client to each client.

    Ties within a label are shuffled first, so a shard is a random sample of one label-sorted run.
    """
    order = rng.permutation(labels.shape[0])
    by_label = order[np.argsort(labels[order], kind="stable")]
    shards = np.array_split(by_label, num_clients * per_client)
    dealt = rng.permutation(len(shards)).reshape(num_clients, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in dealt]


def _quantity_sizes(n: int, num_clients: int, sigma: float, min_size: int, rng: np.random.Generator) -> np.ndarray:
    """Client sizes: min_size each plus the rest shared by log-normal weights (largest remainder rounding)."""
    weights = rng.lognormal(mean=0.0, sigma=sigma, size=num_clients)
    spare = n - num_clients * min_size
    exact = weights / weights.sum() * spare
    sizes = np.floor(exact).astype(np.int64)
    leftover = spare - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:leftover]] += 1
    return sizes + min_size


def _quantity(n: int, num_clients: int, sigma: float, min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Size skew: log-normal client sizes, labels IID (a shuffled split at those sizes)."""
    sizes = _quantity_sizes(n, num_clients, sigma, min_size, rng)
    return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


def _natural(groups: np.ndarray | None, n: int, num_clients: int | None) -> list[np.ndarray]:
    """One client per natural group (e.g. writer): every group when ``num_clients`` is None, else the first
    ``num_clients`` groups in id order, with a warning saying how many were left out and how to use them all."""
    if groups is None:
        raise ConfigError("partition 'natural' needs a dataset with natural owners such as femnist; "
                          "choose another partition for this dataset")
    groups = np.asarray(groups).reshape(-1)
    if groups.shape[0] != n:
        raise ConfigError(f"groups has {groups.shape[0]} entries but there are {n} labels; pass one group per sample")
    ids = np.unique(groups)
    if num_clients is None:
        log.info("partition 'natural': %d clients, one per group (every group of the dataset)", ids.shape[0])
        num_clients = ids.shape[0]
    if num_clients > ids.shape[0]:
        raise ConfigError(f"partition 'natural' has {ids.shape[0]} groups, so use at most {ids.shape[0]} clients "
                          f"(asked for {num_clients})")
    if num_clients < ids.shape[0]:
        left = int(np.isin(groups, ids[num_clients:]).sum())
        log.warning("partition 'natural': only the first %d of the dataset's %d groups (writers) take part, "
                    "because --clients is %d; %d of %d training samples are left out. Give --clients %d to use "
                    "every group", num_clients, ids.shape[0], num_clients, left, n, ids.shape[0])
    return [np.flatnonzero(groups == g) for g in ids[:num_clients]]


def natural_group_count(groups: np.ndarray | None) -> int | None:
    """How many natural groups (writers) a dataset has: the client count of ``--partition natural`` with every
    group; None for a dataset without groups."""
    return None if groups is None else int(np.unique(np.asarray(groups).reshape(-1)).shape[0])


def _check_args(n: int, num_clients: int | None, method: str, alpha: float, shards_per_client: int,
                quantity_sigma: float, min_size: int) -> None:
    """ConfigError for any argument outside what the method allows."""
    if method not in PARTITIONS:
        raise ConfigError(f"unknown partition {method!r}; choose one of: {', '.join(PARTITIONS)}")
    if num_clients is None:
        if method != "natural":
            raise ConfigError(f"partition {method!r} needs a number of clients; give --clients")
        return
    if num_clients < 1:
        raise ConfigError(f"--clients must be at least 1 (got {num_clients})")
    if num_clients > n:
        raise ConfigError(f"--clients {num_clients} is more than the {n} training samples; use at most {n}")
    if min_size < 0:
        raise ConfigError(f"min_size must be 0 or more (got {min_size})")
    if method != "natural" and num_clients * min_size > n:
        raise ConfigError(f"{num_clients} clients with at least {min_size} samples each need "
                          f"{num_clients * min_size} samples but there are {n}; "
                          f"use at most {n // max(min_size, 1)} clients or a smaller min_size")
    if method == "dirichlet" and not (np.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"dirichlet alpha must be a positive number (got {alpha}); "
                          "try 0.1 (skewed) to 100 (near IID)")
    if method == "shards" and shards_per_client < 1:
        raise ConfigError(f"shards_per_client must be at least 1 (got {shards_per_client})")
    if method == "shards" and num_clients * shards_per_client > n:
        raise ConfigError(f"{num_clients} clients x {shards_per_client} shards = {num_clients * shards_per_client} "
                          f"shards, more than the {n} samples; use fewer clients or shards per client")
    if method == "quantity" and not (np.isfinite(quantity_sigma) and quantity_sigma >= 0):
        raise ConfigError(f"quantity_sigma must be 0 or more (got {quantity_sigma}); try 1.0")


def partition_indices(
    labels: np.ndarray,
    num_clients: int | None,
    method: str,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    groups: np.ndarray | None = None,
    quantity_sigma: float = 1.0,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split indices 0..len(labels)-1 among ``num_clients`` clients by ``method`` (one of PARTITIONS).

    Parts are disjoint, sorted int64 arrays; together they cover every index, except under 'natural'
    with fewer clients than groups (logged as a warning). ``num_clients`` None (only for 'natural') means one
    client per group. Every client gets at least ``min_size`` samples or an error is raised.
    """
    labels = np.asarray(labels).reshape(-1)
    n = labels.shape[0]
    _check_args(n, num_clients, method, alpha, shards_per_client, quantity_sigma, min_size)
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = _iid(n, num_clients, rng)
    elif method == "dirichlet":
        parts = _dirichlet(labels, num_clients, alpha, min_size, rng)
    elif method == "shards":
        parts = _shards(labels, num_clients, shards_per_client, rng)
    elif method == "quantity":
        parts = _quantity(n, num_clients, quantity_sigma, min_size, rng)
    else:
        parts = _natural(groups, n, num_clients)
    smallest = min(p.shape[0] for p in parts)
    if smallest < min_size:
        raise DataError(f"partition {method!r} gave a client only {smallest} sample(s), "
                        f"fewer than min_size={min_size}; use fewer clients or a smaller min_size")
    return _finish(parts)


def split_train_test(indices: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into (train, test), sorted int64; deterministic for a seed.

    Test gets round(test_fraction * n) samples (halves round up) but train keeps at least one sample;
    test_fraction 0 gives an empty test set. Pass a different seed per client for independent splits.
    """
    if not (0.0 <= test_fraction < 1.0):
        raise ConfigError(f"test_fraction must be in [0, 1) (got {test_fraction}); try 0.2")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = indices.shape[0]
    n_test = min(int(np.floor(test_fraction * n + 0.5)), max(n - 1, 0))
    shuffled = np.random.default_rng(seed).permutation(indices)
    return np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])


def label_counts(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> list[int]:
    """How many of ``indices`` carry each label 0..num_classes-1."""
    chosen = np.asarray(labels).reshape(-1)[np.asarray(indices, dtype=np.int64)]
    if chosen.size and (chosen.min() < 0 or chosen.max() >= num_classes):
        raise DataError(f"labels run from {chosen.min()} to {chosen.max()}, outside 0..{num_classes - 1}; "
                        "pass the dataset's num_classes")
    return np.bincount(chosen.astype(np.int64), minlength=num_classes).tolist()
