"""From uint8 images to the normalised float tensors the models take."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from fedmq.data._datasets import FMNIST_MEAN, FMNIST_STD, ImageSet

__all__ = ["to_tensors"]


def to_tensors(
    images: ImageSet,
    indices: npt.NDArray[np.integer] | None = None,
    *,
    mean: float = FMNIST_MEAN,
    std: float = FMNIST_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` for the selected examples (all when ``indices`` is None).

    ``x`` is float32 ``[n, 1, H, W]``: pixels scaled to [0, 1], then ``(x - mean) / std``
    (Fashion-MNIST's statistics by default; pass ``MNIST_MEAN``/``MNIST_STD`` for MNIST).
    ``y`` is int64 ``[n]``. Both are fresh tensors that share no memory with ``images``.
    """
    pixels = images.images if indices is None else images.images[indices]  # [n, H, W] uint8
    x = pixels.astype(np.float32)  # a fresh array, so the in-place steps below are safe
    x /= np.float32(255.0)
    x -= np.float32(mean)
    x /= np.float32(std)
    labels = images.labels if indices is None else images.labels[indices]
    y = torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: y never aliases the set
    return torch.from_numpy(x).unsqueeze(1), y  # [n, H, W] -> [n, 1, H, W]
