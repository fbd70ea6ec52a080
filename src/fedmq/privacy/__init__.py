"""Privacy on the way of an update: clipping, DP-SGD on the device, local DP.

See docs/privacy.md for the threat models and what each mechanism's epsilon means.
"""

from fedmq.privacy._clip import clip
from fedmq.privacy._dpsgd import DPSGD, DPSGDConfig
from fedmq.privacy._local import LocalDP, LocalDPConfig, calibrate, local_epsilon

__all__ = [
    "DPSGD",
    "DPSGDConfig",
    "LocalDP",
    "LocalDPConfig",
    "calibrate",
    "clip",
    "local_epsilon",
]
