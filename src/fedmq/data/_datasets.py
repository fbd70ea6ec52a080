"""Fashion-MNIST and MNIST from their four official IDX files, found on local disk.

Nothing is downloaded and nothing is cached: the 60k training set loads in well
under a second from the ``.gz`` files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedmq.data._idx import parse_idx, read_file
from fedmq.errors import DataError

__all__ = [
    "FMNIST_MEAN",
    "FMNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "ImageSet",
    "load_fashion_mnist",
    "load_mnist",
    "resolve_data_dir",
]

FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

DATA_DIR_ENV = "FEDMQ_DATA_DIR"

_TRAIN_IMAGES = "train-images-idx3-ubyte"
_TRAIN_LABELS = "train-labels-idx1-ubyte"
_TEST_IMAGES = "t10k-images-idx3-ubyte"
_TEST_LABELS = "t10k-labels-idx1-ubyte"
_FILES = (_TRAIN_IMAGES, _TRAIN_LABELS, _TEST_IMAGES, _TEST_LABELS)


@dataclass(frozen=True)
class _Layout:
    name: str
    folders: tuple[str, ...]  # sub-folders of data_dir tried in order, then data_dir itself
    md5: dict[str, str]  # of the .gz files, as published upstream


_FASHION_MNIST = _Layout(
    name="Fashion-MNIST",
    folders=("fashion-mnist", "FashionMNIST/raw"),
    md5={
        _TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        _TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
        _TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79",
        _TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310",
    },
)
_MNIST = _Layout(
    name="MNIST",
    folders=("mnist", "MNIST/raw"),
    md5={
        _TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        _TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
        _TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
        _TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
    },
)


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Labelled grayscale images: ``images`` uint8 ``[N, H, W]``, ``labels`` int64 ``[N]``."""

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 3:
            raise DataError(
                f"ImageSet.images: expected uint8 [N, H, W], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        if self.labels.dtype != np.int64 or self.labels.shape != self.images.shape[:1]:
            raise DataError(
                f"ImageSet.labels: expected int64 [{len(self.images)}], got {self.labels.dtype} "
                f"{list(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)


def resolve_data_dir(flag: str | os.PathLike[str] | None) -> Path:
    """The data folder: ``flag`` if given, else ``$FEDMQ_DATA_DIR``; it must be a directory.

    Raises ``DataError`` when neither is set or the folder does not exist.
    """
    if flag is not None and os.fspath(flag) != "":
        path, source = Path(flag).expanduser(), "the data-dir flag"
    elif os.environ.get(DATA_DIR_ENV):
        path, source = Path(os.environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"
    else:
        raise DataError(
            "no data folder given: pass the data-dir flag or set "
            f"{DATA_DIR_ENV} to the folder that contains fashion-mnist/"
        )
    if not path.is_dir():
        raise DataError(f"{path} (from {source}) is not a directory")
    return path


def load_fashion_mnist(
    data_dir: str | os.PathLike[str], *, verify_checksums: bool = True
) -> tuple[ImageSet, ImageSet]:
    """Fashion-MNIST as ``(train, test)``: 60,000 and 10,000 images of 28x28.

    ``data_dir`` is the folder that contains ``fashion-mnist/`` (also accepted:
    ``FashionMNIST/raw/``, or the folder holding the files itself). Each of the
    four official files may be ``.gz`` or uncompressed; the MD5 of each ``.gz``
    file is checked against the official one unless ``verify_checksums`` is false.
    Raises ``DataError`` for missing, corrupt or inconsistent files.
    """
    return _load(_FASHION_MNIST, Path(data_dir), verify_checksums)


def load_mnist(
    data_dir: str | os.PathLike[str], *, verify_checksums: bool = True
) -> tuple[ImageSet, ImageSet]:
    """MNIST digits as ``(train, test)``, like ``load_fashion_mnist`` but from ``mnist/``.

    Also accepted: ``MNIST/raw/`` (torchvision's layout), or the folder itself.
    """
    return _load(_MNIST, Path(data_dir), verify_checksums)


def _load(layout: _Layout, data_dir: Path, verify_checksums: bool) -> tuple[ImageSet, ImageSet]:
    folder = next((data_dir / f for f in layout.folders if (data_dir / f).is_dir()), data_dir)
    paths = _find_files(layout, folder)
    # Read and verify all four before the (slower) decoding, so a bad file fails fast.
    blobs: dict[str, bytes] = {}
    for name, path in paths.items():
        known = verify_checksums and path.suffix == ".gz"
        blobs[name] = read_file(path, md5=layout.md5.get(name) if known else None)
    arrays = {name: parse_idx(blob, paths[name]) for name, blob in blobs.items()}
    return _image_set(layout, "train", arrays, paths), _image_set(layout, "t10k", arrays, paths)


def _find_files(layout: _Layout, folder: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for name in _FILES:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                paths[name] = candidate
                break
    missing = [f"{name}.gz" for name in _FILES if name not in paths]
    if missing:
        subfolders = " or ".join(f"{f}/" for f in layout.folders)
        raise DataError(
            f"{layout.name} not found in {folder}: missing {', '.join(missing)} (each may "
            f"also be uncompressed, without .gz). The data folder must be the one that "
            f"contains {subfolders}, or that folder itself"
        )
    return paths


def _image_set(
    layout: _Layout,
    split: str,
    arrays: dict[str, npt.NDArray[np.generic]],
    paths: dict[str, Path],
) -> ImageSet:
    """The images and labels of one split, checked against each other."""
    images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
    image_path, label_path = (
        paths[f"{split}-images-idx3-ubyte"],
        paths[f"{split}-labels-idx1-ubyte"],
    )
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(
            f"{image_path}: expected uint8 images [N, 28, 28], got {images.dtype} "
            f"{list(images.shape)}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{label_path}: expected {len(images)} uint8 labels to match {image_path.name}, "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    if len(labels) and int(labels.max()) > 9:
        raise DataError(f"{label_path}: {layout.name} labels must be 0..9, found {labels.max()}")
    return ImageSet(images=images.astype(np.uint8, copy=False), labels=labels.astype(np.int64))
