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

from fedmq._fs import atomic_write
from fedmq._log import log_event
from fedmq.errors import PayloadTooLarge, TransportError, WireError
from fedmq.models import get_params, set_params
from fedmq.participant._config import ParticipantConfig
from fedmq.participant._modelsync import ModelView
from fedmq.participant._outbox import Outbox
from fedmq.participant._trainer import Trainer
from fedmq.tasks import DeviceData, Task
from fedmq.transport import ParticipantTransport
from fedmq.wire import EvalEnvelope, encode_eval, open_signed, seal, tensor_spec_of

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
    evaluated: int = 0  # evaluation reports sent
    eval_failed: int = 0  # the task's evaluate raised (logged with its traceback)
    last_metrics: dict[str, float] = field(default_factory=dict)  # of the last one


class Participant:
    """One device: trains ``task``'s model on ``data.train`` (its own data, never sent
    anywhere) and, every ``config.eval_every`` versions, scores the global model on
    ``data.held_out`` and sends the metrics (``fedmq.eval/1``).

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
        task: Task,
        data: DeviceData,
        *,
        train_slots: asyncio.Semaphore | None = None,
        rounds: bool = False,
    ) -> None:
        self.config = config
        self.stats = ParticipantStats()
        self._transport = transport
        self._task = task
        self._held_out = data.held_out
        self._slots = train_slots
        self._trainer = Trainer(
            participant_id=config.participant_id,
            task=task,
            data=data.train,
            seed=config.seed,
            codec=config.codec,
            error_feedback=config.error_feedback,
            signer=config.update_signer,
            clip_norm=config.clip_norm,
        )
        self._spec = tensor_spec_of(get_params(self._trainer.model))
        self._outbox = Outbox(config.state_dir / "outbox")
        self._load_feedback()
        self._eval_model = task.build_model(config.seed) if self._evaluates else None
        self._eval_arrived = asyncio.Event()
        # The newest report made, not yet sent: (version, metrics, sealed body). Sent by an
        # I/O task, so that going offline (detach) never leaves a publish on a closed link.
        self._report: tuple[int, dict[str, float], bytes] | None = None
        self._report_ready = asyncio.Event()
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

    @property
    def num_examples(self) -> int:
        """The device's training examples."""
        return self._trainer.num_examples

    @property
    def _evaluates(self) -> bool:
        return self.config.eval_every > 0 and len(self._held_out) > 0  # type: ignore[arg-type]

    def start(self, tg: asyncio.TaskGroup) -> None:
        """Start the device's three tasks in the process's TaskGroup."""
        self._tg = tg
        pid = self.config.participant_id
        self._tasks = [tg.create_task(self._train_forever(), name=f"{pid}:train")]
        if self._evaluates:
            self._tasks.append(tg.create_task(self._evaluate_forever(), name=f"{pid}:evaluate"))
        self._start_io()

    def _start_io(self) -> None:
        assert self._tg is not None
        pid = self.config.participant_id
        self._outbox_filled.set()  # publish whatever is pending (a previous run, offline time)
        self._io_tasks = [
            self._tg.create_task(self._receive_models(), name=f"{pid}:models"),
            self._tg.create_task(self._drain_outbox(), name=f"{pid}:outbox"),
        ]
        if self._evaluates:
            self._io_tasks.append(self._tg.create_task(self._send_reports(), name=f"{pid}:reports"))

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
                self._eval_arrived.set()

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
        """Train from ``base``; (seq, sealed update), or None (logged, counted) if the
        training diverged. Runs in a worker thread."""
        seq = self._outbox.next_seq
        body = self._trainer.step(version, base, seq, created=time.time())
        if body is None:
            self._count_skip("non_finite")
            return None
        self.stats.trained += 1
        self.stats.last_loss = self._trainer.last_loss
        return seq, body

    def _count_skip(self, reason: str) -> None:
        self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + 1

    async def _evaluate_forever(self) -> None:
        """Score every ``eval_every``-th version held on the device's held-out data and send
        the metrics; a version is scored when it is the first held at or past a multiple of
        ``eval_every`` (devices do not receive every version, so scores are grouped by the
        aggregator over a window of versions)."""
        every = self.config.eval_every
        done: int | None = None  # the last version scored
        while True:
            while self._latest is None or (
                done is not None and self._latest[0] // every <= done // every
            ):
                self._eval_arrived.clear()
                await self._eval_arrived.wait()
            version, params = self._latest
            done = version
            if not self._io_tasks:
                continue  # offline: a report on an old version is worth nothing later
            try:
                metrics, body = await asyncio.to_thread(self._make_report, version, params)
            except Exception as error:  # the task's evaluate (or a report no aggregator
                # would take, e.g. more than 16 metrics): loud, counted, then go on
                self.stats.eval_failed += 1
                log_event(
                    _log,
                    "evaluation_failed",
                    logging.ERROR,
                    exc_info=True,
                    participant=self.config.participant_id,
                    version=version,
                    error=f"{type(error).__name__}: {error}",
                )
                continue
            self._report = (version, metrics, body)  # the newest wins
            self._report_ready.set()

    async def _send_reports(self) -> None:
        """Publish the newest report made (an I/O task: cancelled by ``detach``)."""
        while True:
            await self._report_ready.wait()
            self._report_ready.clear()
            if self._report is None:
                continue
            version, metrics, body = self._report
            self._report = None
            try:
                await self._transport.publish_eval(body)
            except (PayloadTooLarge, TransportError) as error:
                log_event(_log, "eval_not_sent", logging.WARNING, version=version, error=str(error))
                continue
            self.stats.evaluated += 1
            self.stats.last_metrics = metrics
            log_event(
                _log,
                "evaluated",
                logging.DEBUG,
                participant=self.config.participant_id,
                version=version,
                metrics={k: round(v, 6) for k, v in metrics.items()},
            )

    def _make_report(self, version: int, params: Params) -> tuple[dict[str, float], bytes]:
        """The task's metrics of ``params`` on the held-out data, and the sealed report
        carrying them. In a worker thread."""
        assert self._eval_model is not None
        set_params(self._eval_model, params)
        metrics = self._task.score(self._eval_model, self._held_out)
        report = EvalEnvelope(
            participant=self.config.participant_id,
            version=version,
            num_examples=len(self._held_out),  # type: ignore[arg-type]
            metrics=metrics,
            created=time.time(),
        )
        return metrics, seal(encode_eval(report), self.config.update_signer)

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
        feedback = self._trainer.feedback
        if feedback is not None and path.exists():
            with np.load(path, allow_pickle=False) as data:
                feedback.load_state_dict({k: data[k] for k in data.files})

    def _save_feedback(self) -> None:
        feedback = self._trainer.feedback
        if feedback is None:
            return
        buffer = io.BytesIO()
        np.savez(buffer, **feedback.state_dict())  # type: ignore[arg-type]
        atomic_write(self.config.state_dir / "feedback.npz", buffer.getvalue())
