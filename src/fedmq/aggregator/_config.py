"""The aggregator's configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedmq.errors import ConfigError
from fedmq.strategies import StrategyConfig
from fedmq.wire import WireLimits

__all__ = ["AggregatorConfig"]


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    """How the aggregator applies, publishes and evaluates.

    ``publish_every``: republish the model every N versions (1 = every apply).
    ``eval_every``: evaluate on the held-out set every M versions (0 = never).
    """

    model: str = "cnn-s"
    seed: int = 0
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    publish_every: int = 1
    eval_every: int = 5
    eval_examples: int = 10_000
    limits: WireLimits = field(default_factory=WireLimits)

    def __post_init__(self) -> None:
        if self.model not in ("cnn-s", "mlp"):
            raise ConfigError(f"model: {self.model!r} is not one of cnn-s, mlp")
        if self.publish_every < 1:
            raise ConfigError(f"publish_every: {self.publish_every} must be >= 1")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every: {self.eval_every} must be >= 0 (0 disables)")
        if self.eval_examples < 1:
            raise ConfigError(f"eval_examples: {self.eval_examples} must be >= 1")
