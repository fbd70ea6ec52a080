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
    FedBuffConfig,
    FedBuffState,
    ServerOptimizer,
    default_server_lr,
    fedbuff_add,
    fedbuff_flush,
    fedbuff_init,
    fedbuff_ready,
    fedbuff_warnings,
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
    FedAvgState,
    Strategy,
    StrategyConfig,
    StrategyName,
    make_strategy,
    strategy_warnings,
)

__all__ = [
    "SERVER_OPTIMIZERS",
    "STALENESS_FUNCTIONS",
    "STRATEGY_NAMES",
    "Contribution",
    "Delta",
    "FedAsyncConfig",
    "FedAvgConfig",
    "FedAvgState",
    "FedBuffConfig",
    "FedBuffState",
    "Params",
    "ServerOptimizer",
    "StalenessConfig",
    "StalenessFunction",
    "Strategy",
    "StrategyConfig",
    "StrategyName",
    "default_server_lr",
    "fedasync_apply",
    "fedavg_aggregate",
    "fedbuff_add",
    "fedbuff_flush",
    "fedbuff_init",
    "fedbuff_ready",
    "fedbuff_warnings",
    "make_strategy",
    "staleness_weight",
    "strategy_warnings",
]
