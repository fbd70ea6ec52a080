"""fedmq.data on the real Fashion-MNIST files, plus small IDX files written to tmp_path."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.data import (
    FMNIST_MEAN,
    FMNIST_STD,
    ImageSet,
    dirichlet_partition,
    iid_partition,
    load_fashion_mnist,
    load_idx,
    load_mnist,
    resolve_data_dir,
    to_tensors,
)
from fedmq.errors import ConfigError, DataError

FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(scope="module")
def fashion(data_dir: Path) -> tuple[ImageSet, ImageSet]:
    return load_fashion_mnist(data_dir)


def idx_bytes(array: npt.NDArray[np.generic], code: int) -> bytes:
    """An IDX file by hand: 0, 0, dtype code, ndim, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_tiny_set(folder: Path, *, n_train: int = 5, n_test: int = 3, gz: bool = False) -> None:
    """A four-file dataset with the official names; uncompressed unless ``gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for name, array in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(array, 0x08)
            path = folder / f"{split}-{name}-ubyte"
            if gz:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
            else:
                path.write_bytes(data)


# --- loading -----------------------------------------------------------------------------


def test_fashion_mnist_shapes_and_labels(fashion: tuple[ImageSet, ImageSet]) -> None:
    train, test = fashion
    assert train.images.shape == (60_000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10_000, 28, 28) and test.images.dtype == np.uint8
    assert train.labels.shape == (60_000,) and train.labels.dtype == np.int64
    assert test.labels.shape == (10_000,) and test.labels.dtype == np.int64
    # Fashion-MNIST is balanced: 6,000 train and 1,000 test images per class 0..9.
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert len(train) == 60_000


def test_load_idx_reads_gz(data_dir: Path, fashion: tuple[ImageSet, ImageSet]) -> None:
    labels = load_idx(data_dir / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10_000,) and labels.dtype == np.uint8
    assert labels.flags.writeable
    assert np.array_equal(labels, fashion[1].labels)


@pytest.mark.parametrize(
    ("dtype", "code"),
    [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D)],
)
def test_load_idx_reads_raw_files_of_every_dtype(
    tmp_path: Path, dtype: type[np.generic], code: int
) -> None:
    expected = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = tmp_path / "x-idx3"
    path.write_bytes(idx_bytes(expected, code))
    array = load_idx(path)
    assert array.dtype == np.dtype(dtype) and array.dtype.isnative
    assert np.array_equal(array, expected)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "bad magic"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 3) + b"abc", "bad magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc", "unknown IDX dtype code 0x07"),
        (b"\x00\x00\x08\x02" + struct.pack(">I", 3), "header truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"abc", "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"abc", "trailing bytes"),
        (b"\x1f\x8b\x08\x00garbage", "not a valid gzip file"),
    ],
)
def test_load_idx_rejects_malformed_files(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError, match=message):
        load_idx(path)


def test_load_accepts_uncompressed_files_in_the_folder_itself(tmp_path: Path) -> None:
    write_tiny_set(tmp_path)
    train, test = load_fashion_mnist(tmp_path)
    assert train.images.shape == (5, 28, 28) and test.images.shape == (3, 28, 28)
    assert train.labels.tolist() == [0, 1, 2, 3, 4]


def test_load_mnist_uses_its_own_folder(tmp_path: Path) -> None:
    write_tiny_set(tmp_path / "mnist", n_train=4)
    train, _ = load_mnist(tmp_path)
    assert len(train) == 4


def test_missing_files_error_names_them_and_the_folder(tmp_path: Path) -> None:
    (tmp_path / "fashion-mnist").mkdir()
    (tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError) as caught:
        load_fashion_mnist(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "fashion-mnist") in message
    for name in FILES[1:]:
        assert f"{name}.gz" in message
    assert "missing train-images" not in message  # that one is there


def test_checksum_mismatch_is_a_data_error(data_dir: Path, tmp_path: Path) -> None:
    source = data_dir / "fashion-mnist"
    for name in FILES[:3]:
        (tmp_path / f"{name}.gz").symlink_to(source / f"{name}.gz")
    corrupt = bytearray((source / "t10k-labels-idx1-ubyte.gz").read_bytes())
    corrupt[100] ^= 0xFF
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(corrupt))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: MD5 .* does not match"):
        load_fashion_mnist(tmp_path)


def test_unofficial_gz_files_load_only_without_verification(tmp_path: Path) -> None:
    write_tiny_set(tmp_path, gz=True)
    with pytest.raises(DataError, match="MD5"):
        load_fashion_mnist(tmp_path)
    train, _ = load_fashion_mnist(tmp_path, verify_checksums=False)
    assert len(train) == 5


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDMQ_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="FEDMQ_DATA_DIR"):
        resolve_data_dir(None)
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("FEDMQ_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(other) == other  # the flag wins over the environment
    with pytest.raises(DataError, match="not a directory"):
        resolve_data_dir(tmp_path / "absent")


# --- partitions --------------------------------------------------------------------------


def test_dirichlet_partition_matches_the_benchmark(fashion: tuple[ImageSet, ImageSet]) -> None:
    state = np.random.get_state()[1].copy()  # type: ignore[index]
    parts = dirichlet_partition(fashion[0].labels, 50, 0.5, 0)
    assert [len(p) for p in parts[:5]] == [599, 1288, 1173, 240, 1748]  # BENCHMARK.md
    assert np.array_equal(np.random.get_state()[1], state)  # type: ignore[index]
    again = dirichlet_partition(fashion[0].labels, 50, 0.5, 0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_partition(fashion[0].labels, 50, 0.5, 1)
    assert [len(p) for p in other] != [len(p) for p in parts]
    assert_disjoint_cover(parts, 60_000)


def assert_disjoint_cover(parts: list[npt.NDArray[np.int64]], n: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(n))  # every index exactly once


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), max_size=200),
    num_participants=st.integers(1, 12),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_partition_is_a_disjoint_cover(
    labels: list[int], num_participants: int, alpha: float, seed: int
) -> None:
    parts = dirichlet_partition(np.array(labels, dtype=np.int64), num_participants, alpha, seed)
    assert len(parts) == num_participants
    assert_disjoint_cover(parts, len(labels))


def test_dirichlet_partition_rejects_bad_arguments() -> None:
    labels = np.array([0, 1, 2])
    with pytest.raises(ConfigError, match="num_participants"):
        dirichlet_partition(labels, 0, 0.5, 0)
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_partition(labels, 3, 0.0, 0)
    with pytest.raises(DataError, match="labels"):
        dirichlet_partition(np.array([0.5, 1.0]), 3, 0.5, 0)


def test_iid_partition() -> None:
    parts = iid_partition(103, 10, seed=7)
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
    assert_disjoint_cover(parts, 103)
    again = iid_partition(103, 10, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not np.array_equal(parts[0], iid_partition(103, 10, seed=8)[0])


# --- tensors -----------------------------------------------------------------------------


def test_to_tensors_scales_and_normalises() -> None:
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[1] = 255
    images[2, 0, 0] = 51  # 51 / 255 = 0.2
    data = ImageSet(images=images, labels=np.array([4, 5, 6], dtype=np.int64))
    x, y = to_tensors(data)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == [4, 5, 6] and y.dtype == torch.int64
    # pixel p -> (p / 255 - 0.2860) / 0.3530
    assert x[0, 0, 5, 5].item() == pytest.approx(-0.2860 / 0.3530, abs=1e-6)  # -0.81020
    assert x[1, 0, 5, 5].item() == pytest.approx((1 - 0.2860) / 0.3530, abs=1e-6)  # 2.02266
    assert x[2, 0, 0, 0].item() == pytest.approx((0.2 - 0.2860) / 0.3530, abs=1e-6)  # -0.24363
    y[0] = 9  # the tensors never alias the image set
    assert data.labels[0] == 4


def test_to_tensors_selects_indices(fashion: tuple[ImageSet, ImageSet]) -> None:
    test = fashion[1]
    x, y = to_tensors(test, np.array([3, 1, 4]))
    assert x.shape == (3, 1, 28, 28)
    assert y.tolist() == test.labels[[3, 1, 4]].tolist()
    expected = (test.images[1].astype(np.float32) / 255 - FMNIST_MEAN) / FMNIST_STD
    np.testing.assert_allclose(x[1, 0].numpy(), expected, atol=1e-6)


def test_image_set_checks_its_arrays() -> None:
    with pytest.raises(DataError, match="labels"):
        ImageSet(images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="images"):
        ImageSet(images=np.zeros((2, 28, 28), np.float32), labels=np.zeros(2, np.int64))
