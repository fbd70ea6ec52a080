"""The strategy settings an operator may change live, and their maths (pure).

``KNOBS`` names them (as the command-line options); ``tuned`` makes a new
``StrategyConfig`` from ``name=value`` assignments (``dataclasses.replace``, so every
invariant is checked again); ``knob_values``/``changes`` say what is in force and what
changed; ``strategy_to_dict``/``strategy_from_dict`` are the checkpoint's form. The
aggregator puts a tuned configuration in force (aggregator/_tuning.py); when each knob
takes effect is said there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_type_hints

from fedmq.errors import ConfigError
from fedmq.strategies._robust import ROBUST_RULES
from fedmq.strategies._staleness import STALENESS_FUNCTIONS, StalenessConfig
from fedmq.strategies._strategy import StrategyConfig, StrategyName

__all__ = [
    "KNOBS",
    "Knob",
    "KnobValue",
    "changes",
    "flush_due",
    "knob_values",
    "parse_assignments",
    "strategy_from_dict",
    "strategy_to_dict",
    "tuned",
]

KnobValue = int | float | str
"""A knob's value, as a ``fedmq.control/1`` command carries it."""


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
        Knob("robust", str, "FedBuff: robust rule of the buffer", ("fedbuff",), ROBUST_RULES),
        Knob(
            "trim_fraction",
            float,
            "FedBuff trimmed_mean: share cut at each end, in [0, 0.5)",
            ("fedbuff",),
        ),
        Knob(
            "norm_bound_factor",
            float,
            "FedBuff norm_bounded: clip to this x the buffer's median norm, >= 1",
            ("fedbuff",),
        ),
        Knob(
            "outlier_factor",
            float,
            "FedAsync: refuse norms above median + this x MAD of recent ones, >= 0 (0: off)",
            ("fedasync",),
        ),
    )
}


_KINDS = {float: "a number", int: "an integer", str: "a string"}


def _convert(knob: Knob, value: object) -> KnobValue:
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


def parse_assignments(texts: Sequence[str]) -> dict[str, KnobValue]:
    """``["alpha=0.4", "max_staleness=10"]`` -> ``{"alpha": 0.4, "max_staleness": 10}``.

    Names may use ``-`` for ``_``. ConfigError names an unknown knob or a bad value;
    the aggregator checks the ranges (and the knob against its strategy) again.
    """
    values: dict[str, KnobValue] = {}
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
    r = {
        "rule": "robust",
        "trim_fraction": "trim_fraction",
        "norm_bound_factor": "norm_bound_factor",
        "outlier_factor": "outlier_factor",
    }
    robust = dataclasses.replace(config.robust, **{f: v[k] for f, k in r.items() if k in v})
    return dataclasses.replace(
        config,
        max_staleness=v.get("max_staleness", config.max_staleness),
        fedasync=fedasync,
        fedbuff=fedbuff,
        fedavg=fedavg,
        robust=robust,
    )


def knob_values(config: StrategyConfig) -> dict[str, KnobValue]:
    """The value in force of every knob the running strategy uses."""
    staleness = _staleness(config)
    every: dict[str, KnobValue] = {
        "alpha": config.fedasync.alpha,
        "staleness": staleness.function,
        "staleness_a": staleness.a,
        "staleness_b": staleness.b,
        "max_staleness": config.max_staleness,
        "buffer_size": config.fedbuff.buffer_size,
        "server_lr": config.fedbuff.lr,
        "clients_per_round": config.fedavg.clients_per_round,
        "robust": config.robust.rule,
        "trim_fraction": config.robust.trim_fraction,
        "norm_bound_factor": config.robust.norm_bound_factor,
        "outlier_factor": config.robust.outlier_factor,
    }
    return {k: v for k, v in every.items() if config.name in KNOBS[k].strategies}


def changes(
    before: StrategyConfig, after: StrategyConfig
) -> dict[str, tuple[KnobValue | None, KnobValue | None]]:
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
