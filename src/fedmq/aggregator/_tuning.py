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
  ``buffer_size`` and ``server_lr`` (FedBuff), ``clients_per_round`` (FedAvg).
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
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_type_hints

from fedmq._log import log_event
from fedmq.aggregator._config import AggregatorConfig
from fedmq.aggregator._control import HINT, ControlGate
from fedmq.errors import ConfigError, Rejection
from fedmq.strategies import (
    STALENESS_FUNCTIONS,
    StalenessConfig,
    StrategyConfig,
    StrategyName,
    strategy_warnings,
)
from fedmq.wire import ControlValue

if TYPE_CHECKING:
    from fedmq.aggregator._service import Aggregator

__all__ = [
    "KNOBS",
    "Knob",
    "changes",
    "flush_due",
    "handle_control",
    "knob_values",
    "parse_assignments",
    "retuned",
    "serve_controls",
    "strategy_from_dict",
    "strategy_to_dict",
    "tuned",
]

_log = logging.getLogger("fedmq.aggregator")


@dataclass(frozen=True)
class Knob:
    """One setting that can change live."""

    name: str
    type: type
    help: str
    strategies: tuple[StrategyName, ...]
    choices: tuple[str, ...] | None = None


KNOBS: dict[str, Knob] = {
    knob.name: knob
    for knob in (
        Knob("alpha", float, "FedAsync mixing weight, in (0, 1]", ("fedasync",)),
        Knob(
            "staleness",
            str,
            "staleness function s(d)",
            ("fedasync", "fedbuff"),
            STALENESS_FUNCTIONS,
        ),
        Knob("staleness_a", float, "decay rate a of s(d), >= 0", ("fedasync", "fedbuff")),
        Knob(
            "staleness_b", int, "hinge: grace period b in versions, >= 0", ("fedasync", "fedbuff")
        ),
        Knob("max_staleness", int, "drop updates staler than this, >= 0", ("fedasync", "fedbuff")),
        Knob("buffer_size", int, "FedBuff: deltas per server step K, >= 1", ("fedbuff",)),
        Knob(
            "server_lr",
            float,
            "FedBuff: server learning rate, > 0 (sgd, momentum: lr / (1 - momentum) <= 100; "
            "adam: <= 1)",
            ("fedbuff",),
        ),
        Knob("clients_per_round", int, "FedAvg: participants per round C, >= 1", ("fedavg",)),
    )
}


_KINDS = {float: "a number", int: "an integer", str: "a string"}


def _convert(knob: Knob, value: object) -> ControlValue:
    """``value`` as the knob's type (an int is a fine float); ConfigError otherwise."""
    if knob.type is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if knob.type is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if knob.type is str and isinstance(value, str):
        if knob.choices is not None and value not in knob.choices:
            raise ConfigError(f"{knob.name}: {value!r} is not one of {', '.join(knob.choices)}")
        return value
    raise ConfigError(f"{knob.name}: {value!r} is not {_KINDS[knob.type]}")


def parse_assignments(texts: Sequence[str]) -> dict[str, ControlValue]:
    """``["alpha=0.4", "max_staleness=10"]`` -> ``{"alpha": 0.4, "max_staleness": 10}``.

    Names may use ``-`` for ``_``. ConfigError names an unknown knob or a bad value;
    the aggregator checks the ranges (and the knob against its strategy) again.
    """
    values: dict[str, ControlValue] = {}
    for text in texts:
        name, sep, raw = text.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError(f"ctl: {text!r} is not NAME=VALUE")
        knob = KNOBS.get(name)
        if knob is None:
            raise ConfigError(f"ctl: unknown setting {name!r}; tunable: {', '.join(KNOBS)}")
        if name in values:
            raise ConfigError(f"ctl: {name} is given twice")
        try:
            parsed: object = knob.type(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}: {raw.strip()!r} is not {_KINDS[knob.type]}") from None
        values[name] = _convert(knob, parsed)
    if not values:
        raise ConfigError(f"ctl set: give at least one NAME=VALUE; tunable: {', '.join(KNOBS)}")
    return values


def _staleness(config: StrategyConfig) -> StalenessConfig:
    return config.fedbuff.staleness if config.name == "fedbuff" else config.fedasync.staleness


def tuned(config: StrategyConfig, values: Mapping[str, object]) -> StrategyConfig:
    """``config`` with ``values`` applied; ConfigError (nothing applied) if any is invalid.

    A knob the running strategy does not use is refused rather than silently ignored.
    The staleness function is shared by the FedAsync and FedBuff sections, as the
    command line sets it.
    """
    if not values:
        raise ConfigError("ctl: no setting to change")
    v: dict[str, Any] = {}
    for name, value in values.items():
        knob = KNOBS.get(name)
        if knob is None:
            raise ConfigError(f"{name}: not a tunable setting; tunable: {', '.join(KNOBS)}")
        if config.name not in knob.strategies:
            raise ConfigError(
                f"{name}: not used by strategy {config.name} (only {', '.join(knob.strategies)})"
            )
        v[name] = _convert(knob, value)
    staleness = _staleness(config)
    s = {"function": "staleness", "a": "staleness_a", "b": "staleness_b"}
    staleness = dataclasses.replace(staleness, **{f: v[k] for f, k in s.items() if k in v})
    fedasync = dataclasses.replace(
        config.fedasync, alpha=v.get("alpha", config.fedasync.alpha), staleness=staleness
    )
    fedbuff = dataclasses.replace(
        config.fedbuff,
        buffer_size=v.get("buffer_size", config.fedbuff.buffer_size),
        server_lr=v.get("server_lr", config.fedbuff.server_lr),
        staleness=staleness,
    )
    fedavg = dataclasses.replace(
        config.fedavg,
        clients_per_round=v.get("clients_per_round", config.fedavg.clients_per_round),
    )
    return dataclasses.replace(
        config,
        max_staleness=v.get("max_staleness", config.max_staleness),
        fedasync=fedasync,
        fedbuff=fedbuff,
        fedavg=fedavg,
    )


def knob_values(config: StrategyConfig) -> dict[str, ControlValue]:
    """The value in force of every knob the running strategy uses."""
    staleness = _staleness(config)
    every: dict[str, ControlValue] = {
        "alpha": config.fedasync.alpha,
        "staleness": staleness.function,
        "staleness_a": staleness.a,
        "staleness_b": staleness.b,
        "max_staleness": config.max_staleness,
        "buffer_size": config.fedbuff.buffer_size,
        "server_lr": config.fedbuff.lr,
        "clients_per_round": config.fedavg.clients_per_round,
    }
    return {k: v for k, v in every.items() if config.name in KNOBS[k].strategies}


def changes(
    before: StrategyConfig, after: StrategyConfig
) -> dict[str, tuple[ControlValue | None, ControlValue | None]]:
    """knob -> (old, new) for every knob whose value differs (for the log)."""
    old, new = knob_values(before), knob_values(after)
    return {k: (old.get(k), new.get(k)) for k in KNOBS if old.get(k) != new.get(k)}


def flush_due(config: StrategyConfig, pending: int) -> bool:
    """Whether a buffer holding ``pending`` contributions is full under ``config``."""
    if config.name == "fedbuff":
        return pending >= config.fedbuff.buffer_size
    if config.name == "fedavg":
        return pending >= config.fedavg.clients_per_round
    return False


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


def strategy_to_dict(config: StrategyConfig) -> dict[str, Any]:
    """The checkpoint form of a configuration (``dataclasses.asdict``)."""
    return dataclasses.asdict(config)


def _from_dict(cls: type[Any], data: object, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        is_section = isinstance(kind, type) and dataclasses.is_dataclass(kind)
        kwargs[name] = _from_dict(kind, value, f"{where}.{name}") if is_section else value
    return cls(**kwargs)


def strategy_from_dict(data: Mapping[str, Any]) -> StrategyConfig:
    """A configuration from its checkpoint form; ConfigError if it is not a valid one."""
    config = _from_dict(StrategyConfig, data, "strategy")
    assert isinstance(config, StrategyConfig)
    return config


async def handle_control(aggregator: Aggregator, body: bytes, gate: ControlGate) -> bool:
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


async def serve_controls(aggregator: Aggregator, controls: AsyncIterator[bytes]) -> None:
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
