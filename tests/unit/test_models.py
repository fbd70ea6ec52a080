"""fedmq.models: the zoo, weights as numpy, the local training loop and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from fedmq.errors import ConfigError, DataError
from fedmq.models import Training, build_model, evaluate, get_params, set_params, train_local


def toy_task(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 10-class task: one random template per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = templates[y] + 0.5 * torch.randn(n, 1, 28, 28, generator=g)  # [n, 1, 28, 28]
    return x, y


def fit(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int, **settings: float
) -> float:
    """``train_local`` on ``(x, y)`` with ``Training(**settings)``."""
    return train_local(model, TensorDataset(x, y), Training(**settings), seed)  # type: ignore[arg-type]


def test_parameter_counts() -> None:
    # cnn-s: conv1 16*1*5*5 + 16 = 416; conv2 32*16*5*5 + 32 = 12,832; fc 1568*10 + 10 = 15,690
    assert sum(p.numel() for p in build_model("cnn-s").parameters()) == 416 + 12_832 + 15_690
    # mlp: 784*128 + 128 = 100,480; 128*10 + 10 = 1,290
    assert sum(p.numel() for p in build_model("mlp").parameters()) == 100_480 + 1_290


@pytest.mark.parametrize("name", ["cnn-s", "mlp"])
def test_models_map_images_to_ten_logits(name: str) -> None:
    model = build_model(name)  # type: ignore[arg-type]
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_build_model_is_seeded() -> None:
    a, b = get_params(build_model("cnn-s")), get_params(build_model("cnn-s", seed=0))
    c = get_params(build_model("cnn-s", seed=1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])


def test_cnn_s_computes_the_textbook_layers() -> None:
    # Channels-last with max-pool before ReLU (fedmq.models.CnnS) against BENCHMARK.md's
    # NCHW Conv ReLU MaxPool, same weights: the same function up to float rounding.
    model = build_model("cnn-s")
    x, y = toy_task(16)

    def textbook(x: torch.Tensor) -> torch.Tensor:
        w = {k: torch.tensor(v) for k, v in get_params(model).items()}  # NCHW, C order
        h = F.max_pool2d(F.relu(F.conv2d(x, w["conv1.weight"], w["conv1.bias"], padding=2)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, w["conv2.weight"], w["conv2.bias"], padding=2)), 2)
        return F.linear(h.flatten(1), w["fc.weight"], w["fc.bias"])

    assert torch.allclose(model(x), textbook(x), atol=1e-5)
    assert all(a.flags.c_contiguous for a in get_params(model).values())
    params = get_params(model)
    fit(model, x, y, epochs=1, batch_size=8, lr=0.1, seed=0)
    assert torch.allclose(model(x), textbook(x), atol=1e-5)  # trained weights read back
    assert not np.array_equal(get_params(model)["conv1.weight"], params["conv1.weight"])


def test_build_model_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="cnn-s, mlp"):
        build_model("resnet")  # type: ignore[arg-type]


def test_get_and_set_params_round_trip() -> None:
    source, target = build_model("cnn-s", seed=1), build_model("cnn-s", seed=2)
    params = get_params(source)
    assert list(params) == list(source.state_dict())
    names = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias"]
    assert list(params) == names
    assert all(a.dtype == np.float32 for a in params.values())
    for array in params.values():
        array.flags.writeable = False  # as decoded from the wire: set_params must accept it
    set_params(target, params)
    back = get_params(target)
    assert all(np.array_equal(back[k], params[k]) for k in params)
    back["fc.bias"][:] = 99.0  # copies: writing to them leaves the model alone
    assert not torch.any(target.state_dict()["fc.bias"] == 99.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop", "missing: fc.bias"),
        ("add", "unexpected: extra"),
        ("reshape", r"wrong shape: fc.bias \[5\] != \[10\]"),
    ],
)
def test_set_params_is_strict(change: str, message: str) -> None:
    model = build_model("cnn-s")
    before = get_params(model)
    params = get_params(build_model("cnn-s", seed=3))
    if change == "drop":
        del params["fc.bias"]
    elif change == "add":
        params["extra"] = np.zeros(1, np.float32)
    else:
        params["fc.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=message):
        set_params(model, params)
    after = get_params(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # untouched


def test_training_lowers_the_loss() -> None:
    x, y = toy_task(128)
    model = build_model("cnn-s")
    _, loss_before = evaluate(model, x, y)
    first = fit(model, x, y, epochs=1, batch_size=16, lr=0.05, seed=0)
    last = fit(model, x, y, epochs=3, batch_size=16, lr=0.05, seed=1)
    accuracy, loss_after = evaluate(model, x, y)
    assert last < 0.5 * first  # about 2.4 -> 0.7
    assert loss_after < 0.5 * loss_before  # about 2.26 -> 0.56
    assert accuracy > 0.8  # chance is 0.1


def test_training_is_a_function_of_its_seed() -> None:
    x, y = toy_task(64)
    runs = []
    for seed in (5, 5, 6):
        model = build_model("mlp")
        loss = fit(model, x, y, epochs=1, batch_size=16, lr=0.05, seed=seed)
        runs.append((loss, get_params(model)["fc1.weight"]))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][1], runs[2][1])


def test_training_loss_is_measured_before_each_step() -> None:
    # One epoch, one full batch: the reported loss is the untrained model's loss.
    x, y = toy_task(64)
    model = build_model("mlp")
    _, initial = evaluate(model, x, y)
    loss = fit(model, x, y, epochs=1, batch_size=64, lr=0.05, seed=0)
    assert loss == pytest.approx(initial, rel=1e-5)


def test_one_step_is_plain_sgd() -> None:
    # One epoch, one full batch: every parameter moves by exactly -lr * its gradient.
    x, y = toy_task(16)
    model, reference = build_model("mlp"), build_model("mlp")
    F.cross_entropy(reference(x), y).backward()  # type: ignore[no-untyped-call]
    fit(model, x, y, epochs=1, batch_size=16, lr=0.25, seed=0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert q.grad is not None
        expected = (q - 0.25 * q.grad).detach()
        torch.testing.assert_close(p.detach(), expected, msg=name)


def test_evaluate_on_a_tiny_set() -> None:
    model = build_model("mlp")
    x, _ = toy_task(5)
    with torch.no_grad():
        logits = model(x)  # [5, 10]
    y = logits.argmax(dim=1).clone()
    y[:2] = (y[:2] + 1) % 10  # the first two are wrong, the other three right
    accuracy, loss = evaluate(model, x, y, batch_size=2)  # 3 batches: 2, 2, 1
    assert accuracy == pytest.approx(3 / 5)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert model.training  # the mode is restored


def test_bad_arguments() -> None:
    model = build_model("mlp")
    x, y = toy_task(4)
    for settings, field in [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"optimizer": "lbfgs"}, "optimizer"),
    ]:
        with pytest.raises(ConfigError, match=field):
            Training(**settings)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="empty"):
        fit(model, x[:0], y[:0], epochs=1, batch_size=2, lr=0.1, seed=0)
    with pytest.raises(DataError, match="disagree"):
        evaluate(model, x, y[:3])


def test_other_optimizers_and_losses_train() -> None:
    # Adam with a regression loss on a learnable linear target: the loss falls.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    model = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(0))
    training = Training(epochs=5, batch_size=32, lr=0.05, optimizer="adam", loss=F.mse_loss)
    first = train_local(model, TensorDataset(x, y), training, 0)
    last = train_local(model, TensorDataset(x, y), training, 1)
    assert last < 0.2 * first
    momentum = Training(epochs=2, batch_size=32, lr=0.01, momentum=0.9, loss=F.mse_loss)
    assert train_local(model, TensorDataset(x, y), momentum, 2) < first


def test_a_dataset_that_is_not_a_tensor_dataset_trains_through_a_dataloader() -> None:
    x, y = toy_task(64)

    class Pairs(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
        def __len__(self) -> int:
            return len(y)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return x[i], y[i]

    model = build_model("mlp")
    _, before = evaluate(model, x, y)
    train_local(model, Pairs(), Training(epochs=3, batch_size=16, lr=0.05), 0)
    _, after = evaluate(model, x, y)
    assert after < 0.7 * before


def test_integer_buffers_stay_on_the_device() -> None:
    # BatchNorm's num_batches_tracked is a counter: never a federated weight.
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    params = get_params(model)
    assert "1.num_batches_tracked" not in params
    assert {"1.running_mean", "1.running_var", "1.weight"} <= set(params)
    model(torch.randn(8, 3))  # one training-mode batch: the counter moves to 1
    set_params(model, {k: np.zeros_like(v) for k, v in params.items()})
    assert int(model.state_dict()["1.num_batches_tracked"]) == 1
    assert float(model.state_dict()["1.running_var"].abs().sum()) == 0.0
