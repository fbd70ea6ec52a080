"""One device's local step, with no I/O: base model -> train -> delta -> encode -> update.

``fedmq participant``, the demo and bench fleets (through ``Participant``) and the
virtual clock all call ``Trainer.step``: one train-and-encode path, so a simulation
trains, clips, encodes and carries error feedback exactly as a device does.

Clipping (``clip_norm``) comes before the codec, and the error-feedback residual
keeps only the codec's error, never what clipping removed (the DP-FedAvg rule,
docs/privacy.md): carried over, the clipped-off mass would make each update depend
on earlier rounds' data beyond the bound.

A training that diverged (a NaN or infinite loss or delta) gives no update: it is
logged as ``update_skipped reason=non_finite`` and ``step`` returns None, before the
codec or the error-feedback residual sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from fedmq._log import log_event
from fedmq.codecs import CodecConfig, ErrorFeedback, encode_params
from fedmq.models import get_params, non_finite, set_params
from fedmq.privacy import clip
from fedmq.tasks import Task
from fedmq.wire import Signer, UpdateEnvelope, encode_update, seal

__all__ = ["Trainer"]

_log = logging.getLogger("fedmq.participant")

Params = dict[str, np.ndarray]


class Trainer:
    """Trains ``task``'s model on ``data`` (the device's own) and encodes the delta.

    ``error_feedback``: keep what a lossy codec drops and send it later (codecs/_feedback);
    a lossless codec (float32) drops nothing, so it has no residual to keep.
    ``signer``: seal every update with this device's key. ``clip_norm``: clip every delta
    to this L2 norm before the codec (None: off). Not thread-safe: one step at a time
    (a device trains once at a time).
    """

    def __init__(
        self,
        *,
        participant_id: str,
        task: Task,
        data: Dataset[Any],
        seed: int,
        codec: CodecConfig,
        error_feedback: bool = True,
        signer: Signer | None = None,
        clip_norm: float | None = None,
    ) -> None:
        self.participant_id = participant_id
        self.task = task
        self.data = data
        self.num_examples = len(data)  # type: ignore[arg-type]  # a map-style dataset
        self.seed = seed
        self.codec = codec
        self.signer = signer
        self.clip_norm = clip_norm
        lossy = codec.name != "float32"
        self.feedback = ErrorFeedback(codec) if error_feedback and lossy else None
        self.model = task.build_model(seed)
        self.last_loss: float | None = None

    def step(
        self, version: int, base: Mapping[str, np.ndarray], seq: int, created: float
    ) -> bytes | None:
        """The update ``seq`` trained from model ``version`` (``base``): a sealed
        ``fedmq.update/1``, or None if the training diverged (logged)."""
        set_params(self.model, base)
        loss = self.task.train_model(self.model, self.data, seed=self.seed * 1_000_003 + seq)
        local = get_params(self.model)
        delta = {name: local[name] - base[name] for name in base}
        bad = non_finite(delta)
        if bad or not np.isfinite(loss):
            log_event(
                _log,
                "update_skipped",
                logging.WARNING,
                participant=self.participant_id,
                reason="non_finite",
                base_version=version,
                loss=loss,
                tensors=bad[:5],
            )
            return None
        if self.clip_norm is not None:
            delta, _ = clip(delta, self.clip_norm)
        rng = np.random.default_rng([self.seed, seq])
        if self.feedback is not None:
            tensors = self.feedback.encode(delta, rng)
        else:
            tensors = encode_params(delta, self.codec, rng)
        envelope = UpdateEnvelope(
            participant=self.participant_id,
            seq=seq,
            base_version=version,
            num_examples=self.num_examples,
            loss=loss,
            created=created,
            tensors=tuple(tensors),
        )
        self.last_loss = loss
        return seal(encode_update(envelope), self.signer)
