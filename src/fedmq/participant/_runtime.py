"""The device runtime: model in -> train -> delta -> encode -> outbox -> publish.

Three named tasks share a little state:
- ``models``: keeps the newest valid model the broker delivered;
- ``train``: trains on the newest model, writes the encoded delta to the outbox;
- ``outbox``: publishes pending updates in sequence order, removing each one
  only after the broker confirmed it.
A model arriving mid-training never touches the training in progress: the
finished update is tagged with the version it was trained from, and the
aggregator judges its staleness.

A training that goes wrong costs one update, never the device (nor the other devices
of a simulated fleet sharing its process): a NaN or infinite loss or delta (a model
or learning rate that diverged) is skipped with ``update_skipped reason=non_finite``,
any other exception with ``training_failed`` and its traceback; both are counted in
``ParticipantStats.skipped``, take no sequence number, and the device waits for a
newer model before it trains again.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fedmq._fs import atomic_write
from fedmq._log import log_event
from fedmq.codecs import ErrorFeedback, encode_params
from fedmq.errors import PayloadTooLarge, WireError
from fedmq.models import build_model, get_params, non_finite, set_params, train_local
from fedmq.participant._config import ParticipantConfig
from fedmq.participant._modelsync import ModelView
from fedmq.participant._outbox import Outbox
from fedmq.transport import ParticipantTransport
from fedmq.wire import UpdateEnvelope, encode_update, open_signed, seal, tensor_spec_of

__all__ = ["Participant", "ParticipantStats"]

_log = logging.getLogger("fedmq.participant")

Params = dict[str, np.ndarray]


@dataclass(kw_only=True)
class ParticipantStats:
    """Live counters of one device, owned by its event loop."""

    models_received: int = 0
    models_rejected: int = 0
    model_version: int | None = None
    trained: int = 0
    published: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    last_loss: float | None = None
    # Trainings that produced no update, by reason: "non_finite" (NaN/Inf loss or delta),
    # "error" (an exception, logged with its traceback).
    skipped: dict[str, int] = field(default_factory=dict)


class Participant:
    """One device: trains on ``x``/``y`` (its own data, never sent anywhere).

    ``train_slots`` (optional) caps how many participants of one process train
    at once, so a simulated fleet measures the protocol, not CPU contention.
    ``rounds``: train only when told to by ``train_round`` (synchronous rounds
    whose participants are picked from outside, as ``fedmq bench`` does).
    ``detach`` / ``attach`` take the device offline and back online: its
    connection really closes while training goes on and the outbox keeps what
    it finishes.
    """

    def __init__(
        self,
        config: ParticipantConfig,
        transport: ParticipantTransport,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        train_slots: asyncio.Semaphore | None = None,
        rounds: bool = False,
    ) -> None:
        self.config = config
        self.stats = ParticipantStats()
        self._transport = transport
        self._x = x  # [n, 1, 28, 28]
        self._y = y  # [n]
        self._slots = train_slots
        self._model = build_model(config.model)  # type: ignore[arg-type]
        self._spec = tensor_spec_of(get_params(self._model))
        self._outbox = Outbox(config.state_dir / "outbox")
        self._feedback = ErrorFeedback(config.codec) if config.error_feedback else None
        self._load_feedback()
        self._view = ModelView(self._spec, config.limits)
        self._rounds = rounds
        self._round: int | None = None  # the model version the next round trains on
        self._latest: tuple[int, Params] | None = None
        self._model_arrived = asyncio.Event()
        self._outbox_filled = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._io_tasks: list[asyncio.Task[None]] = []
        self._tg: asyncio.TaskGroup | None = None

    @property
    def next_seq(self) -> int:
        return self._outbox.next_seq

    @property
    def pending(self) -> int:
        """Updates in the outbox, not yet confirmed by the broker."""
        return len(self._outbox.pending())

    @property
    def model_view(self) -> ModelView:
        """The model held (keyframes and deltas applied, deltas skipped)."""
        return self._view

    @property
    def online(self) -> bool:
        return bool(self._io_tasks)

    def start(self, tg: asyncio.TaskGroup) -> None:
        """Start the device's three tasks in the process's TaskGroup."""
        self._tg = tg
        self._tasks = [
            tg.create_task(self._train_forever(), name=f"{self.config.participant_id}:train")
        ]
        self._start_io()

    def _start_io(self) -> None:
        assert self._tg is not None
        pid = self.config.participant_id
        self._outbox_filled.set()  # publish whatever is pending (a previous run, offline time)
        self._io_tasks = [
            self._tg.create_task(self._receive_models(), name=f"{pid}:models"),
            self._tg.create_task(self._drain_outbox(), name=f"{pid}:outbox"),
        ]

    async def detach(self) -> None:
        """Go offline: stop receiving models and publishing; training goes on.

        Returns once the transport is no longer used, so the caller may close
        it. A publish cut short stays in the outbox and is sent again later.
        """
        tasks, self._io_tasks = self._io_tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def attach(self, transport: ParticipantTransport) -> None:
        """Come back online through ``transport`` (already entered): the newest
        model arrives from the broker and the outbox is published."""
        if self._tg is None:
            raise RuntimeError("attach: start the participant first")
        if self._io_tasks:
            raise RuntimeError("attach: the participant is online; detach it first")
        self._transport = transport
        self._start_io()

    def train_round(self, version: int) -> None:
        """With ``rounds``: train once on model ``version`` (or newer) as soon as it is held."""
        self._round = version
        self._model_arrived.set()

    def stop(self) -> None:
        """Cancel the device's tasks (what is in the outbox stays there)."""
        for task in [*self._tasks, *self._io_tasks]:
            task.cancel()

    async def _receive_models(self) -> None:
        async for body in self._transport.models():
            # Bytes are counted once the message is handled, with the model view's count of
            # messages taken, so a reader never sees the bytes of a message not yet counted.
            try:
                accepted = await asyncio.to_thread(self._accept_model, body)
            except WireError as error:
                self.stats.bytes_down += len(body)
                self.stats.models_rejected += 1
                log_event(_log, "model_rejected", logging.WARNING, reason=error.reason.value)
                continue
            self.stats.bytes_down += len(body)
            if accepted is None:
                continue  # not newer, or a delta on a version not held (await a keyframe)
            version, params = accepted
            if self._latest is None or version > self._latest[0]:
                if self._latest is None:
                    log_event(
                        _log, "first_model", participant=self.config.participant_id, version=version
                    )
                self._latest = (version, params)
                self.stats.models_received += 1
                self.stats.model_version = version
                self._model_arrived.set()

    async def _train_forever(self) -> None:
        trained_version: int | None = None
        failed_version: int | None = None  # training on it gave no update: wait for a newer
        while True:
            while self._latest is None or (
                self._latest[0] == failed_version
                or (self.config.once_per_version and self._latest[0] == trained_version)
                or (self._rounds and (self._round is None or self._latest[0] < self._round))
            ):
                self._model_arrived.clear()
                await self._model_arrived.wait()
            # Take the newest model only once a training slot is ours, so a device
            # that queued for the CPU does not train from a model that aged meanwhile.
            async with self._slots or contextlib.nullcontext():
                version, base = self._latest
                self._round = None
                result = await self._train_guarded(version, base)
            trained_version = version
            if result is None:
                failed_version = version
                continue
            seq, body = result
            if self.config.publish_delay_s:
                await asyncio.sleep(self.config.publish_delay_s)
            await asyncio.to_thread(self._store, seq, body)
            self._outbox_filled.set()

    async def _train_guarded(self, version: int, base: Params) -> tuple[int, bytes] | None:
        """``_train_once`` in a worker thread; None (logged, counted) if it raised.

        Whatever goes wrong in one training must not end the device's task: in a
        simulated fleet that task shares a TaskGroup with every other device.
        """
        try:
            return await asyncio.to_thread(self._train_once, version, base)
        except Exception as error:  # a bug or a bad input: loud, counted, then the next model
            self._count_skip("error")
            log_event(
                _log,
                "training_failed",
                logging.ERROR,
                exc_info=True,
                participant=self.config.participant_id,
                base_version=version,
                error=f"{type(error).__name__}: {error}",
            )
            return None

    def _train_once(self, version: int, base: Params) -> tuple[int, bytes] | None:
        """Train from ``base``; return (seq, encoded update), or None (logged, counted) if
        the loss or the delta is not finite. Runs in a worker thread."""
        seq = self._outbox.next_seq
        set_params(self._model, base)
        loss = train_local(
            self._model,
            self._x,
            self._y,
            epochs=self.config.epochs,
            batch_size=self.config.batch_size,
            lr=self.config.lr,
            seed=self.config.seed * 1_000_003 + seq,
        )
        local = get_params(self._model)
        delta = {name: local[name] - base[name] for name in base}
        bad = non_finite(delta)
        if bad or not np.isfinite(loss):
            # Checked here, before the codec or the error-feedback residual sees it: a
            # diverged training is the device's news, not an encoder error.
            self._count_skip("non_finite")
            log_event(
                _log,
                "update_skipped",
                logging.WARNING,
                participant=self.config.participant_id,
                reason="non_finite",
                base_version=version,
                loss=loss,
                tensors=bad[:5],
            )
            return None
        rng = np.random.default_rng([self.config.seed, seq])
        if self._feedback is not None:
            tensors = self._feedback.encode(delta, rng)
        else:
            tensors = encode_params(delta, self.config.codec, rng)
        envelope = UpdateEnvelope(
            participant=self.config.participant_id,
            seq=seq,
            base_version=version,
            num_examples=len(self._y),
            loss=loss,
            created=time.time(),
            tensors=tuple(tensors),
        )
        self.stats.trained += 1
        self.stats.last_loss = loss
        return seq, seal(encode_update(envelope), self.config.update_signer)

    def _count_skip(self, reason: str) -> None:
        self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + 1

    def _accept_model(self, body: bytes) -> tuple[int, Params] | None:
        """Verify (when a model key is configured) and take a model. In a worker thread."""
        inner, _ = open_signed(body, verifier=self.config.model_verifier, limits=self.config.limits)
        return self._view.accept(inner)

    def _store(self, seq: int, body: bytes) -> None:
        self._outbox.put(seq, body)
        self._save_feedback()

    async def _drain_outbox(self) -> None:
        while True:
            await self._outbox_filled.wait()
            self._outbox_filled.clear()
            for seq in self._outbox.pending():
                body = self._outbox.read(seq)
                try:
                    await self._transport.publish_update(body)
                except PayloadTooLarge as error:
                    # Retrying cannot help: the broker will never take it. Say so once.
                    log_event(_log, "update_too_large", logging.ERROR, seq=seq, error=str(error))
                    self._outbox.remove(seq)
                    continue
                self._outbox.remove(seq)
                self.stats.published += 1
                self.stats.bytes_up += len(body)
                log_event(
                    _log,
                    "published",
                    logging.DEBUG,
                    participant=self.config.participant_id,
                    seq=seq,
                    bytes=len(body),
                )

    # The error-feedback residual is device state like the outbox: it must
    # survive a reboot, or what the codec dropped would be lost for good.
    def _load_feedback(self) -> None:
        path = self.config.state_dir / "feedback.npz"
        if self._feedback is not None and path.exists():
            with np.load(path, allow_pickle=False) as data:
                self._feedback.load_state_dict({k: data[k] for k in data.files})

    def _save_feedback(self) -> None:
        if self._feedback is None:
            return
        buffer = io.BytesIO()
        np.savez(buffer, **self._feedback.state_dict())  # type: ignore[arg-type]
        atomic_write(self.config.state_dir / "feedback.npz", buffer.getvalue())
