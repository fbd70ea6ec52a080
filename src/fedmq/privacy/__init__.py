"""Privacy on the way of an update (docs/privacy.md has the threat models and what each
mechanism's epsilon means).

- ``clip``: scale a delta (dense or top-k sparse) to an L2 bound.
- ``ClientDPConfig`` / ``ClientPrivacy``: the central (trusted aggregator) mechanism
  on FedBuff: clipped sum, Gaussian noise, participation enforcement and the
  accountant (dp-accounting), checkpointed by the aggregator.
- ``DPSGD``: example-level DP-SGD on the device (Opacus), its accountant on the device.
- ``LocalDP``: local (untrusted aggregator) DP: the device clips and noises its own
  delta, with its own accountant (dp-accounting).
"""

from fedmq.privacy._accountant import calibrate_noise, client_epsilon, participations
from fedmq.privacy._central import ClientDPConfig, ClientPrivacy, newest_state
from fedmq.privacy._clip import clip, l2_norm
from fedmq.privacy._dpsgd import DPSGD, DPSGDConfig
from fedmq.privacy._local import LocalDP, LocalDPConfig, calibrate, local_epsilon

__all__ = [
    "DPSGD",
    "ClientDPConfig",
    "ClientPrivacy",
    "DPSGDConfig",
    "LocalDP",
    "LocalDPConfig",
    "calibrate",
    "calibrate_noise",
    "client_epsilon",
    "clip",
    "l2_norm",
    "local_epsilon",
    "newest_state",
    "participations",
]
