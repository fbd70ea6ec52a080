"""The small model zoo: 28x28 grayscale images in, 10 class logits out."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from fedmq.errors import ConfigError

__all__ = ["MODEL_NAMES", "CnnS", "Mlp", "ModelName", "build_model"]

ModelName = Literal["cnn-s", "mlp"]
MODEL_NAMES: tuple[ModelName, ...] = get_args(ModelName)


class CnnS(nn.Module):
    """The benchmark's "cnn-s" (28,938 parameters).

    Conv2d(1,16,5,pad 2) ReLU MaxPool(2) -> Conv2d(16,32,5,pad 2) ReLU MaxPool(2)
    -> Flatten -> Linear(1568,10).

    Computed in the channels-last memory format, with each max-pool before its ReLU
    (they commute: ``max`` is monotone, so ``relu(max(x)) == max(relu(x))``, and the
    gradient reaches the same entries). The values are those of the plain NCHW layers
    up to float rounding (~1e-7); on this machine's CPU, one thread, a training batch
    of 32 takes 3.7 ms instead of 7.3 ms and evaluating 10,000 images 0.49 s instead
    of 1.64 s (``python benchmarks/model_speed.py``): PyTorch's NCHW max-pool and
    ReLU backward were 43 % of the training time (torch.profiler).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5, padding=2)
        self.fc = nn.Linear(32 * 7 * 7, 10)
        # The conv weights; values unchanged. (torch's stubs omit the memory_format overload.)
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # [B, 1, 28, 28], NHWC in memory
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # -> [B, 16, 14, 14]
        x = F.relu(F.max_pool2d(self.conv2(x), 2))  # -> [B, 32, 7, 7]
        x = x.flatten(1)  # -> [B, 1568], in (channel, row, column) order as in NCHW
        logits: torch.Tensor = self.fc(x)  # -> [B, 10]
        return logits


class Mlp(nn.Module):
    """A 784-128-10 perceptron with one ReLU (101,770 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # [B, 1, 28, 28] -> [B, 784]
        logits: torch.Tensor = self.fc2(F.relu(self.fc1(x)))  # -> [B, 10]
        return logits


def build_model(name: ModelName, *, seed: int = 0) -> nn.Module:
    """A fresh model: ``torch.manual_seed(seed)``, then PyTorch's default initialisation.

    The same ``(name, seed)`` gives the same weights in every process. Note that
    this reseeds torch's global generator, as the benchmark prescribes.
    """
    if name not in MODEL_NAMES:
        raise ConfigError(f"model: {name!r} is not one of {', '.join(MODEL_NAMES)}")
    torch.manual_seed(seed)
    return CnnS() if name == "cnn-s" else Mlp()
