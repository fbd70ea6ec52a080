"""Model weights as plain numpy arrays: what the strategies and codecs work on.

The federated weights of a model are the floating-point entries of its
``state_dict()``: parameters and float buffers such as BatchNorm's running mean and
variance, all sent as float32. Integer buffers (BatchNorm's ``num_batches_tracked``, a
counter) are not weights: averaging counters of different devices would give a
fraction that means nothing, so they stay on each device, never sent nor overwritten.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = ["get_params", "non_finite", "set_params"]


def get_params(model: nn.Module) -> dict[str, npt.NDArray[np.float32]]:
    """float32 numpy copies of the floating-point entries of ``model.state_dict()``, in its
    order; they never alias the model."""
    return {
        # order="C": the conv weights of a channels-last model have other strides.
        name: tensor.detach().cpu().numpy().astype(np.float32, order="C", copy=True)
        for name, tensor in _federated(model).items()
    }


def _federated(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t for name, t in model.state_dict().items() if t.is_floating_point()}


def non_finite(params: Mapping[str, npt.NDArray[np.floating]]) -> list[str]:
    """The names of the tensors of ``params`` holding a NaN or an infinity, in order."""
    return [name for name, array in params.items() if not np.isfinite(array).all()]


def set_params(model: nn.Module, params: Mapping[str, npt.NDArray[np.floating]]) -> None:
    """Copy ``params`` into ``model``; names and shapes must match ``get_params(model)``.

    Raises ``ValueError`` listing every missing, unexpected and mis-shaped entry;
    the model is left untouched in that case. ``params`` may be read-only.
    """
    state = _federated(model)
    missing = [name for name in state if name not in params]
    unexpected = [name for name in params if name not in state]
    misshaped = [
        f"{name} {list(params[name].shape)} != {list(tensor.shape)}"
        for name, tensor in state.items()
        if name in params and tuple(params[name].shape) != tuple(tensor.shape)
    ]
    if missing or unexpected or misshaped:
        problems = [
            f"{label}: {', '.join(items)}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", misshaped),
            )
            if items
        ]
        raise ValueError(f"parameters do not fit the model ({'; '.join(problems)})")
    with torch.no_grad():
        for name, tensor in state.items():
            # torch.tensor copies, so read-only arrays (decoded from the wire) are fine.
            tensor.copy_(torch.tensor(params[name], dtype=tensor.dtype))
