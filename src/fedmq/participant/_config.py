"""A participant's configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedmq.codecs import CodecConfig
from fedmq.errors import ConfigError
from fedmq.wire import Signer, Verifier, WireLimits, check_participant_id, key_owner

__all__ = ["ParticipantConfig"]


@dataclass(frozen=True, kw_only=True)
class ParticipantConfig:
    """How one device trains and what it sends.

    ``state_dir`` holds the outbox, the sequence counter and the error-feedback
    residual; keep it on persistent storage so a reboot loses nothing.
    ``once_per_version``: train at most once per model version (synchronous
    FedAvg rounds); otherwise train continuously on the newest model held.
    ``publish_delay_s``: wait this long after training before the update is
    handed to the outbox (simulates a slow chip or radio in benchmarks).
    ``eval_every``: score every N-th model version on the device's held-out data and send
    the metrics (``fedmq.eval/1``); 0 = never. Training settings (epochs, batch size,
    learning rate...) are the task's (``Task.training``).
    ``update_signer``: if set, every update is signed with this device's key (one it
    owns: ``<id>`` or ``<id>.<label>``); ``model_verifier``: if set, only models signed
    by one of its keys (the aggregator's) are trained on.
    ``clip_norm``: clip every delta to this L2 norm before the codec (None: off;
    docs/privacy.md).
    """

    participant_id: str
    state_dir: Path
    seed: int = 0
    codec: CodecConfig = field(default_factory=CodecConfig)
    error_feedback: bool = True
    once_per_version: bool = False
    publish_delay_s: float = 0.0
    eval_every: int = 10
    limits: WireLimits = field(default_factory=WireLimits)
    update_signer: Signer | None = None
    model_verifier: Verifier | None = None
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        pid = check_participant_id(self.participant_id, "id")
        signer = self.update_signer
        if signer is not None and key_owner(signer.key_id) != pid:
            raise ConfigError(f"signing_key: key {signer.key_id!r} does not belong to {pid!r}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every: {self.eval_every} must be >= 0 (0: never)")
        if self.clip_norm is not None and not (0 < self.clip_norm < float("inf")):
            raise ConfigError(f"clip_norm: {self.clip_norm} must be > 0 and finite")
        if self.publish_delay_s < 0:
            raise ConfigError(f"publish_delay: {self.publish_delay_s} must be >= 0")
