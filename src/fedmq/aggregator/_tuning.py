"""Live tuning: change a running aggregator's staleness settings without restarting it.

An operator sends ``fedmq ctl set alpha=0.4 max_staleness=10`` (a ``fedmq.control/1``
command) to the job's control queue or topic; ``serve_controls`` receives it, builds
the new ``StrategyConfig`` (``dataclasses.replace``, so every invariant is checked
again) and hands it to ``Aggregator.retune``, which puts it in force between two
updates, never in the middle of one. A command is all or nothing: one bad value and
none is applied; the refusal is logged and counted, and the service keeps going.

The knobs (``KNOBS``; names as the command-line options):

- ``alpha`` (FedAsync), ``staleness``, ``staleness_a``, ``staleness_b`` (FedAsync and
  FedBuff: the function s(d) and its parameters), ``max_staleness`` (FedAsync, FedBuff),
  ``buffer_size`` and ``server_lr`` (FedBuff), ``clients_per_round`` (FedAvg);
  robust aggregation: ``robust``, ``trim_fraction``, ``norm_bound_factor`` (FedBuff),
  ``outlier_factor`` (FedAsync).
- The strategy itself and the server optimizer cannot change live: their state would
  not carry over. Restart the aggregator for those.
- The ranges are the command line's: a ``server_lr`` that cannot work (sgd and momentum:
  an effective step ``lr / (1 - momentum)`` above 100; adam: above 1) is refused like
  any invalid value; one that is valid but known to diverge is applied with a
  ``risky_setting`` warning (``fedmq.strategies.strategy_warnings``).

When a change takes effect:

- ``alpha``, ``staleness*``: for every update applied (FedAsync) or buffered (FedBuff)
  from then on. FedBuff deltas already in the buffer keep the weight they were given.
- ``max_staleness``: for every update admitted from then on. Raising it does not bring
  back base models already forgotten (FedAsync needs the base): updates on those are
  still refused as ``too_stale``.
- ``buffer_size`` (K) and ``clients_per_round`` (C): if the buffer already holds at
  least the new size, it is flushed at once (one server step, a new model version);
  otherwise it simply waits for more. ``server_lr``: from the next flush.
- ``robust``, ``trim_fraction``, ``norm_bound_factor``: at the next flush, over every delta
  then buffered. ``outlier_factor``: for every update from then on; FedAsync keeps the
  recent norms in its state whether or not the check is on, so turning it on live has
  statistics at once.

Durability: with a checkpoint directory, the tuned configuration is checkpointed
before ``retune`` returns, and on restart **it wins over the command line** (the
``resumed`` log line lists the differences). ``fedmq ctl reset`` goes back to the
configuration the aggregator was started with.

``fedmq ctl forget-device ID`` (command ``forget``) drops one participant's sequence
number (``Aggregator.forget_participant``), e.g. after its state folder was wiped.

Who may send commands, how fast, and replays: aggregator/_control.py (``ControlGate``);
with nothing configured every command is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from fedmq._log import log_event
from fedmq.aggregator._config import AggregatorConfig
from fedmq.aggregator._control import HINT, ControlGate
from fedmq.aggregator._stats import AggregatorStats
from fedmq.errors import ConfigError, Rejection
from fedmq.strategies import StrategyConfig, changes, strategy_warnings, tuned

__all__ = ["Tunable", "handle_control", "retuned", "serve_controls"]

_log = logging.getLogger("fedmq.aggregator")


class Tunable(Protocol):
    """What control commands act on: the aggregator service (aggregator/_service.py)."""

    config: AggregatorConfig
    stats: AggregatorStats
    control_issued: float

    @property
    def version(self) -> int: ...

    async def retune(self, strategy: StrategyConfig | None) -> None: ...

    async def forget_participant(self, participant: str) -> int: ...


def retuned(config: AggregatorConfig, strategy: StrategyConfig) -> AggregatorConfig:
    """``config`` running ``strategy``; ConfigError if that changes the strategy itself
    or its server optimizer (their state would not carry over)."""
    current = config.strategy
    if strategy.name != current.name:
        raise ConfigError(
            f"strategy: {current.name} cannot become {strategy.name} while running; restart instead"
        )
    if strategy.fedbuff.server_optimizer != current.fedbuff.server_optimizer:
        raise ConfigError("server_optimizer: cannot change while running; restart instead")
    return dataclasses.replace(config, strategy=strategy)


async def handle_control(aggregator: Tunable, body: bytes, gate: ControlGate) -> bool:
    """Apply one control command to ``aggregator``; False (logged, counted) if refused.

    ``gate`` (aggregator/_control.py) first: rate, authentication, replays. Only an
    admitted command is decoded further, applied, and checkpointed.
    """
    stats = aggregator.stats
    try:
        command, key_id = gate.admit(body)
    except Rejection as rejection:
        stats.controls["rejected"] += 1
        stats.control_rejected[rejection.reason.value] += 1
        gate.log_refusal(rejection)
        return False
    # Persisted with the next checkpoint (a retune or forget writes one at once).
    aggregator.control_issued = gate.last_issued
    before = aggregator.config.strategy
    forgotten: int | None = None
    try:
        if command.command == "forget":
            forgotten = await aggregator.forget_participant(str(command.values["participant"]))
        elif command.command == "reset":
            await aggregator.retune(None)
        else:
            await aggregator.retune(tuned(before, command.values))
    except ConfigError as error:
        stats.controls["rejected"] += 1
        stats.control_rejected["invalid"] += 1
        log_event(
            _log,
            "control_rejected",
            logging.WARNING,
            id=command.id,
            command=command.command,
            values=dict(command.values),
            key_id=key_id,
            reason="invalid",
            detail=str(error),
        )
        return False
    stats.controls["applied"] += 1
    if command.command == "forget":
        log_event(
            _log,
            "forgot",
            logging.WARNING,
            id=command.id,
            participant=command.values["participant"],
            last_seq=forgotten,
            key_id=key_id,
        )
        return True
    log_event(
        _log,
        "tuned",
        id=command.id,
        command=command.command,
        changes={k: list(pair) for k, pair in changes(before, aggregator.config.strategy).items()},
        version=aggregator.version,
        key_id=key_id,
    )
    for warning in strategy_warnings(aggregator.config.strategy):
        log_event(_log, "risky_setting", logging.WARNING, id=command.id, detail=warning)
    return True


async def serve_controls(aggregator: Tunable, controls: AsyncIterator[bytes]) -> None:
    """Apply every control command ``controls`` yields, one at a time, until it ends.

    Only those ``aggregator.config.control`` admits (aggregator/_control.py).
    """
    config = aggregator.config.control
    gate = ControlGate(config, last_issued=aggregator.control_issued)
    log_event(
        _log,
        "control",
        operator_keys=str(config.operator_keys.keys.path) if config.operator_keys else None,
        unsigned=config.accept_unsigned,
        rate_per_s=config.rate_per_s,
        burst=config.burst,
        hint=None if config.enabled else HINT,
    )
    async for body in controls:
        await handle_control(aggregator, body, gate)
