"""The aggregator's configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedmq.aggregator._bounds import BoundsConfig
from fedmq.aggregator._control import ControlConfig
from fedmq.aggregator._downlink import DownlinkConfig
from fedmq.aggregator._fedeval import FedEvalConfig
from fedmq.errors import ConfigError
from fedmq.privacy import ClientDPConfig
from fedmq.strategies import StrategyConfig
from fedmq.wire import Signer, Verifier, WireLimits, check_participant_id

__all__ = ["AggregatorConfig"]


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    """How the aggregator applies, publishes, evaluates and persists.

    ``publish_every``: republish the model every N versions (1 = every apply).
    ``publish_interval_s``: at least this long between two model publishes; versions
    made meanwhile are not sent, the newest one goes out when the time is up (0 = as
    fast as encoding and the broker allow). Each publish costs O(model) CPU (encoding,
    the device view), which at hundreds of versions a second would starve the apply
    path, while devices that train for seconds gain nothing from a model 0.2 s newer.
    ``eval_every``: evaluate on the aggregator's own held-out set (when it has one)
    every M versions (0 = never). ``fed_eval``: how the devices' evaluation reports are
    combined (aggregator/_fedeval.py).
    ``checkpoint_dir``: where the durable state lives; with it, updates are acked
    to the broker only once a checkpoint covers them (after ``checkpoint_every``
    settled updates or ``checkpoint_interval_s`` seconds, whichever comes first).
    Without it nothing survives a restart and updates are acked at once.
    ``allowed_participants``: if set, updates from anyone else are rejected.
    ``bounds``: the largest update norm and example count admitted (_bounds.py).
    ``downlink``: models in full float32 (the default) or as compressed deltas.
    ``update_verifier``: if set, only updates signed by a registered device key are
    applied (``fedmq.signed/1``); ``model_signer``: if set, every model is signed.
    ``control``: which operator commands (``fedmq ctl``) are applied, and how fast;
    by default none (aggregator/_control.py).
    ``privacy``: client-level differential privacy of FedBuff's server steps (central
    model, privacy/_central.py); None: off.
    """

    seed: int = 0
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    publish_every: int = 1
    publish_interval_s: float = 0.2
    eval_every: int = 5
    fed_eval: FedEvalConfig = field(default_factory=FedEvalConfig)
    limits: WireLimits = field(default_factory=WireLimits)
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 16
    checkpoint_interval_s: float = 2.0
    shutdown_timeout_s: float = 30.0
    allowed_participants: frozenset[str] | None = None
    bounds: BoundsConfig = field(default_factory=BoundsConfig)
    downlink: DownlinkConfig = field(default_factory=DownlinkConfig)
    update_verifier: Verifier | None = None
    model_signer: Signer | None = None
    control: ControlConfig = field(default_factory=ControlConfig)
    privacy: ClientDPConfig | None = None

    def __post_init__(self) -> None:
        if self.publish_every < 1:
            raise ConfigError(f"publish_every: {self.publish_every} must be >= 1")
        if not self.publish_interval_s >= 0:
            raise ConfigError(f"publish_interval: {self.publish_interval_s} must be >= 0")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every: {self.eval_every} must be >= 0 (0 disables)")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every: {self.checkpoint_every} must be >= 1")
        if not self.checkpoint_interval_s > 0:
            raise ConfigError(f"checkpoint_interval: {self.checkpoint_interval_s} must be > 0")
        if not self.shutdown_timeout_s > 0:
            raise ConfigError(f"shutdown_timeout: {self.shutdown_timeout_s} must be > 0")
        if self.privacy is not None and self.strategy.name != "fedbuff":
            raise ConfigError(
                f"dp: client-level DP needs --strategy fedbuff, not {self.strategy.name}:"
                + (
                    " FedAsync applies each update alone, so each step's noise would be as"
                    " large as one clipped update (z*C on one contribution): no useful model"
                    if self.strategy.name == "fedasync"
                    else " FedAvg closes short rounds with the count that arrived, and the"
                    " noise is calibrated to a fixed-size sum (use FedBuff's buffer)"
                )
            )
        for pid in sorted(self.allowed_participants or ()):  # an id no update can carry
            check_participant_id(pid, "allowed_participants")
