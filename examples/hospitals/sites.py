"""The three hospitals' site-skewed shares of PneumoniaMNIST's training split, and per-site .npz files.

Each hospital gets a fixed fraction of all normal (label 0) and of all pneumonia (label 1)
training images, so sizes and pneumonia prevalence differ by site the way they do between a
large academic centre, a pneumonia referral ward and a community clinic:

| site       | share of normal | share of pneumonia | images | pneumonia |
|------------|-----------------|--------------------|--------|-----------|
| hospital-a | 35%             | 55%                | 2,347  | 82%       |
| hospital-b |  5%             | 35%                | 1,284  | 95%       |
| hospital-c | 60%             | 10%                | 1,077  | 32%       |

Every image goes to exactly one site. Each site then keeps a random 20% of its share as its
local test set (federated evaluation) and trains on the rest. The official test split (624
images) is never given to a site: it is where every model in the comparison is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlearn.data import label_counts, split_train_test
from fedlearn.errors import ConfigError, DataError
from fedlearn.seeding import derive_seed

# Fraction of all class-0 (normal) and of all class-1 (pneumonia) training images each site holds.
SITE_CLASS_SHARES: dict[str, tuple[float, float]] = {
    "hospital-a": (0.35, 0.55),
    "hospital-b": (0.05, 0.35),
    "hospital-c": (0.60, 0.10),
}
LOCAL_TEST_FRACTION = 0.2
DATASET = "pneumoniamnist"


@dataclass
class Site:
    """One hospital's indices into the official training split: what it trains on and what it tests on."""

    name: str
    train: np.ndarray
    test: np.ndarray

    @property
    def indices(self) -> np.ndarray:
        return np.sort(np.concatenate([self.train, self.test]))


def split_sites(labels: np.ndarray, seed: int = 0, shares: dict[str, tuple[float, ...]] | None = None,
                test_fraction: float = LOCAL_TEST_FRACTION) -> list[Site]:
    """Deal each class's images out to the sites by ``shares`` (a column per class, summing to 1); deterministic."""
    shares = SITE_CLASS_SHARES if shares is None else shares
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    table = np.asarray(list(shares.values()), dtype=np.float64)
    num_classes = int(labels.max()) + 1 if labels.size else 0
    if table.ndim != 2 or table.shape[1] != num_classes or (table < 0).any():
        raise ConfigError(f"site shares need one non-negative fraction per class ({num_classes}) for every site")
    if not np.allclose(table.sum(axis=0), 1.0):
        raise ConfigError(f"each class's site shares must sum to 1; they sum to {table.sum(axis=0).round(4).tolist()}")
    rng = np.random.default_rng(derive_seed(seed, "hospital-sites"))
    dealt: list[list[np.ndarray]] = [[] for _ in shares]
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        # Cut at rounded cumulative shares so the sites' counts always add up to the class total.
        cuts = np.rint(np.cumsum(table[:, c]) * members.size).astype(np.int64)
        for site, part in enumerate(np.split(members, cuts[:-1])):
            dealt[site].append(part)
    sites = []
    for i, name in enumerate(shares):
        share = np.sort(np.concatenate(dealt[i]))
        if share.size < 2:
            raise DataError(f"{name} got {share.size} images; give it a larger share")
        train, test = split_train_test(share, test_fraction, derive_seed(seed, "hospital-test", i))
        sites.append(Site(name, train, test))
    return sites


def describe_sites(sites: list[Site], labels: np.ndarray) -> list[dict]:
    """Per site: train/test sizes, label counts and pneumonia prevalence (for the README and results.json)."""
    rows = []
    for site in sites:
        counts = label_counts(labels, site.indices, 2)
        rows.append({
            "site": site.name, "images": int(site.indices.size), "train": int(site.train.size),
            "test": int(site.test.size), "normal": counts[0], "pneumonia": counts[1],
            "prevalence": counts[1] / max(sum(counts), 1),
            "train_label_counts": label_counts(labels, site.train, 2),
            "test_label_counts": label_counts(labels, site.test, 2),
        })
    return rows


def load_raw(data_dir: str | Path) -> dict[str, np.ndarray]:
    """The official pneumoniamnist.npz arrays (uint8 images, (N, 1) labels)."""
    path = Path(data_dir) / f"{DATASET}.npz"
    if not path.is_file():
        raise DataError(f"{path} not found; pass --data-dir pointing at the folder with {DATASET}.npz")
    with np.load(path) as npz:
        return {k: npz[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}


def write_site_files(raw: dict[str, np.ndarray], sites: list[Site], out_dir: str | Path) -> list[Path]:
    """Write <out_dir>/<site>/pneumoniamnist.npz (train = the site's training share, test = its local test
    share), so each hospital's `fedlearn client --data-dir <out_dir>/<site>` holds only its own images."""
    written = []
    for site in sites:
        folder = Path(out_dir) / site.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{DATASET}.npz"
        np.savez_compressed(
            path,
            train_images=raw["train_images"][site.train], train_labels=raw["train_labels"][site.train],
            test_images=raw["train_images"][site.test], test_labels=raw["train_labels"][site.test],
        )
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Write each hospital's pneumoniamnist.npz for the three-process gRPC deployment."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data-dir", default="../shared/datasets/medmnist", help=f"folder holding {DATASET}.npz")
    parser.add_argument("--out", default="runs/hospitals/sites", help="one sub-folder per hospital is written here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    raw = load_raw(args.data_dir)
    labels = raw["train_labels"].reshape(-1)
    sites = split_sites(labels, seed=args.seed)
    for path, row in zip(write_site_files(raw, sites, args.out), describe_sites(sites, labels)):
        print(f"{path}: {row['train']} train {row['train_label_counts']}, "
              f"{row['test']} test {row['test_label_counts']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
