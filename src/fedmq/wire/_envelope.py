"""The v1 envelopes, the limits a receiver enforces, and the model's tensor spec."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.codecs import EncodedTensor
from fedmq.errors import ConfigError

__all__ = [
    "PRIVACY_MECHANISMS",
    "SCHEMA_MODEL",
    "SCHEMA_UPDATE",
    "ModelEnvelope",
    "PrivacySpend",
    "TensorSpec",
    "UpdateEnvelope",
    "WireLimits",
    "tensor_spec_of",
]

# Signing and other envelope kinds will come as new schema strings; receivers reject
# any schema they do not know, so an old aggregator never misreads a new message.
SCHEMA_UPDATE = "fedmq.update/1"
SCHEMA_MODEL = "fedmq.model/1"

TensorSpec = Mapping[str, tuple[tuple[int, ...], str]]
"""The model's tensors: name -> (shape, dtype). Updates must match it exactly."""


PRIVACY_MECHANISMS = ("dp-sgd", "local")
"""The device-side mechanisms whose spend an update may report (docs/privacy.md)."""


@dataclass(frozen=True, kw_only=True)
class PrivacySpend:
    """What the device's own accountant says it has spent, counting this update.

    ``mechanism``: ``"dp-sgd"`` (example-level, Opacus on the device) or ``"local"``
    (user-level, the device's own Gaussian noise); ``epsilon`` >= 0 at ``delta`` in (0, 1).
    The device's word: an aggregator shows it, it cannot check it.
    """

    mechanism: str
    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if self.mechanism not in PRIVACY_MECHANISMS:
            raise ValueError(f"privacy.mechanism: {self.mechanism!r} is not one of dp-sgd, local")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"privacy.epsilon: {self.epsilon!r} must be a finite number >= 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta: {self.delta!r} must be in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class UpdateEnvelope:
    """A participant's model update (schema ``fedmq.update/1``).

    ``seq`` only grows per participant (it identifies duplicates); ``base_version`` is the
    global model version the update was computed from; ``created`` is unix seconds.
    ``privacy`` (optional, wire key 9): the device's privacy spend, sent only by a device
    that runs DP-SGD or local DP.
    """

    participant: str
    seq: int
    base_version: int
    num_examples: int
    loss: float
    created: float
    tensors: tuple[EncodedTensor, ...]
    privacy: PrivacySpend | None = None


@dataclass(frozen=True, kw_only=True)
class ModelEnvelope:
    """A global model published by the aggregator (schema ``fedmq.model/1``)."""

    version: int
    created: float
    tensors: tuple[EncodedTensor, ...]


@dataclass(frozen=True, kw_only=True)
class WireLimits:
    """Bounds a receiver enforces before trusting a message.

    ``max_decoded_elements`` bounds the elements of all tensors of one message once
    decoded: a top-k tensor is tiny on the wire whatever its declared shape, so without
    it a model envelope decoded without a spec could ask for terabytes.
    """

    max_message_bytes: int = 64 * 1024 * 1024
    max_tensors: int = 4096
    max_name_bytes: int = 256
    max_participant_bytes: int = 128
    max_decoded_elements: int = 2**28

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{f.name}: {value!r} must be an int >= 1")
        if self.max_tensors > 2**32 - 1:
            raise ConfigError(f"max_tensors: {self.max_tensors} must be <= 2**32 - 1")


def tensor_spec_of(
    params: Mapping[str, npt.NDArray[Any]],
) -> dict[str, tuple[tuple[int, ...], str]]:
    """The spec of a model given as name -> array: {name: (shape, dtype name)}.

    v1 updates decode to float32, so a model kept in another dtype matches no update.
    """
    return {
        name: (tuple(int(d) for d in np.shape(a)), str(np.asarray(a).dtype))
        for name, a in params.items()
    }
