"""Datasets on local disk, partitions across participants, and tensors for the models.

The loaders read the official IDX files (``.gz`` or not) and check their MD5s;
the partitioners are pure functions of their arguments, so every process that
calls them with the same arguments agrees on who holds which example.
"""

from fedmq.data._datasets import (
    FMNIST_MEAN,
    FMNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    ImageSet,
    load_fashion_mnist,
    load_mnist,
    resolve_data_dir,
)
from fedmq.data._idx import load_idx
from fedmq.data._partition import dirichlet_partition, iid_partition
from fedmq.data._tensors import to_tensors

__all__ = [
    "FMNIST_MEAN",
    "FMNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "ImageSet",
    "dirichlet_partition",
    "iid_partition",
    "load_fashion_mnist",
    "load_idx",
    "load_mnist",
    "resolve_data_dir",
    "to_tensors",
]
