"""The hospitals example: its documented site-skewed split, the per-site files and the comparison's runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fedlearn.data import load_dataset
from fedlearn.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hospitals"


def load(name: str) -> ModuleType:
    """Import examples/hospitals/<name>.py (examples are scripts, not a package)."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    spec = importlib.util.spec_from_file_location(f"hospitals_example_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


sites = load("sites")


def synthetic_labels() -> np.ndarray:
    """PneumoniaMNIST's training label counts (1,214 normal, 3,494 pneumonia), shuffled."""
    return np.random.default_rng(0).permutation(np.r_[np.zeros(1214, np.int64), np.ones(3494, np.int64)])


def test_split_is_a_disjoint_cover_with_the_documented_sizes_and_skew() -> None:
    labels = synthetic_labels()
    split = sites.split_sites(labels, seed=0)
    assert [s.name for s in split] == ["hospital-a", "hospital-b", "hospital-c"]
    everything = np.concatenate([np.r_[s.train, s.test] for s in split])
    assert np.array_equal(np.sort(everything), np.arange(labels.size))  # every image in exactly one place
    rows = {r["site"]: r for r in sites.describe_sites(split, labels)}
    # The table in sites.py's docstring and the README.
    assert {k: (r["normal"], r["pneumonia"]) for k, r in rows.items()} == {
        "hospital-a": (425, 1922), "hospital-b": (61, 1223), "hospital-c": (728, 349)}
    assert [round(r["prevalence"], 2) for r in rows.values()] == [0.82, 0.95, 0.32]
    for s in split:
        assert s.test.size == round(0.2 * (s.train.size + s.test.size))
    for c, shares in enumerate(zip(*sites.SITE_CLASS_SHARES.values())):
        counts = [(labels[s.indices] == c).sum() for s in split]
        assert np.allclose(np.array(counts) / (labels == c).sum(), shares, atol=1e-3)


def test_split_is_deterministic_per_seed() -> None:
    labels = synthetic_labels()
    a, b, c = (sites.split_sites(labels, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(x.train, y.train) and np.array_equal(x.test, y.test) for x, y in zip(a, b))
    assert not np.array_equal(a[0].train, c[0].train)


def test_bad_shares_are_refused() -> None:
    labels = synthetic_labels()
    with pytest.raises(ConfigError, match="sum to 1"):
        sites.split_sites(labels, shares={"a": (0.5, 0.5), "b": (0.4, 0.5)})
    with pytest.raises(ConfigError, match="one non-negative fraction per class"):
        sites.split_sites(labels, shares={"a": (1.0,), "b": (0.0,)})


def test_site_files_hold_only_each_sites_images(tmp_path: Path, shared_dataset) -> None:
    raw = sites.load_raw(shared_dataset("medmnist"))
    labels = raw["train_labels"].reshape(-1)
    split = sites.split_sites(labels, seed=0)
    sites.write_site_files(raw, split, tmp_path)
    for site in split:
        bundle = load_dataset("pneumoniamnist", tmp_path / site.name, download=False)
        assert len(bundle.train) == site.train.size and len(bundle.test) == site.test.size
        assert bundle.train.y.tolist() == labels[site.train].tolist()
        assert bundle.test.y.tolist() == labels[site.test].tolist()


def test_comparison_has_the_six_documented_trainings(shared_dataset) -> None:
    hospitals = load("hospitals")
    bundle = load_dataset("pneumoniamnist", shared_dataset("medmnist"), download=False)
    split = sites.split_sites(bundle.train.y.numpy(), seed=0)
    runs = hospitals.comparison_runs(bundle, split)
    assert [label for label, _, _ in runs] == ["FedAvg", f"FedProx (mu={hospitals.FEDPROX_MU})", "hospital-a alone",
                                               "hospital-b alone", "hospital-c alone", "centralized (pooled)"]
    assert [algorithm for _, algorithm, _ in runs] == ["fedavg", "fedprox", "fedavg", "fedavg", "fedavg", "fedavg"]
    federated = runs[0][2]
    assert {name: len(data.train) for name, data in federated.items()} == {s.name: s.train.size for s in split}
    (pooled,) = runs[-1][2].values()
    assert len(pooled.train) == sum(s.train.size for s in split)  # the same training images, in one place
