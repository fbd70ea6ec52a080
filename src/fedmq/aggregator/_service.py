"""The aggregator service: consume -> decode -> admit -> strategy -> publish -> settle.

Updates are handled one at a time in arrival order, so the model version, the
per-participant sequence numbers and the strategy state change in one place.
The CPU work of each step (decoding, the strategy's maths, encoding the model,
evaluation, checkpointing) runs in worker threads so the event loop keeps
serving the broker.

Exactly-once apply: with a checkpoint directory, an update is settled at the
broker (acked, or rejected and dead-lettered) only after a durable checkpoint
covers its effect. A crash before that makes the broker redeliver it to a
service restored from the previous checkpoint, which did not include it; a
redelivery of an update the checkpoint did include is refused as a duplicate by
its (participant, sequence number).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np

from fedmq._log import log_event
from fedmq.aggregator._checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedmq.aggregator._config import AggregatorConfig
from fedmq.aggregator._stats import AccuracyPoint, AggregatorStats
from fedmq.codecs import CodecConfig, encode_params
from fedmq.errors import Reason, RejectedUpdate, Rejection
from fedmq.strategies import Contribution, make_strategy
from fedmq.transport import AggregatorTransport, Delivery
from fedmq.wire import (
    ModelEnvelope,
    UpdateEnvelope,
    decode_update,
    encode_model,
    materialize,
    tensor_spec_of,
)

__all__ = ["Aggregator"]

_log = logging.getLogger("fedmq.aggregator")

Params = dict[str, np.ndarray]
Evaluate = Callable[[Mapping[str, np.ndarray]], tuple[float, float]]


class Aggregator:
    """Applies updates from ``transport`` to a global model and republishes it.

    ``evaluate`` (optional) scores a parameter set on a held-out set; it is
    called in a worker thread every ``config.eval_every`` versions.
    """

    def __init__(
        self,
        config: AggregatorConfig,
        transport: AggregatorTransport,
        initial: Mapping[str, np.ndarray],
        *,
        evaluate: Evaluate | None = None,
        stats: AggregatorStats | None = None,
    ) -> None:
        self.config = config
        self.stats = stats or AggregatorStats()
        self._transport = transport
        self._strategy = make_strategy(config.strategy)
        self._state = self._strategy.init_state()
        self._params: Params = {k: np.array(v, dtype=np.float32) for k, v in initial.items()}
        self._spec = tensor_spec_of(self._params)
        self._version = 0
        # Published versions a participant may still be training from (FedAsync
        # needs the base model to form x_local = base + delta).
        self._history: OrderedDict[int, Params] = OrderedDict()
        self._last_seq: dict[str, int] = {}
        self._evaluate = evaluate
        self._eval_task: asyncio.Task[None] | None = None
        self._eval_wanted: int | None = None
        # Handled but not yet settled at the broker: (delivery, rejection or None, (pid, seq)).
        self._unsettled: list[tuple[Delivery, Rejection | None, tuple[str, int] | None]] = []
        self._commit_lock = asyncio.Lock()
        self.resumed_from: int | None = None
        if config.checkpoint_dir is not None:
            checkpoint = load_checkpoint(config.checkpoint_dir)
            if checkpoint is not None:
                self._restore(checkpoint)

    def _restore(self, checkpoint: Checkpoint) -> None:
        self._version = checkpoint.version
        self._params = dict(checkpoint.params)
        self._history = OrderedDict(sorted((v, dict(p)) for v, p in checkpoint.history.items()))
        self._state = checkpoint.strategy_state
        self._last_seq = dict(checkpoint.last_seq)
        counters = checkpoint.counters
        self.stats.version = self._version
        self.stats.received = counters.get("received", 0)
        self.stats.applied = counters.get("applied", 0)
        self.stats.rejected.update(counters.get("rejected", {}))
        self.stats.staleness.update({int(k): n for k, n in counters.get("staleness", {}).items()})
        self.stats.buffered = self._strategy.pending(self._state)
        self.resumed_from = self._version
        log_event(_log, "resumed", version=self._version, participants=len(self._last_seq))

    @property
    def version(self) -> int:
        return self._version

    @property
    def params(self) -> Params:
        return self._params

    async def run(self, tg: asyncio.TaskGroup) -> None:
        """Publish the current model, then apply updates until cancelled.

        Evaluations and the checkpoint timer run as named tasks in ``tg`` (the
        process's TaskGroup). On cancellation (SIGTERM, Ctrl-C) the update in
        hand is finished, a final checkpoint is written and everything handled
        is settled at the broker, within ``shutdown_timeout_s``.
        """
        self._tg = tg
        await self._publish()
        self._request_eval()
        timer = None
        if self.config.checkpoint_dir is not None:
            timer = tg.create_task(self._commit_periodically(), name="checkpoint")
        handling: asyncio.Future[None] | None = None
        try:
            async for delivery in self._transport.updates():
                handling = asyncio.ensure_future(self._handle(delivery))
                await asyncio.shield(handling)
        finally:
            if timer is not None:
                timer.cancel()
            async with asyncio.timeout(self.config.shutdown_timeout_s):
                if handling is not None:
                    await handling  # finish the apply in hand: never half of one
                await self._commit()
            log_event(_log, "stopped", version=self._version)

    async def _handle(self, delivery: Delivery) -> None:
        body = delivery.body
        self.stats.received += 1
        self.stats.bytes_in += len(body)
        try:
            update, delta = await asyncio.to_thread(self._decode, body)
            contribution = self._admit(update, delta, delivery.participant_hint)
            new_params, self._state = await asyncio.to_thread(
                self._strategy.step, self._params, self._state, contribution
            )
        except Rejection as rejection:
            self.stats.rejected[rejection.reason.value] += 1
            log_event(
                _log,
                "rejected",
                logging.WARNING,
                participant=delivery.participant_hint,
                reason=rejection.reason.value,
                detail=rejection.detail,
            )
            await self._settle_later(delivery, rejection, None)
            return
        self._last_seq[update.participant] = update.seq
        self.stats.applied += 1
        self.stats.staleness[contribution.staleness] += 1
        self.stats.participants.add(update.participant)
        self.stats.buffered = self._strategy.pending(self._state)
        log_event(
            _log,
            "accepted",
            logging.DEBUG,
            participant=update.participant,
            seq=update.seq,
            base=update.base_version,
            staleness=contribution.staleness,
            loss=round(update.loss, 4),
        )
        if new_params is not None:
            await self._advance(new_params)
        await self._settle_later(delivery, None, (update.participant, update.seq))

    async def _settle_later(
        self, delivery: Delivery, rejection: Rejection | None, applied: tuple[str, int] | None
    ) -> None:
        self._unsettled.append((delivery, rejection, applied))
        if (
            self.config.checkpoint_dir is None
            or len(self._unsettled) >= self.config.checkpoint_every
        ):
            await self._commit()

    async def _commit_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_interval_s)
            if self._unsettled:
                await self._commit()

    async def _commit(self) -> None:
        """Checkpoint (if configured), then settle every handled delivery at the broker."""
        async with self._commit_lock:
            # Snapshot and take the batch with no await in between: both describe the same state.
            batch, self._unsettled = self._unsettled, []
            if not batch:
                return
            if self.config.checkpoint_dir is not None:
                await asyncio.to_thread(
                    save_checkpoint, self.config.checkpoint_dir, self._snapshot()
                )
            applied: dict[str, list[int]] = {}
            for _, _, entry in batch:
                if entry is not None:
                    applied.setdefault(entry[0], []).append(entry[1])
            # The audit trail of exactly-once apply: these are now durable.
            log_event(
                _log,
                "committed",
                logging.DEBUG,
                version=self._version,
                applied=applied,
                rejected=sum(1 for _, r, _ in batch if r is not None),
            )
            for delivery, rejection, _ in batch:
                if rejection is None:
                    await delivery.ack()
                else:
                    await delivery.reject(rejection)

    def _snapshot(self) -> Checkpoint:
        return Checkpoint(
            version=self._version,
            params=self._params,
            history=dict(self._history),
            strategy_state=self._state,
            last_seq=dict(self._last_seq),
            counters={
                "received": self.stats.received,
                "applied": self.stats.applied,
                "rejected": dict(self.stats.rejected),
                "staleness": {str(k): n for k, n in self.stats.staleness.items()},
            },
        )

    def _decode(self, body: bytes) -> tuple[UpdateEnvelope, Params]:
        update = decode_update(body, spec=self._spec, limits=self.config.limits)
        return update, materialize(update.tensors)

    def _admit(self, update: UpdateEnvelope, delta: Params, hint: str | None) -> Contribution:
        """Policy checks on a well-formed update; raises RejectedUpdate."""
        pid = update.participant
        allowed = self.config.allowed_participants
        if allowed is not None and pid not in allowed:
            raise RejectedUpdate(Reason.UNKNOWN_PARTICIPANT, f"{pid!r} is not on the allow-list")
        if hint is not None and hint != pid:
            raise RejectedUpdate(
                Reason.PARTICIPANT_MISMATCH, f"envelope says {pid!r}, routed as {hint!r}"
            )
        last = self._last_seq.get(pid)
        if last is not None and update.seq <= last:
            raise RejectedUpdate(Reason.DUPLICATE, f"{pid} seq {update.seq} <= applied {last}")
        staleness = self._version - update.base_version
        if staleness < 0:
            raise RejectedUpdate(
                Reason.FUTURE_BASE, f"base {update.base_version} > current {self._version}"
            )
        if staleness > self._strategy.max_staleness:
            raise RejectedUpdate(
                Reason.TOO_STALE, f"staleness {staleness} > {self._strategy.max_staleness}"
            )
        bound = self.config.max_update_norm
        if bound is not None:
            norm = float(np.sqrt(sum(float(np.vdot(d, d)) for d in delta.values())))
            if norm > bound:
                raise RejectedUpdate(Reason.NORM_BOUND, f"L2 norm {norm:.4g} > {bound:.4g}")
        base = None
        if self._strategy.needs_base:
            base = self._history.get(update.base_version)
            if base is None:
                raise RejectedUpdate(
                    Reason.TOO_STALE, f"base version {update.base_version} is no longer held"
                )
        return Contribution(
            delta=delta, staleness=staleness, num_examples=update.num_examples, base=base
        )

    async def _advance(self, new_params: Params) -> None:
        self._params = new_params
        self._version += 1
        self.stats.version = self._version
        if self._version % self.config.publish_every == 0:
            await self._publish()
        if self.config.eval_every and self._version % self.config.eval_every == 0:
            self._request_eval()

    async def _publish(self) -> None:
        version, params = self._version, self._params
        body = await asyncio.to_thread(_encode_model, version, params)
        await self._transport.publish_model(body, version=version)
        self._history[version] = params
        while self._history and next(iter(self._history)) < version - self._strategy.max_staleness:
            self._history.popitem(last=False)
        self.stats.models_published += 1
        self.stats.bytes_out += len(body)
        log_event(_log, "published", logging.DEBUG, version=version, bytes=len(body))

    def _request_eval(self) -> None:
        """Evaluate the current model soon; at most one evaluation runs, the latest wins."""
        if self._evaluate is None:
            return
        self._eval_wanted = self._version
        if self._eval_task is None or self._eval_task.done():
            self._eval_task = self._tg.create_task(self._eval_loop(), name="evaluate")

    async def _eval_loop(self) -> None:
        assert self._evaluate is not None
        while self._eval_wanted is not None:
            version, params, applied = self._version, self._params, self.stats.applied
            self._eval_wanted = None
            accuracy, loss = await asyncio.to_thread(self._evaluate, params)
            point = AccuracyPoint(
                elapsed_s=self.stats.elapsed_s,
                version=version,
                applied=applied,
                accuracy=accuracy,
                loss=loss,
            )
            self.stats.accuracy.append(point)
            log_event(_log, "evaluated", version=version, accuracy=round(accuracy, 4))


def _encode_model(version: int, params: Mapping[str, np.ndarray]) -> bytes:
    # Models go out in full float32: the global model keeps full precision.
    tensors = encode_params(params, CodecConfig(name="float32"))
    return encode_model(ModelEnvelope(version=version, created=time.time(), tensors=tuple(tensors)))
