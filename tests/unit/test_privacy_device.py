"""Privacy on the device: DP-SGD (Opacus) and local DP, their accountants, the budget stop,
the wire field that carries the spend, and what the aggregator keeps of it.

The libraries' own numbers are the reference: Opacus's RDP accountant for DP-SGD and
dp_accounting's RDP accountant for local DP, each computed here independently.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import time
import warnings
from typing import Any

import dp_accounting
import msgpack
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import TensorDataset

from fedmq.aggregator import AggregatorStats
from fedmq.codecs import CodecConfig, SparseTensor, encode_params
from fedmq.errors import ConfigError, Reason, WireError
from fedmq.models import get_params
from fedmq.participant import PrivacyBudgetSpent
from fedmq.participant._trainer import Trainer
from fedmq.privacy import DPSGD, DPSGDConfig, LocalDP, LocalDPConfig, clip
from fedmq.wire import PrivacySpend, UpdateEnvelope, decode_update, encode_update
from fedmq.wire import open_update as open_signed_update
from tests import tasks

N, BATCH = 64, 8


@pytest.fixture(autouse=True)
def _quiet_opacus() -> Any:
    # Opacus warns about secure_mode and full backward hooks: known, and not ours to fix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny_data(n: int = N) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return TensorDataset(x, y)


# -- DP-SGD ---------------------------------------------------------------------------


def test_dpsgd_epsilon_is_opacus_rdp_of_every_step_run() -> None:
    task = tasks.fmnist(batch_size=BATCH)
    training = dataclasses.replace(task.training, epochs=2)
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.1, max_grad_norm=1.0), num_examples=N, batch_size=8)
    model = task.build_model(0)
    before = get_params(model)
    dp.train(model, tiny_data(), training, seed=1)
    dp.train(model, tiny_data(), training, seed=2)
    # Independently: 2 trainings x 2 epochs x int(1 / q) steps at q = 8 / 64.
    reference = RDPAccountant()
    reference.history = [(1.1, 8 / 64, 2 * 2 * 8)]
    assert dp.epsilon == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    assert dp.epsilon > 0
    after = get_params(model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # it trained


def test_dpsgd_target_epsilon_calibrates_with_opacus_and_stops_at_the_budget() -> None:
    config = DPSGDConfig(target_epsilon=2.0, planned_epochs=3, delta=1e-5)
    dp = DPSGD(config, num_examples=N, batch_size=BATCH)
    expected = get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=BATCH / N, steps=3 * 8
    )
    assert dp.noise_multiplier == pytest.approx(expected)
    for _ in range(3):
        assert dp.fits(1)
        dp.charge(1)
    assert dp.epsilon <= 2.0
    assert not dp.fits(1)  # a fourth epoch would exceed the budget


def test_dpsgd_trains_the_air_quality_gru_through_dpgru_and_keeps_its_names() -> None:
    from fedmq.tasks.air_quality._model import GruForecaster

    model = GruForecaster(n_features=3, hidden=4)
    names = [n for n, _ in model.named_parameters()]
    x, y = torch.rand(32, 6, 3), torch.rand(32)
    training = dataclasses.replace(
        tasks.fmnist().training, optimizer="adam", lr=1e-2, loss=torch.nn.functional.mse_loss
    )
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.0), num_examples=32, batch_size=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = dp.train(model, TensorDataset(x, y), training, seed=0)
    assert math.isfinite(loss)
    assert [n for n, _ in model.named_parameters()] == names  # nn.GRU still, on the wire too
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_the_device_stops_before_the_update_that_would_exceed_its_budget() -> None:
    task = tasks.fmnist(batch_size=BATCH)
    trainer = Trainer(
        participant_id="dev-01",
        task=task,
        data=tiny_data(),
        seed=0,
        codec=CodecConfig(),
        dp_sgd=DPSGDConfig(target_epsilon=1.0, planned_epochs=2),
    )
    base = get_params(task.build_model(0))
    spends = []
    for seq in range(2):
        body = trainer.step(0, base, seq, created=time.time())
        assert body is not None
        update = open_signed_update(body, spec=_spec(base))
        assert update.privacy is not None
        spends.append(update.privacy)
    assert [s.mechanism for s in spends] == ["dp-sgd", "dp-sgd"]
    assert 0 < spends[0].epsilon < spends[1].epsilon <= 1.0
    assert not trainer.can_train()
    with pytest.raises(PrivacyBudgetSpent, match="epsilon"):
        trainer.step(0, base, 2, created=time.time())


# -- local DP -------------------------------------------------------------------------


def test_clip_scales_the_whole_update_dense_and_sparse() -> None:
    dense = np.array([3.0, 0.0], np.float32)
    delta: dict[str, np.ndarray | SparseTensor] = {
        "a": dense,
        "b": SparseTensor((4,), np.array([1], np.uint32), np.array([4.0], np.float32)),
    }
    clipped, norm = clip(delta, 1.0)
    assert norm == 5.0  # sqrt(3^2 + 4^2), over both tensors together
    assert isinstance(clipped["a"], np.ndarray) and np.allclose(clipped["a"], [0.6, 0.0])
    sparse = clipped["b"]
    assert isinstance(sparse, SparseTensor) and np.allclose(sparse.values, [0.8])
    same, norm = clip(delta, 10.0)
    kept = same["a"]
    assert norm == 5.0 and isinstance(kept, np.ndarray) and np.array_equal(kept, dense)
    assert kept is dense  # within the bound: as it is, no copy (callers never write it)


def test_local_noise_is_gaussian_of_std_z_times_c() -> None:
    local = LocalDP(LocalDPConfig(noise_multiplier=2.0, clip_norm=0.5))
    # Exact, with a seeded generator: clip (a no-op here), then N(0, (z C)^2) per coordinate.
    delta = {"w": np.full((3, 4), 0.01, np.float32)}
    noisy = local.privatize(delta, np.random.default_rng(7))
    noise = np.random.default_rng(7).normal(0.0, 1.0, (3, 4)).astype(np.float32)
    assert np.array_equal(noisy["w"], delta["w"] + noise)
    # Statistically, on a large tensor: the std is z * C = 1.0.
    big = local.privatize({"w": np.zeros(1_000_000, np.float32)}, np.random.default_rng(0))
    assert big["w"].std() == pytest.approx(1.0, rel=0.01)
    # An update far over C is clipped to C before the noise (its norm no longer counts).
    huge = local.privatize({"w": np.full(4, 1e6, np.float32)}, np.random.default_rng(1))
    expected = np.full(4, 0.25) + np.random.default_rng(1).normal(0.0, 1.0, 4)
    assert np.allclose(huge["w"], expected)


def test_local_epsilon_is_dp_accounting_rdp_of_the_updates_sent() -> None:
    local = LocalDP(LocalDPConfig(noise_multiplier=3.0, delta=1e-6))
    for _ in range(5):
        local.privatize({"w": np.zeros(2, np.float32)}, np.random.default_rng())
    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(3.0), 5))
    assert local.sent == 5
    assert local.epsilon == pytest.approx(reference.get_epsilon(1e-6), rel=1e-12)


def test_local_target_epsilon_calibrates_and_the_trainer_stops_at_the_budget() -> None:
    task = tasks.fmnist(batch_size=BATCH)
    config = LocalDPConfig(target_epsilon=4.0, planned_updates=3, clip_norm=0.1)
    trainer = Trainer(
        participant_id="dev-01",
        task=task,
        data=tiny_data(16),
        seed=0,
        codec=CodecConfig(name="int8"),  # with error feedback: noise happens before it
        local_dp=config,
    )
    assert isinstance(trainer.privacy, LocalDP)
    z = trainer.privacy.noise_multiplier
    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), 3))
    assert reference.get_epsilon(1e-5) == pytest.approx(4.0, abs=0.01)
    assert reference.get_epsilon(1e-5) <= 4.0
    base = get_params(task.build_model(0))
    for seq in range(3):
        assert trainer.step(0, base, seq, created=time.time()) is not None
    assert trainer.privacy.sent == 3
    with pytest.raises(PrivacyBudgetSpent):
        trainer.step(0, base, 3, created=time.time())


# -- the accountant's state -----------------------------------------------------------


def test_the_accountants_state_round_trips_and_refuses_another_mechanism() -> None:
    dp = DPSGD(DPSGDConfig(noise_multiplier=1.0), num_examples=N, batch_size=BATCH)
    dp.charge(3)
    again = DPSGD(DPSGDConfig(noise_multiplier=1.0), num_examples=N, batch_size=BATCH)
    again.load_state_dict(dp.state_dict())
    assert again.epsilon == dp.epsilon > 0
    local = LocalDP(LocalDPConfig(noise_multiplier=1.0))
    with pytest.raises(ConfigError, match="mechanism"):
        local.load_state_dict(dp.state_dict())


# -- the wire field -------------------------------------------------------------------


def _spec(params: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in params.items()}


PARAMS = {"w": np.zeros((2, 2), np.float32)}


def _envelope(privacy: PrivacySpend | None) -> UpdateEnvelope:
    return UpdateEnvelope(
        participant="dev-01",
        seq=1,
        base_version=0,
        num_examples=10,
        loss=0.5,
        created=1.0,
        tensors=tuple(encode_params(PARAMS, CodecConfig())),
        privacy=privacy,
    )


def test_the_privacy_field_round_trips_and_is_absent_without_dp() -> None:
    spend = PrivacySpend(mechanism="dp-sgd", epsilon=1.25, delta=1e-5)
    body = encode_update(_envelope(spend))
    assert decode_update(body, spec=_spec(PARAMS)).privacy == spend
    plain = encode_update(_envelope(None))
    assert b"privacy" not in plain  # old aggregators still take a device without DP
    assert decode_update(plain, spec=_spec(PARAMS)).privacy is None
    assert len(body) - len(plain) == len(msgpack.packb({"privacy": _wire(spend)})) - 1


def _wire(spend: PrivacySpend) -> dict[str, Any]:
    return {"mechanism": spend.mechanism, "epsilon": spend.epsilon, "delta": spend.delta}


@pytest.mark.parametrize(
    ("privacy", "reason"),
    [
        ("dp-sgd", Reason.WRONG_TYPE),  # not a map
        ({"mechanism": "central", "epsilon": 1.0, "delta": 1e-5}, Reason.WRONG_TYPE),
        ({"mechanism": "local", "epsilon": -1.0, "delta": 1e-5}, Reason.WRONG_TYPE),
        ({"mechanism": "local", "epsilon": float("nan"), "delta": 1e-5}, Reason.NON_FINITE),
        ({"mechanism": "local", "epsilon": True, "delta": 1e-5}, Reason.WRONG_TYPE),
        ({"mechanism": "local", "epsilon": 1.0, "delta": 1.0}, Reason.WRONG_TYPE),
        ({"mechanism": "local", "epsilon": 1.0, "delta": 0}, Reason.WRONG_TYPE),
        ({"mechanism": "local", "epsilon": 1.0}, Reason.MISSING_FIELD),
        ({"mechanism": "local", "epsilon": 1.0, "delta": 1e-5, "k": 1}, Reason.EXTRA_FIELD),
    ],
)
def test_a_malformed_privacy_field_is_a_rejection(privacy: object, reason: Reason) -> None:
    fields = msgpack.unpackb(encode_update(_envelope(None)))
    fields["privacy"] = privacy
    with pytest.raises(WireError) as caught:
        decode_update(msgpack.packb(fields, use_bin_type=True), spec=_spec(PARAMS))
    assert caught.value.reason == reason


def test_an_integer_epsilon_is_a_fine_float() -> None:
    fields = msgpack.unpackb(encode_update(_envelope(None)))
    fields["privacy"] = {"mechanism": "local", "epsilon": 3, "delta": 1e-5}
    update = decode_update(msgpack.packb(fields, use_bin_type=True), spec=_spec(PARAMS))
    assert update.privacy == PrivacySpend(mechanism="local", epsilon=3.0, delta=1e-5)


# -- the aggregator's view ------------------------------------------------------------


def test_stats_keep_each_devices_latest_spend_and_summarise_the_fleet() -> None:
    stats = AggregatorStats()
    assert stats.device_epsilon() == {}
    stats.record_privacy("a", PrivacySpend(mechanism="dp-sgd", epsilon=1.0, delta=1e-5))
    stats.record_privacy("a", PrivacySpend(mechanism="dp-sgd", epsilon=2.0, delta=1e-5))
    stats.record_privacy("b", PrivacySpend(mechanism="dp-sgd", epsilon=6.0, delta=1e-5))
    stats.record_privacy("c", PrivacySpend(mechanism="local", epsilon=3.0, delta=1e-6))
    stats.record_privacy("d", None)  # an old device: nothing to keep
    assert stats.device_privacy["a"].epsilon == 2.0
    assert stats.device_epsilon() == {"max": 6.0, "median": 3.0, "devices": 3.0}
    assert stats.device_epsilon("dp-sgd") == {"max": 6.0, "median": 4.0, "devices": 2.0}
    assert stats.device_epsilon("local")["max"] == 3.0


# -- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: DPSGDConfig(noise_multiplier=-1.0), "noise_multiplier"),
        (lambda: DPSGDConfig(target_epsilon=0.0), "target_epsilon"),
        (lambda: DPSGDConfig(noise_multiplier=1.0, delta=1.0), "delta"),
        (lambda: DPSGDConfig(noise_multiplier=1.0, max_grad_norm=0.0), "max_grad_norm"),
        (lambda: DPSGDConfig(noise_multiplier=1.0, planned_epochs=0), "planned_epochs"),
        (lambda: DPSGDConfig(), "exactly one"),
        (lambda: DPSGDConfig(noise_multiplier=1.0, target_epsilon=1.0), "exactly one"),
        (lambda: LocalDPConfig(noise_multiplier=float("nan")), "noise_multiplier"),
        (lambda: LocalDPConfig(target_epsilon=-2.0), "target_epsilon"),
        (lambda: LocalDPConfig(noise_multiplier=1.0, clip_norm=-1.0), "clip_norm"),
        (lambda: LocalDPConfig(noise_multiplier=1.0, delta=0.0), "delta"),
        (lambda: LocalDPConfig(), "exactly one"),
    ],
)
def test_bad_privacy_settings_are_one_line_errors(make: Any, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make()
    assert field in str(caught.value) and "\n" not in str(caught.value)


def test_a_device_takes_one_mechanism_and_dp_sgd_needs_the_default_loop() -> None:
    task = tasks.fmnist()
    kwargs: dict[str, Any] = {"participant_id": "d", "data": tiny_data(8), "seed": 0}
    with pytest.raises(ConfigError, match="one of dp-sgd and local-dp"):
        Trainer(
            task=task,
            codec=CodecConfig(),
            dp_sgd=DPSGDConfig(noise_multiplier=1.0),
            local_dp=LocalDPConfig(noise_multiplier=1.0),
            **kwargs,
        )
    own_loop = dataclasses.replace(task, train=lambda m, d, t, s: 0.0)
    with pytest.raises(ConfigError, match="own train function"):
        Trainer(
            task=own_loop, codec=CodecConfig(), dp_sgd=DPSGDConfig(noise_multiplier=1.0), **kwargs
        )


def test_without_dp_nothing_of_opacus_or_dp_accounting_is_loaded() -> None:
    # The non-private path stays as it was: no import (Opacus alone takes seconds).
    code = (
        "import sys, fedmq.cli, fedmq.participant, fedmq.aggregator, fedmq.sim.virtual;"
        "print(sorted(m for m in ('opacus', 'dp_accounting') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_status_line_names_the_devices_of_the_largest_epsilon() -> None:
    from fedmq.aggregator.main import _device_privacy

    stats = AggregatorStats()
    assert _device_privacy(stats) == {}  # no device runs DP: nothing added to the line
    for i in range(30):
        stats.record_privacy(f"d{i:02d}", PrivacySpend(mechanism="local", epsilon=i, delta=1e-5))
    fields = _device_privacy(stats)
    assert fields["device_epsilon_max"] == 29 and fields["device_epsilon_median"] == 14.5
    assert list(fields["device_privacy"]) == [f"d{i}" for i in range(20, 30)]
    assert fields["device_privacy"]["d29"] == ["local", 29, 1e-5]
