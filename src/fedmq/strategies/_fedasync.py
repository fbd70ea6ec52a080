"""FedAsync (Xie et al., 2019): mix every arriving local model into the global one."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedmq.strategies._common import Params, check_compatible, f32, is_number, require
from fedmq.strategies._staleness import StalenessConfig, staleness_weight

__all__ = ["FedAsyncConfig", "fedasync_apply"]


@dataclass(frozen=True, kw_only=True)
class FedAsyncConfig:
    """FedAsync's mixing rate ``alpha`` in (0, 1] and its staleness function.

    The defaults are the benchmark's: alpha 0.6, polynomial staleness with a = 0.5.
    """

    alpha: float = 0.6
    # polynomial with a = 0.5: s(d) = 1 / sqrt(1 + d)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)

    def __post_init__(self) -> None:
        require(
            is_number(self.alpha) and 0 < self.alpha <= 1, self, "alpha", "in (0, 1]", self.alpha
        )
        require(
            isinstance(self.staleness, StalenessConfig),
            self,
            "staleness",
            "a StalenessConfig",
            self.staleness,
        )


def fedasync_apply(
    global_: Params, local: Params, staleness: int, config: FedAsyncConfig
) -> dict[str, npt.NDArray[np.float32]]:
    """The new global model after one local model arrives::

        alpha_t = config.alpha * s(staleness)
        x      <- (1 - alpha_t) * x + alpha_t * x_local

    ``local`` is the participant's trained model (its base plus its delta), not
    the delta. Returns fresh float32 arrays in ``global_``'s order; inputs are
    never modified. ``ValueError`` if the tensor names or shapes differ.
    """
    check_compatible(global_, local, "local model")
    alpha_t = config.alpha * staleness_weight(config.staleness)(staleness)
    return {
        name: f32((1.0 - alpha_t) * f32(x) + alpha_t * f32(local[name]))
        for name, x in global_.items()
    }
