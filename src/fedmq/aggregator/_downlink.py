"""How models go out: in full, or as compressed deltas against what devices hold.

The aggregator keeps full precision in ``x_global``. With a delta codec it also keeps
the last keyframe ``x_key`` and ``x_view``, exactly what a device holds, and publishes::

    keyframe (every ``keyframe_every`` versions, and the first):  x_global in float32
                                                                 x_key = x_view = x_global
    otherwise:  d = Q(x_global - x_key), base_version = the keyframe's ("fedmq.model-delta/1")
                x_view = x_key + decode(d)                        (float32, as devices do)

Each delta is taken against the last keyframe, not the previous version: a device that
missed some deltas (offline, or a reader that lagged and kept only the newest message)
applies the next one as long as it holds the keyframe. Quantization error never
accumulates: the global model is not touched, and each delta quantizes the whole
difference afresh, so the view is never further than one quantization step from the
global model. The aggregator uses ``x_view`` as the base of a version (FedAsync's
``x_local = base + delta``) because that is what devices trained from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedmq.codecs import CodecConfig, encode_params
from fedmq.errors import ConfigError
from fedmq.wire import ModelDeltaEnvelope, encode_model_delta, materialize

__all__ = ["Downlink", "DownlinkConfig"]

Params = dict[str, npt.NDArray[np.float32]]


@dataclass(frozen=True, kw_only=True)
class DownlinkConfig:
    """``codec``: how deltas are compressed; ``None`` sends every model in full float32.

    ``keyframe_every``: a full model at least every this many versions, for devices that
    joined late or missed a delta (they wait for it).
    """

    codec: CodecConfig | None = None
    keyframe_every: int = 20

    def __post_init__(self) -> None:
        if self.keyframe_every < 1:
            raise ConfigError(f"keyframe_every: {self.keyframe_every} must be >= 1")


class Downlink:
    """Encodes each published version; remembers the device view. Not thread-safe."""

    def __init__(
        self, config: DownlinkConfig, encode_full: Callable[[int, Mapping[str, np.ndarray]], bytes]
    ) -> None:
        self.config = config
        self._encode_full = encode_full
        self._key: Params | None = None  # the last keyframe: the base of every delta
        self._keyframe_version = -1
        self.keyframes = 0
        self.deltas = 0

    def encode(self, version: int, params: Mapping[str, np.ndarray]) -> tuple[bytes, Params, bool]:
        """``(body, view, is_keyframe)`` for ``version``; ``view`` is what devices will hold."""
        codec = self.config.codec
        if (
            codec is None
            or self._key is None
            or version - self._keyframe_version >= self.config.keyframe_every
        ):
            body = self._encode_full(version, params)
            view = {k: np.array(v, dtype=np.float32) for k, v in params.items()}
            self._key, self._keyframe_version = view, version
            self.keyframes += 1
            return body, view, True
        key = self._key
        diff = {k: np.asarray(v, dtype=np.float32) - key[k] for k, v in params.items()}
        tensors = tuple(encode_params(diff, codec))
        # The very float32 operation devices perform, so both sides hold the same bits.
        decoded = materialize(tensors)
        view = {k: np.add(key[k], decoded[k], dtype=np.float32) for k in key}
        envelope = ModelDeltaEnvelope(
            version=version,
            base_version=self._keyframe_version,
            created=time.time(),
            tensors=tensors,
        )
        self.deltas += 1
        return encode_model_delta(envelope), view, False
