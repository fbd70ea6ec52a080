"""One device's local step, with no I/O: base model -> train -> delta -> encode -> update.

``fedmq participant``, the demo and bench fleets (through ``Participant``) and the
virtual clock all call ``Trainer.step``: one train-and-encode path, so a simulation
trains, clips, encodes and carries error feedback exactly as a device does.

Clipping (``clip_norm``) comes before the codec, and the error-feedback residual
keeps only the codec's error, never what clipping removed (the DP-FedAvg rule,
docs/privacy.md): carried over, the clipped-off mass would make each update depend
on earlier rounds' data beyond the bound.

A malicious device of a simulated fleet (``fedmq bench --byzantine``) is an honest
``Trainer`` given an ``Attack`` (the object lives in fedmq/sim/_attacks.py; nothing
outside the simulations makes one): it may change the training data, and it changes
the delta after training, before the codec. It does not clip (a device that attacks does
not follow that rule either): the aggregator's own bound and the robust rules must stop it.

A training that diverged (a NaN or infinite loss or delta) gives no update: it is
logged as ``update_skipped reason=non_finite`` and ``step`` returns None, before the
codec or the error-feedback residual sees it.

Privacy on the device (fedmq.privacy, docs/privacy.md), at most one of:

- ``dp_sgd``: the local training is Opacus's DP-SGD instead of the task's loop;
- ``local_dp``: the delta is clipped and noised here, before the codec (so the
  error-feedback residual holds only the codec's error on the noisy delta).

Either way the device's accountant travels with every update (``privacy``, wire key
9) and ``step`` refuses to train (``PrivacyBudgetSpent``) once the next update would
exceed the budget. Their noise and Poisson sampling come from OS entropy, never from
``seed``: noise anyone can recompute protects nothing. With neither, nothing changes:
no import of Opacus, no extra work.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from torch.utils.data import Dataset

from fedmq._log import log_event
from fedmq.codecs import CodecConfig, ErrorFeedback, encode_params
from fedmq.errors import ConfigError, FedmqError
from fedmq.models import get_params, non_finite, set_params
from fedmq.privacy import DPSGD, DPSGDConfig, LocalDP, LocalDPConfig, clip
from fedmq.tasks import Task
from fedmq.wire import PrivacySpend, Signer, UpdateEnvelope, encode_update, seal

__all__ = ["Attack", "PrivacyBudgetSpent", "Trainer"]


class PrivacyBudgetSpent(FedmqError):
    """The device's next update would spend more than its privacy budget."""


_log = logging.getLogger("fedmq.participant")

Params = dict[str, np.ndarray]


class Attack(Protocol):
    """A bench attack (fedmq/sim/_attacks.py): what a malicious device changes."""

    def poison_data(self, data: Dataset[Any]) -> Dataset[Any]:
        """The data the device trains on instead of its own."""
        ...

    def poison_delta(self, delta: Params, seq: int) -> Params:
        """The delta the device sends instead of its honest one (update ``seq``)."""
        ...


class Trainer:
    """Trains ``task``'s model on ``data`` (the device's own) and encodes the delta.

    ``error_feedback``: keep what a lossy codec drops and send it later (codecs/_feedback);
    a lossless codec (float32) drops nothing, so it has no residual to keep.
    ``signer``: seal every update with this device's key. ``clip_norm``: clip every delta
    to this L2 norm before the codec (None: off). ``attack``: simulations only, a
    malicious device (see the module docstring). Not thread-safe: one step at a time
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
        attack: Attack | None = None,
        dp_sgd: DPSGDConfig | None = None,
        local_dp: LocalDPConfig | None = None,
    ) -> None:
        self.participant_id = participant_id
        self.task = task
        self.attack = attack
        self.data = data if attack is None else attack.poison_data(data)
        self.num_examples = len(data)  # type: ignore[arg-type]  # a map-style dataset
        self.seed = seed
        self.codec = codec
        self.signer = signer
        self.clip_norm = clip_norm
        lossy = codec.name != "float32"
        self.feedback = ErrorFeedback(codec) if error_feedback and lossy else None
        self.model = task.build_model(seed)
        self.last_loss: float | None = None
        self.privacy: DPSGD | LocalDP | None = None
        if dp_sgd is not None and local_dp is not None:
            raise ConfigError("privacy: choose one of dp-sgd and local-dp on a device")
        if dp_sgd is not None:
            if task.train is not None:
                raise ConfigError(
                    f"dp-sgd: task {task.name!r} has its own train function; DP-SGD replaces"
                    " fedmq's default loop only (Task.training)"
                )
            self.privacy = DPSGD(
                dp_sgd, num_examples=self.num_examples, batch_size=task.training.batch_size
            )
        elif local_dp is not None:
            self.privacy = LocalDP(local_dp)

    def can_train(self, pending: int = 0) -> bool:
        """Whether one more update, after ``pending`` trained and not yet accounted,
        stays within the privacy budget (always, without DP or without a budget)."""
        if isinstance(self.privacy, DPSGD):
            return self.privacy.fits(self.task.training.epochs * (pending + 1))
        if isinstance(self.privacy, LocalDP):
            return self.privacy.fits(pending + 1)
        return True

    def charge_unsent(self) -> None:
        """Account one update released without being computed (the virtual clock drops a
        too-stale update uncomputed; the real device would have trained and sent it)."""
        if isinstance(self.privacy, DPSGD):
            self.privacy.charge(self.task.training.epochs)
        elif isinstance(self.privacy, LocalDP):
            self.privacy.charge(1)

    @property
    def spend(self) -> PrivacySpend | None:
        """The device's privacy spend so far (None without DP)."""
        if self.privacy is None:
            return None
        return PrivacySpend(
            mechanism=self.privacy.mechanism,
            epsilon=self.privacy.epsilon,
            delta=self.privacy.delta,
        )

    def step(
        self, version: int, base: Mapping[str, np.ndarray], seq: int, created: float
    ) -> bytes | None:
        """The update ``seq`` trained from model ``version`` (``base``): a sealed
        ``fedmq.update/1``, or None if the training diverged (logged).

        ``PrivacyBudgetSpent`` (nothing trained) if the update would exceed the budget."""
        if self.privacy is not None and not self.can_train():
            raise PrivacyBudgetSpent(
                f"{self.privacy.mechanism}: epsilon {self.privacy.epsilon:.4g} spent of"
                f" {self.privacy.budget}; the next update would exceed it"
            )
        set_params(self.model, base)
        if isinstance(self.privacy, DPSGD):
            loss = self.privacy.train(
                self.model, self.data, self.task.training, seed=secrets.randbits(63)
            )
        else:
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
        if self.attack is not None:
            delta = self.attack.poison_delta(delta, seq)
        elif self.clip_norm is not None:
            delta, _ = clip(delta, self.clip_norm)
        if isinstance(self.privacy, LocalDP):
            delta = self.privacy.privatize(delta, np.random.default_rng())  # OS entropy
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
            privacy=self.spend,
        )
        self.last_loss = loss
        return seal(encode_update(envelope), self.signer)
