"""Aggregation strategies as pure maths: FedAsync, FedBuff, synchronous FedAvg.

No I/O, no asyncio, inputs never modified; parameters are ``Mapping[str,
float32 array]``; a ``Delta`` may hold top-k tensors as ``SparseTensor``. The
functions (``fedasync_apply``, ``fedbuff_flush``, ``fedavg_aggregate``...) carry the
formulas; ``make_strategy`` wraps them in the one ``Strategy`` interface the
aggregator drives.
"""

from fedmq.strategies._common import Delta, Params
from fedmq.strategies._fedasync import FedAsyncConfig, fedasync_apply
from fedmq.strategies._fedavg import FedAvgConfig, fedavg_aggregate
from fedmq.strategies._fedbuff import (
    SERVER_OPTIMIZERS,
    Combine,
    Entry,
    FedBuffConfig,
    FedBuffState,
    ServerOptimizer,
    default_server_lr,
    fedbuff_add,
    fedbuff_flush,
    fedbuff_init,
    fedbuff_ready,
    fedbuff_warnings,
    weighted_mean,
)
from fedmq.strategies._robust import (
    ROBUST_RULES,
    RobustConfig,
    RobustRule,
    coordinate_median,
    delta_norm,
    norm_bounded_mean,
    outlier_limit,
    robust_combine,
    trimmed_mean,
)
from fedmq.strategies._staleness import (
    STALENESS_FUNCTIONS,
    StalenessConfig,
    StalenessFunction,
    staleness_weight,
)
from fedmq.strategies._strategy import (
    STRATEGY_NAMES,
    Contribution,
    FedAsyncState,
    FedAvgState,
    Strategy,
    StrategyConfig,
    StrategyName,
    make_strategy,
    strategy_warnings,
)
from fedmq.strategies._tuning import (
    KNOBS,
    Knob,
    KnobValue,
    changes,
    flush_due,
    knob_values,
    parse_assignments,
    strategy_from_dict,
    strategy_to_dict,
    tuned,
)

__all__ = [
    "KNOBS",
    "ROBUST_RULES",
    "SERVER_OPTIMIZERS",
    "STALENESS_FUNCTIONS",
    "STRATEGY_NAMES",
    "Combine",
    "Contribution",
    "Delta",
    "Entry",
    "FedAsyncConfig",
    "FedAsyncState",
    "FedAvgConfig",
    "FedAvgState",
    "FedBuffConfig",
    "FedBuffState",
    "Knob",
    "KnobValue",
    "Params",
    "RobustConfig",
    "RobustRule",
    "ServerOptimizer",
    "StalenessConfig",
    "StalenessFunction",
    "Strategy",
    "StrategyConfig",
    "StrategyName",
    "changes",
    "coordinate_median",
    "default_server_lr",
    "delta_norm",
    "fedasync_apply",
    "fedavg_aggregate",
    "fedbuff_add",
    "fedbuff_flush",
    "fedbuff_init",
    "fedbuff_ready",
    "fedbuff_warnings",
    "flush_due",
    "knob_values",
    "make_strategy",
    "norm_bounded_mean",
    "outlier_limit",
    "parse_assignments",
    "robust_combine",
    "staleness_weight",
    "strategy_from_dict",
    "strategy_to_dict",
    "strategy_warnings",
    "trimmed_mean",
    "tuned",
    "weighted_mean",
]
