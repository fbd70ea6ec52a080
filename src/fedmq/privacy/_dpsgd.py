"""Example-level DP-SGD on the device, with Opacus: one ``DPSGD`` per device.

For a few sites with many records each (hospitals, monitoring stations), where
client-level DP would need thousands of devices: every local step samples a batch with
Poisson sampling (each example in with probability ``q = batch_size / n``), clips each
example's gradient to ``max_grad_norm``, adds N(0, (z * max_grad_norm)^2) to the sum
(Opacus's ``GradSampleModule`` and ``DPOptimizer``) and counts the step in Opacus's RDP
accountant. The accountant lives as long as the device: epsilon accumulates over every
local epoch the device ever runs (``state_dict`` goes to the device's state dir, so a
reboot never resets it). What it protects is one *example* of the device's data
(example-level, not the whole device: docs/privacy.md).

Opacus is used piecewise (not ``PrivacyEngine.make_private``) for two reasons: the
same accountant must span many local trainings, each with a fresh optimizer as
``Training`` says; and the batches must come from a seeded generator (the result
depends only on the arguments, like ``train_local``), where ``make_private`` draws
its Poisson batches from torch's global generator.

Models: Opacus's hooks compute per-example gradients for Linear and Conv layers, not
for ``nn.GRU`` (air-quality). ``ModuleValidator.fix`` swaps it for ``opacus.layers.DPGRU``,
which loads and saves its weights under ``nn.GRU``'s names (``weight_ih_l0``...): the
device trains a fixed copy and writes its weights back into the task's model, so the
update on the wire carries the model's own tensor names. ``grad_sample_mode="functorch"``
does not work on ``nn.GRU`` (opacus 1.6: a shape error in the vmapped backward).

Optimizers: DP-SGD is about the gradient; the task's optimizer (SGD, or Adam for
air-quality: DP-Adam) is wrapped in ``DPOptimizer``, which clips and noises the gradient
before the wrapped optimizer's step (post-processing: no privacy cost of its own).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from fedmq.errors import ConfigError, DataError
from fedmq.models import Training
from fedmq.privacy._checks import check_mechanism, finite_positive, positive_int, require

__all__ = ["DPSGD", "DPSGDConfig"]


@dataclass(frozen=True, kw_only=True)
class DPSGDConfig:
    """DP-SGD's settings: the noise (``noise_multiplier`` z, or a ``target_epsilon`` to
    calibrate it for), the per-example clip ``max_grad_norm`` and ``delta``.

    With ``target_epsilon``, z is the smallest that keeps ``planned_epochs`` local epochs
    within (target_epsilon, delta) (Opacus's ``get_noise_multiplier``), and the device
    stops training when its next local training would spend more. With
    ``noise_multiplier`` alone there is no budget: the spent epsilon is only reported.
    """

    max_grad_norm: float = 1.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    planned_epochs: int = 20

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError("dp-sgd: give exactly one of noise_multiplier (z) and target_epsilon")
        check_mechanism("dp-sgd", self.noise_multiplier, self.target_epsilon, self.delta)
        require(
            finite_positive(self.max_grad_norm),
            "dp-sgd",
            "max_grad_norm",
            "a finite number > 0",
            self.max_grad_norm,
        )
        require(
            positive_int(self.planned_epochs),
            "dp-sgd",
            "planned_epochs",
            "an integer >= 1",
            self.planned_epochs,
        )


class DPSGD:
    """One device's DP-SGD: its noise, its accountant and the training loop.

    ``num_examples`` and ``batch_size`` fix the sampling rate q = batch_size / n (at
    most 1) and the steps of one epoch, ``int(1 / q)`` (as Opacus's ``DPDataLoader``).
    Not thread-safe: one training at a time (a device trains once at a time).
    """

    mechanism = "dp-sgd"

    def __init__(self, config: DPSGDConfig, *, num_examples: int, batch_size: int) -> None:
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier

        if num_examples < 1:
            raise DataError("dp-sgd: no examples to train on")
        self.config = config
        self.sample_rate = min(1.0, batch_size / num_examples)
        self.steps_per_epoch = int(1 / self.sample_rate)
        self.num_examples = num_examples
        if config.noise_multiplier is not None:
            self.noise_multiplier = config.noise_multiplier
        else:
            assert config.target_epsilon is not None
            self.noise_multiplier = float(
                get_noise_multiplier(
                    target_epsilon=config.target_epsilon,
                    target_delta=config.delta,
                    sample_rate=self.sample_rate,
                    steps=config.planned_epochs * self.steps_per_epoch,
                    accountant="rdp",
                )
            )
        self.accountant = RDPAccountant()
        self._module: Any = None  # the GradSampleModule, made at the first training
        self._fixed: nn.Module | None = None

    @property
    def delta(self) -> float:
        return self.config.delta

    @property
    def budget(self) -> float | None:
        """The epsilon the device may spend (None: unbounded, only reported)."""
        return self.config.target_epsilon

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        return _epsilon(self.accountant.history, self.delta)

    def epsilon_after(self, epochs: int) -> float:
        """Epsilon once ``epochs`` more local epochs are run (nothing is recorded)."""
        extra = (self.noise_multiplier, self.sample_rate, epochs * self.steps_per_epoch)
        return _epsilon([*self.accountant.history, extra], self.delta)

    def fits(self, epochs: int) -> bool:
        """Whether ``epochs`` more local epochs stay within the budget (always, if none)."""
        return self.budget is None or self.epsilon_after(epochs) <= self.budget

    def charge(self, epochs: int) -> None:
        """Record ``epochs`` local epochs without training: what a released update
        trained elsewhere cost (the virtual clock drops a too-stale update uncomputed)."""
        for _ in range(epochs * self.steps_per_epoch):
            self.accountant.step(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate
            )

    def train(self, model: nn.Module, data: Dataset[Any], training: Training, seed: int) -> float:
        """``train_local`` with DP-SGD: ``training.epochs`` epochs of ``steps_per_epoch``
        Poisson-sampled steps on ``model`` (in place); returns the last epoch's mean loss
        per example drawn. Every step is counted in the accountant."""
        from opacus.optimizers import DPOptimizer

        module, fixed = self._prepare(model)
        _copy_tensors(model, fixed)
        generator = torch.Generator().manual_seed(seed)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = DPOptimizer(
            _optimizer(params, training),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            expected_batch_size=max(1, round(self.sample_rate * self.num_examples)),
            generator=generator,
        )
        optimizer.attach_step_hook(
            self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate)
        )
        batch = _batcher(data)
        module.train()
        loss_sum, drawn = 0.0, 0
        for _ in range(training.epochs):
            loss_sum, drawn = 0.0, 0
            for _ in range(self.steps_per_epoch):
                # Poisson sampling: each example in with probability q, independently.
                mask = torch.rand(self.num_examples, generator=generator) < self.sample_rate
                indices = mask.nonzero().squeeze(1)
                optimizer.zero_grad(set_to_none=True)
                if len(indices) == 0:
                    # An empty batch still takes a (noise only) step: skipping it would
                    # reveal that the batch was empty, which the accountant assumes hidden.
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                    optimizer.step()
                    continue
                inputs, targets = batch(indices)
                loss = training.loss(module(inputs), targets)
                loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
                optimizer.step()
                loss_sum += loss.item() * len(indices)
                drawn += len(indices)
        _copy_tensors(fixed, model)
        return loss_sum / drawn if drawn else float(loss_sum)

    def state_dict(self) -> dict[str, Any]:
        """What the device keeps across reboots: the accountant's history of
        (noise_multiplier, sample_rate, steps)."""
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.accountant.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mechanism") != self.mechanism:
            raise ConfigError(
                f"dp-sgd: the device's privacy state is for {state.get('mechanism')!r};"
                " a device keeps one mechanism (a new state dir starts a new device)"
            )
        self.accountant.history = [
            (float(z), float(q), int(steps)) for z, q, steps in state["history"]
        ]

    def _prepare(self, model: nn.Module) -> tuple[Any, nn.Module]:
        if self._module is None:
            from opacus import GradSampleModule
            from opacus.validators import ModuleValidator

            fixed = ModuleValidator.fix(copy.deepcopy(model))  # nn.GRU -> DPGRU, same names
            errors = ModuleValidator.validate(fixed, strict=False)
            if errors:
                raise ConfigError(f"dp-sgd: Opacus cannot train this model: {errors[0]}")
            if _names(fixed) != _names(model):
                raise ConfigError(
                    "dp-sgd: the model Opacus can train names its tensors differently"
                    f" ({sorted(_names(fixed) ^ _names(model))[:4]})"
                )
            self._fixed = fixed
            self._module = GradSampleModule(fixed, loss_reduction="mean")
        assert self._fixed is not None
        return self._module, self._fixed


def _names(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}


@torch.no_grad()
def _copy_tensors(source: nn.Module, target: nn.Module) -> None:
    """Copy every parameter and buffer by name. ``named_parameters`` of a module holding
    ``DPGRU`` gives ``nn.GRU``'s names for the same tensors (Opacus's RenameParamsMixin),
    where its ``state_dict`` nests them differently (``gru.l0.ih.weight``)."""
    tensors = dict(source.named_parameters()) | dict(source.named_buffers())
    for name, tensor in [*target.named_parameters(), *target.named_buffers()]:
        tensor.copy_(tensors[name])


def _epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def _optimizer(params: list[nn.Parameter], training: Training) -> torch.optim.Optimizer:
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.SGD(
        params, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay
    )


def _batcher(data: Dataset[Any]) -> Callable[[torch.Tensor], tuple[Any, Any]]:
    """``indices -> (inputs, targets)``: by indexing for a TensorDataset, else collated."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
        return lambda indices: (x[indices], y[indices])

    def collate(indices: torch.Tensor) -> tuple[Any, Any]:
        inputs, targets = default_collate([data[int(i)] for i in indices])
        return inputs, targets

    return collate
