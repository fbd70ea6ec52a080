"""The aggregator service: consume -> decode -> admit -> strategy -> publish -> settle.

Updates are applied one at a time in arrival order, so the model version, the
per-participant sequence numbers and the strategy state change in one place.
The CPU work of each step (decoding, the strategy's maths when it makes a new
model, encoding the model, evaluation, checkpointing) runs in worker threads so
the event loop keeps serving the broker; what has arrived is decoded in batches,
one thread round trip per batch.

Exactly-once apply: with a checkpoint directory, an update is settled at the
broker (acked, or rejected and dead-lettered) only after a durable checkpoint
covers its effect. A crash before that makes the broker redeliver it to a
service restored from the previous checkpoint, which did not include it; a
redelivery of an update the checkpoint did include is refused as a duplicate by
its (participant, sequence number).

Versions: with a checkpoint directory, every model version is durable before it is
published (_versions.py). A restarted service knows every version a device can hold,
applies updates based on any of them, and numbers its next model above all of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedmq._log import log_event
from fedmq.aggregator._admit import Decoded, admit, checked_step, decode, finite
from fedmq.aggregator._bounds import UpdateBounds
from fedmq.aggregator._checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_privacy_ledger,
    save_checkpoint,
    save_privacy_ledger,
)
from fedmq.aggregator._config import AggregatorConfig
from fedmq.aggregator._downlink import Downlink
from fedmq.aggregator._evals import serve_evals
from fedmq.aggregator._fedeval import FederatedEval
from fedmq.aggregator._health import CollapseWatch, watch_evaluation
from fedmq.aggregator._stats import AggregatorStats, EvalPoint
from fedmq.aggregator._tuning import retuned, serve_controls
from fedmq.aggregator._versions import VersionStore
from fedmq.codecs import CodecConfig, encode_params
from fedmq.errors import ConfigError, Rejection
from fedmq.privacy import ClientPrivacy, newest_state
from fedmq.strategies import (
    Contribution,
    Delta,
    Strategy,
    StrategyConfig,
    changes,
    flush_due,
    make_strategy,
    strategy_from_dict,
    strategy_to_dict,
)
from fedmq.tasks import Metric
from fedmq.transport import AggregatorTransport, Delivery
from fedmq.wire import (
    ModelEnvelope,
    UpdateEnvelope,
    encode_model,
    tensor_spec_of,
)

__all__ = ["Aggregator"]

_log = logging.getLogger("fedmq.aggregator")

Params = dict[str, np.ndarray]
Evaluate = Callable[[Mapping[str, np.ndarray]], Mapping[str, float]]


class Aggregator:
    """Applies updates from ``transport`` to a global model and republishes it.

    ``evaluate`` (optional) scores a parameter set on the aggregator's own held-out set
    (the task's named metrics); it is called in a worker thread every
    ``config.eval_every`` versions. ``target``: the task's target metric, which the
    collapse watch and stop rules read. The devices' own evaluation reports are taken
    whether or not there is a central set (aggregator/_evals.py).
    """

    def __init__(
        self,
        config: AggregatorConfig,
        transport: AggregatorTransport,
        initial: Mapping[str, np.ndarray],
        *,
        evaluate: Evaluate | None = None,
        target: Metric | None = None,
        stats: AggregatorStats | None = None,
    ) -> None:
        self.config = config
        self.stats = stats or AggregatorStats()
        if target is not None:
            self.stats.target = target
            self.stats.health = CollapseWatch(target, self.stats.health.config)
        self.fed_eval = FederatedEval(config.fed_eval)
        self._transport = transport
        # Client-level DP (privacy/_central.py): its participation rules in admit, its
        # Combine in FedBuff, its accountant checkpointed. Rebuilt from the checkpoint.
        self._privacy = self._new_privacy(config, None)
        self._budget_spent = False  # the next server step would exceed the epsilon budget
        self._inbox: asyncio.Queue[Delivery | None] | None = None
        self._strategy = self._make_strategy(config.strategy)
        self._state = self._strategy.init_state()
        # Live tuning (_tuning.py): the strategy configuration started with, and the one
        # an operator put in force since (checkpointed; it wins over the command line).
        self._initial_strategy = config.strategy
        self._tuned: StrategyConfig | None = None
        self._params: Params = {k: np.array(v, dtype=np.float32) for k, v in initial.items()}
        self._spec = tensor_spec_of(self._params)
        self._version = 0
        self._downlink = Downlink(config.downlink, _encode_model)
        # A synchronous round closed from outside: (version, participants in it).
        self._round: tuple[int, int] | None = None
        # Published versions a participant may still be training from, as devices hold
        # them (the downlink view): FedAsync needs the base to form x_local = base + delta.
        self._history: OrderedDict[int, Params] = OrderedDict()
        self._last_seq: dict[str, int] = {}
        self._bounds = UpdateBounds(config.bounds)
        self._evaluate = evaluate
        self._eval_task: asyncio.Task[None] | None = None
        self._publish_task: asyncio.Task[None] | None = None
        self._publish_wanted = False
        self._stopping = False  # run() was cancelled: apply nothing more
        self._last_publish = -float("inf")  # time.monotonic() of the last publish
        self._eval_wanted: int | None = None
        # Handled but not yet settled at the broker: (delivery, rejection or None, (pid, seq)).
        self._unsettled: list[tuple[Delivery, Rejection | None, tuple[str, int] | None]] = []
        self._commit_lock = asyncio.Lock()
        # Held while one update is applied: a timer checkpoint never snapshots half of one.
        self._apply_lock = asyncio.Lock()
        # Checkpoints written so far, carried across restarts: numbers the audit trail.
        self._commits = 0
        self._last_applied: dict[str, list[int]] = {}
        # ``issued`` of the last signed control command admitted: replays are refused.
        self.control_issued = 0.0
        self.resumed_from: int | None = None
        self._versions: VersionStore | None = None
        if config.checkpoint_dir is not None:
            self._versions = VersionStore(config.checkpoint_dir)
            checkpoint = load_checkpoint(config.checkpoint_dir)
            if checkpoint is not None:
                self._restore(checkpoint)
            elif config.privacy is not None:  # steps taken before any checkpoint was written
                ledger = load_privacy_ledger(config.checkpoint_dir)
                self._privacy = self._new_privacy(config, newest_state(None, ledger))
                self._strategy = self._make_strategy(config.strategy)
            self._restore_versions(self._versions)

    def _restore_versions(self, store: VersionStore) -> None:
        """Every version an earlier process published, and a first version above them all.

        The checkpoint may be older than the last publish (a crash in between): the
        model is the checkpoint's, but its number must be new, since devices may hold
        any stored version (and the checkpoint's own number may have gone out as a
        delta view, not as this exact model)."""
        published = store.load()
        if not published:
            return
        floor = max(published)
        keep = floor - self._strategy.max_staleness
        self._history = OrderedDict(sorted((v, p) for v, p in published.items() if v >= keep))
        if self._version <= floor:
            log_event(_log, "version_floor", restored=self._version, published=floor)
            self._version = floor + 1
            self.stats.version = self._version

    def _restore(self, checkpoint: Checkpoint) -> None:
        if checkpoint.strategy:
            self._tuned = strategy_from_dict(checkpoint.strategy)
            self.config = dataclasses.replace(self.config, strategy=self._tuned)
            diff = changes(self._initial_strategy, self._tuned)
            log_event(_log, "tuning_restored", changes={k: list(v) for k, v in diff.items()})
        self._version = checkpoint.version
        self._params = dict(checkpoint.params)
        self._state = checkpoint.strategy_state
        self._last_seq = dict(checkpoint.last_seq)
        if not finite(self._params):
            raise CheckpointError(
                f"{self.config.checkpoint_dir}: the checkpoint's model holds NaN or Inf"
            )
        counters = checkpoint.counters
        # The accountant carries on from the checkpoint: a crash never resets the budget
        # (ConfigError if it is already spent).
        if self.config.privacy is not None:
            assert self.config.checkpoint_dir is not None
            ledger = load_privacy_ledger(self.config.checkpoint_dir)
            state = newest_state(counters.get("privacy"), ledger)
            self._privacy = self._new_privacy(self.config, state)
        self._strategy = self._make_strategy(self.config.strategy)
        self._bounds = UpdateBounds(
            self.config.bounds, counters.get("recent_norms", ()), clipped=counters.get("clipped", 0)
        )
        self.stats.clipped = self._bounds.clipped
        self.stats.version = self._version
        self.stats.received = counters.get("received", 0)
        self.stats.applied = counters.get("applied", 0)
        self.stats.rejected.update(counters.get("rejected", {}))
        self.stats.staleness.update({int(k): n for k, n in counters.get("staleness", {}).items()})
        self.stats.buffered = self._strategy.pending(self._state)
        self.stats.robust_clipped = self._strategy.clipped(self._state)
        self.resumed_from = self._version
        self._commits = counters.get("commits", 0)
        self.control_issued = float(counters.get("control_issued", 0.0))
        # The applies of the checkpoint resumed from: its "committed" line may have been
        # lost if the process died right after writing it, so say them again.
        log_event(
            _log,
            "resumed",
            version=self._version,
            participants=len(self._last_seq),
            commit=self._commits,
            last_applied={p: list(s) for p, s in counters.get("last_applied", {}).items()},
        )

    @staticmethod
    def _new_privacy(config: AggregatorConfig, state: Any) -> ClientPrivacy | None:
        if config.privacy is None:
            return None
        return ClientPrivacy(config.privacy, config.strategy.fedbuff.buffer_size, state=state)

    def _make_strategy(self, config: StrategyConfig) -> Strategy:
        privacy = self._privacy
        if privacy is None:
            return make_strategy(config)
        privacy.buffer_size = config.fedbuff.buffer_size  # K may be tuned live
        self.stats.privacy = privacy.report()
        return make_strategy(config, combine=privacy.combine)

    @property
    def privacy(self) -> ClientPrivacy | None:
        """Client-level DP's accountant and participation rules (None when off)."""
        return self._privacy

    @property
    def budget_spent(self) -> bool:
        """Whether the service stopped because the next step would exceed the budget."""
        return self._budget_spent

    @property
    def version(self) -> int:
        return self._version

    @property
    def params(self) -> Params:
        return self._params

    @property
    def downlink(self) -> Downlink:
        """How models go out (keyframe and delta counts)."""
        return self._downlink

    @property
    def evaluates_centrally(self) -> bool:
        """Whether the aggregator scores models on a held-out set of its own."""
        return self._evaluate is not None and self.config.eval_every > 0

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
        control = tg.create_task(serve_controls(self, self._transport.controls()), name="control")
        evals = tg.create_task(serve_evals(self, self._transport.evals()), name="evals")
        # Deliveries the broker sent (at most its prefetch window), not yet handled;
        # None once the transport has no more (it closed).
        inbox: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._inbox = inbox
        receiver = tg.create_task(self._receive(inbox), name="receive")
        handling: asyncio.Future[None] | None = None
        try:
            while (first := await inbox.get()) is not None:
                # Batched and pipelined: whatever has arrived (up to _BATCH) decodes in one
                # worker-thread call while the previous batch is still being applied;
                # applies stay one at a time, in arrival order. At high rates one thread
                # round trip per batch instead of per update is most of the saving.
                batch = [first]
                while len(batch) < _BATCH and not inbox.empty():
                    delivery = inbox.get_nowait()
                    if delivery is None:
                        inbox.put_nowait(None)  # the end: after this batch
                        break
                    batch.append(delivery)
                bodies = [delivery.body for delivery in batch]
                decoding = asyncio.ensure_future(asyncio.to_thread(self._decode_all, bodies))
                decoding.add_done_callback(_retrieve)
                if handling is not None:
                    await asyncio.shield(handling)
                handling = asyncio.ensure_future(self._handle(batch, decoding))
        finally:
            self._stopping = True
            receiver.cancel()
            control.cancel()
            evals.cancel()
            if timer is not None:
                timer.cancel()
            async with asyncio.timeout(self.config.shutdown_timeout_s):
                if handling is not None:
                    await handling  # finish the update in hand: never half of one
                if self._budget_spent:
                    await self._publish_final()
                await self._commit()
            log_event(_log, "stopped", version=self._version)

    async def _publish_final(self) -> None:
        """Publish the last model now (a budget stop: no later publish will carry it)."""
        if self._publish_task is not None:
            await asyncio.shield(self._publish_task)
        if self._version not in self._history:
            await self._publish()

    def _save_ledger(self) -> None:
        """The accountant's state, durable before the step's model is published (a small
        file, fsync'd on the event loop: no await between the step and its record)."""
        if self._privacy is not None and self.config.checkpoint_dir is not None:
            save_privacy_ledger(self.config.checkpoint_dir, self._privacy.state())

    def _privacy_stepped(self) -> None:
        """After a server step under client-level DP: report epsilon, and stop before the
        step that would exceed the budget (the updates not yet applied stay queued)."""
        privacy = self._privacy
        assert privacy is not None
        self.stats.privacy = report = privacy.report()
        log_event(
            _log,
            "privacy_step",
            version=self._version,
            steps=report["steps"],
            epsilon=round(report["epsilon"], 6),
            delta=report["delta"],
        )
        if privacy.exhausted() and not self._budget_spent:
            self._budget_spent = True
            self._stopping = True
            log_event(
                _log,
                "privacy_budget_spent",
                logging.WARNING,
                version=self._version,
                steps=report["steps"],
                epsilon=round(report["epsilon"], 6),
                target_epsilon=report["target_epsilon"],
                next_epsilon=round(privacy.epsilon(1), 6),
                delta=report["delta"],
            )
            if self._inbox is not None:
                self._inbox.put_nowait(None)  # run() stops after the update in hand

    async def _receive(self, inbox: asyncio.Queue[Delivery | None]) -> None:
        async for delivery in self._transport.updates():
            inbox.put_nowait(delivery)
        inbox.put_nowait(None)

    async def _handle(self, batch: list[Delivery], decoding: _Decoding) -> None:
        decoded = await decoding
        for delivery, result in zip(batch, decoded, strict=True):
            if self._stopping:
                break  # the rest stay unsettled: the broker delivers them again
            # Taken per update, so a timer checkpoint or a retune may come in between.
            async with self._apply_lock:
                await self._apply(delivery, result)
        if self.config.checkpoint_dir is None:
            await self._commit()  # nothing to make durable: settle the batch at once

    async def _apply(self, delivery: Delivery, decoded: _Decoded) -> None:
        started = time.perf_counter()
        body = delivery.body
        self.stats.received += 1
        self.stats.bytes_in += len(body)
        seq = None  # known once the envelope decoded: the rejection record names it
        try:
            if delivery.refused is not None:  # the transport would not hold it
                raise delivery.refused
            if isinstance(decoded, Rejection):
                raise decoded
            update, delta, norm = decoded
            if (
                self._strategy.needs_base
                and update.base_version not in self._history
                and self._publish_task is not None
            ):
                # It cites a version whose publish is still in flight (not from a device,
                # which cannot hold it yet): its view is the base the strategy needs.
                await asyncio.shield(self._publish_task)
            seq = update.seq
            contribution = self._admit(update, delta, norm, delivery.participant_hint)
            if self._strategy.changes_model(self._state):
                new_params, state = await asyncio.to_thread(
                    checked_step, self._strategy.step, self._params, self._state, contribution
                )
            else:  # only buffered: cheaper here than a round trip to a worker thread
                new_params, state = self._strategy.step(self._params, self._state, contribution)
            if new_params is None and self._round_due():
                new_params, state = checked_step(
                    lambda p, s, _: self._strategy.flush(p, s), self._params, state, None
                )
            self._state = state  # only now: a refused step leaves model and state as they were
        except Rejection as rejection:
            self.stats.rejected[rejection.reason.value] += 1
            log_event(
                _log,
                "rejected",
                logging.WARNING,
                participant=delivery.participant_hint,
                seq=seq,
                reason=rejection.reason.value,
                detail=rejection.detail,
            )
            await self._settle_later(delivery, rejection, None)
            return
        self._last_seq[update.participant] = update.seq
        self._bounds.accepted(norm)
        self.stats.clipped = self._bounds.clipped
        self.stats.applied += 1
        self.stats.staleness[contribution.staleness] += 1
        self.stats.participants.add(update.participant)
        self.stats.last_seen[update.participant] = time.monotonic()
        self.stats.record_privacy(update.participant, update.privacy)
        self.stats.buffered = self._strategy.pending(self._state)
        self.stats.robust_clipped = self._strategy.clipped(self._state)
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
        if self._privacy is not None:
            self._privacy.applied(update.participant, stepped=new_params is not None)
            if new_params is not None:
                self._save_ledger()  # before the noised model can go out
        if new_params is not None:
            await self._advance(new_params)
            if self._privacy is not None:
                self._privacy_stepped()
        self.stats.apply_seconds.observe(time.perf_counter() - started)
        await self._settle_later(delivery, None, (update.participant, update.seq))

    async def retune(self, strategy: StrategyConfig | None) -> None:
        """Put ``strategy`` in force between two updates (None: the one started with).

        Live tuning (aggregator/_tuning.py): ConfigError if it changes the strategy
        itself. A buffer already as full as a new, smaller size is flushed at once
        (a new version); with a checkpoint directory the change is durable on return.
        """
        async with self._apply_lock:
            self.config = retuned(self.config, strategy or self._initial_strategy)
            self._tuned = strategy
            self._strategy = self._make_strategy(self.config.strategy)
            if flush_due(self.config.strategy, self._strategy.pending(self._state)):
                new_params, self._state = await asyncio.to_thread(
                    self._strategy.flush, self._params, self._state
                )
                self.stats.buffered = self._strategy.pending(self._state)
                self.stats.robust_clipped = self._strategy.clipped(self._state)
                if new_params is not None:
                    if self._privacy is not None:
                        self._privacy.stepped()
                        self._save_ledger()
                    await self._advance(new_params)
                    if self._privacy is not None:
                        self._privacy_stepped()
            if self.config.checkpoint_dir is not None:
                await asyncio.shield(self._commit(force=True))

    async def forget_participant(self, participant: str) -> int:
        """Drop ``participant``'s sequence number between two updates (``fedmq ctl
        forget-device``): its next update is admitted whatever its ``seq``. Returns the
        forgotten number; ConfigError if there is none. Durable on return (checkpoint)."""
        async with self._apply_lock:
            last = self._last_seq.pop(participant, None)
            if last is None:
                raise ConfigError(f"participant {participant!r}: no sequence number is held")
            if self.config.checkpoint_dir is not None:
                await asyncio.shield(self._commit(force=True))
            return last

    def set_round(self, version: int, size: int) -> None:
        """A synchronous round on model ``version`` has ``size`` participants.

        For sync FedAvg driven from outside (``fedmq bench``): when fewer than
        ``clients_per_round`` participants are online, the round closes (via
        ``Strategy.flush``) as soon as ``size`` contributions arrived.
        """
        self._round = (version, size)

    def _round_due(self) -> bool:
        return (
            self._round is not None
            and self._round[0] == self._version
            and self._strategy.pending(self._state) >= self._round[1]
        )

    async def _settle_later(
        self, delivery: Delivery, rejection: Rejection | None, applied: tuple[str, int] | None
    ) -> None:
        self._unsettled.append((delivery, rejection, applied))
        # Without a checkpoint directory the batch is settled as a whole (``_handle``).
        checkpointed = self.config.checkpoint_dir is not None
        if checkpointed and len(self._unsettled) >= self.config.checkpoint_every:
            await self._commit()

    async def _commit_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_interval_s)
            async with self._apply_lock:
                if self._unsettled:
                    # Shielded: a batch once taken is checkpointed, logged and settled even
                    # if a stop cancels this timer meanwhile.
                    await asyncio.shield(self._commit())

    async def _commit(self, *, force: bool = False) -> None:
        """Checkpoint (if configured), then settle every handled delivery at the broker.

        ``force``: checkpoint even with nothing to settle (a live tuning change).
        """
        async with self._commit_lock:
            # Snapshot and take the batch with no await in between: both describe the same state.
            batch, self._unsettled = self._unsettled, []
            if not batch and not force:
                return
            applied: dict[str, list[int]] = {}
            for _, _, entry in batch:
                if entry is not None:
                    applied.setdefault(entry[0], []).append(entry[1])
            self._commits += 1
            self._last_applied = applied
            version = self._version
            if self.config.checkpoint_dir is not None:
                await asyncio.to_thread(
                    save_checkpoint, self.config.checkpoint_dir, self._snapshot()
                )
            # The audit trail of exactly-once apply: these are now durable.
            log_event(
                _log,
                "committed",
                logging.DEBUG,
                commit=self._commits,
                version=version,
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
            strategy_state=self._state,
            last_seq=dict(self._last_seq),
            counters={
                "received": self.stats.received,
                "applied": self.stats.applied,
                "rejected": dict(self.stats.rejected),
                "staleness": {str(k): n for k, n in self.stats.staleness.items()},
                "commits": self._commits,
                "last_applied": self._last_applied,
                "recent_norms": self._bounds.recent,
                "control_issued": self.control_issued,
                "clipped": self._bounds.clipped,
                **({"privacy": self._privacy.state()} if self._privacy is not None else {}),
            },
            strategy=strategy_to_dict(self._tuned) if self._tuned is not None else {},
        )

    def _decode_all(self, bodies: list[bytes]) -> list[_Decoded]:
        """Each body decoded, or the rejection it earned. In a worker thread."""
        decoded: list[_Decoded] = []
        for body in bodies:
            try:
                decoded.append(self._decode(body))
            except Rejection as rejection:
                decoded.append(rejection)
        return decoded

    def _decode(self, body: bytes) -> Decoded:
        return decode(
            body, spec=self._spec, limits=self.config.limits, verifier=self.config.update_verifier
        )

    def _admit(
        self, update: UpdateEnvelope, delta: Delta, norm: float, hint: str | None
    ) -> Contribution:
        return admit(
            update,
            delta,
            norm,
            hint,
            allowed=self.config.allowed_participants,
            last_seq=self._last_seq,
            version=self._version,
            strategy=self._strategy,
            bounds=self._bounds,
            history=self._history,
            privacy=self._privacy,
        )

    async def _advance(self, new_params: Params) -> None:
        self._params = new_params
        self._version += 1
        self.stats.version = self._version
        if self._version % self.config.publish_every == 0:
            self._request_publish()
        if self.config.eval_every and self._version % self.config.eval_every == 0:
            self._request_eval()

    def _request_publish(self) -> None:
        """Publish the current model soon, off the apply path: encoding it and waiting
        for the broker's confirm never hold up the next update. At most one publish
        runs at a time, at most one per ``publish_interval_s``; when versions come
        faster, the newest wins."""
        self._publish_wanted = True
        if self._publish_task is None or self._publish_task.done():
            self._publish_task = self._tg.create_task(self._publish_loop(), name="publish")

    async def _publish_loop(self) -> None:
        while self._publish_wanted:
            wait = self._last_publish + self.config.publish_interval_s - time.monotonic()
            await asyncio.sleep(max(0.0, wait))
            self._publish_wanted = False
            await self._publish()

    async def _publish(self) -> None:
        version, params = self._version, self._params
        body, view, keyframe = await asyncio.to_thread(self._downlink.encode, version, params)
        # Held before it goes out: an update citing it can never arrive first.
        self._history[version] = view
        if self._versions is not None:  # durable before it goes out: a restart knows it
            await asyncio.to_thread(
                _store_version, self._versions, version, view, self._strategy.max_staleness
            )
        if self.config.model_signer is not None:
            body = await asyncio.to_thread(self.config.model_signer.seal, body)
        if keyframe:
            await self._transport.publish_model(body, version=version)
        else:  # a delta: not the model kept for late joiners (MQTT retained)
            await self._transport.publish_model(body, version=version, keyframe=False)
        while self._history and next(iter(self._history)) < version - self._strategy.max_staleness:
            self._history.popitem(last=False)
        self._last_publish = time.monotonic()
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
            bytes_in, bytes_out = self.stats.bytes_in, self.stats.bytes_out
            self._eval_wanted = None
            metrics = await asyncio.to_thread(self._evaluate, params)
            point = EvalPoint(
                elapsed_s=self.stats.elapsed_s,
                version=version,
                applied=applied,
                metrics=dict(metrics),
                bytes_in=bytes_in,
                bytes_out=bytes_out,
            )
            self.stats.evaluations.append(point)
            log_event(
                _log,
                "evaluated",
                source="central",
                version=version,
                metrics={name: round(value, 4) for name, value in metrics.items()},
            )
            watch_evaluation(self.stats.health, version, metrics)


_Decoded = Decoded | Rejection
_Decoding = asyncio.Future[list[_Decoded]]

# Updates decoded in one worker-thread call (at most; a batch is what has arrived).
_BATCH = 32


def _store_version(
    store: VersionStore, version: int, view: Mapping[str, np.ndarray], max_staleness: int
) -> None:
    store.put(version, view)
    store.prune(below=version - max_staleness)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a decoding's outcome as seen: a rejection is handled where it is awaited."""
    if not future.cancelled():
        future.exception()


def _encode_model(version: int, params: Mapping[str, np.ndarray]) -> bytes:
    # Models go out in full float32: the global model keeps full precision.
    tensors = encode_params(params, CodecConfig(name="float32"))
    return encode_model(ModelEnvelope(version=version, created=time.time(), tensors=tuple(tensors)))
