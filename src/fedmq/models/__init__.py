"""The model zoo, weights as numpy arrays, and the local training and evaluation loops."""

from fedmq.models._params import get_params, non_finite, set_params
from fedmq.models._train import Loss, Training, check_training, evaluate, train_local
from fedmq.models._zoo import MODEL_NAMES, CnnS, Mlp, ModelName, build_model

__all__ = [
    "MODEL_NAMES",
    "CnnS",
    "Loss",
    "Mlp",
    "ModelName",
    "Training",
    "build_model",
    "check_training",
    "evaluate",
    "get_params",
    "non_finite",
    "set_params",
    "train_local",
]
