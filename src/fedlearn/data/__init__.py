"""Datasets (normalized, in memory) and the ways to split them among federated clients."""

from fedlearn.data.arrays import ArrayDataset, as_tensors
from fedlearn.data.bundle import DatasetBundle
from fedlearn.data.datasets import DATASETS, load_dataset
from fedlearn.data.partition import PARTITIONS, label_counts, partition_indices, split_train_test

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "ArrayDataset",
    "DatasetBundle",
    "as_tensors",
    "label_counts",
    "load_dataset",
    "partition_indices",
    "split_train_test",
]
