"""The aggregator service: consume -> decode -> admit -> strategy -> publish -> ack.

Updates are handled one at a time in arrival order, so the model version, the
per-participant sequence numbers and the strategy state change in one place.
The CPU work of each step (decoding, the strategy's maths, encoding the model,
evaluation) runs in worker threads so the event loop keeps serving the broker.
An update is acked only after it has been applied or rejected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np

from fedmq._log import log_event
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

    @property
    def version(self) -> int:
        return self._version

    @property
    def params(self) -> Params:
        return self._params

    async def run(self, tg: asyncio.TaskGroup) -> None:
        """Publish the current model, then apply updates until the transport closes.

        Evaluations are started as named tasks in ``tg`` (the process's TaskGroup).
        """
        self._tg = tg
        await self._publish()
        self._request_eval()
        async for delivery in self._transport.updates():
            await self._handle(delivery)

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
            await delivery.reject(rejection)
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
        await delivery.ack()

    def _decode(self, body: bytes) -> tuple[UpdateEnvelope, Params]:
        update = decode_update(body, spec=self._spec, limits=self.config.limits)
        return update, materialize(update.tensors)

    def _admit(self, update: UpdateEnvelope, delta: Params, hint: str | None) -> Contribution:
        """Policy checks on a well-formed update; raises RejectedUpdate."""
        pid = update.participant
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
