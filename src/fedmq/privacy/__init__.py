"""Privacy: update clipping and client-level differential privacy (docs/privacy.md).

- ``clip``: scale a delta (dense or top-k sparse) to an L2 bound.
- ``ClientDPConfig`` / ``ClientPrivacy``: the central (trusted aggregator) mechanism
  on FedBuff: clipped sum, Gaussian noise, participation enforcement and the
  accountant (dp-accounting), checkpointed by the aggregator.
"""

from fedmq.privacy._accountant import calibrate_noise, client_epsilon, participations
from fedmq.privacy._central import ClientDPConfig, ClientPrivacy
from fedmq.privacy._clip import clip, l2_norm

__all__ = [
    "ClientDPConfig",
    "ClientPrivacy",
    "calibrate_noise",
    "client_epsilon",
    "clip",
    "l2_norm",
    "participations",
]
