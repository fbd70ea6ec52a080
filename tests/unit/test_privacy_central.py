"""Clipping and client-level DP (central model): hand-computed values, the library's own
numbers for the accountant, participation rules, configuration errors."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedmq.aggregator import AggregatorConfig, BoundsConfig
from fedmq.aggregator._admit import admit, decode
from fedmq.aggregator._bounds import UpdateBounds
from fedmq.codecs import SparseTensor, dense
from fedmq.errors import ConfigError, Reason, RejectedUpdate
from fedmq.privacy import ClientDPConfig, ClientPrivacy, calibrate_noise, client_epsilon, clip
from fedmq.strategies import FedBuffConfig, StrategyConfig, make_strategy
from fedmq.wire import WireLimits, tensor_spec_of
from tests.updates import INITIAL, update

# -- clipping -------------------------------------------------------------------------


def test_clip_dense_scales_all_tensors_together() -> None:
    # norm sqrt(3^2 + 4^2) = 5 over two tensors; bound 1 -> every value / 5
    delta = {"a": np.array([3.0], np.float32), "b": np.array([[0.0, 4.0]], np.float32)}
    clipped, norm = clip(delta, 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(dense(clipped["a"]), np.array([0.6]), rtol=1e-6)
    np.testing.assert_allclose(dense(clipped["b"]), np.array([[0.0, 0.8]]), rtol=1e-6)
    assert dense(clipped["b"]).dtype == np.float32
    assert delta["a"][0] == 3.0  # the input is not modified


def test_clip_within_bound_is_the_same_arrays() -> None:
    delta = {"a": np.array([0.3, 0.4], np.float32)}
    clipped, norm = clip(delta, 1.0)
    assert clipped["a"] is delta["a"]
    assert norm == pytest.approx(0.5)


def test_clip_sparse_scales_values_and_keeps_indices() -> None:
    sparse = SparseTensor(
        shape=(2, 3), indices=np.array([1, 5], np.uint32), values=np.array([6.0, -8.0], np.float32)
    )
    clipped, norm = clip({"s": sparse}, 2.0)  # norm 10 -> factor 0.2
    assert norm == 10.0
    out = clipped["s"]
    assert isinstance(out, SparseTensor)
    np.testing.assert_array_equal(out.indices, [1, 5])
    np.testing.assert_allclose(out.values, [1.2, -1.6], rtol=1e-6)
    np.testing.assert_allclose(out.dense(), [[0, 1.2, 0], [0, 0, -1.6]], rtol=1e-6)


def test_clip_of_a_non_finite_delta_is_zero() -> None:
    clipped, norm = clip({"a": np.array([np.inf, 1.0], np.float32)}, 1.0)
    assert math.isinf(norm)
    np.testing.assert_array_equal(clipped["a"], [0.0, 0.0])


def _bounds(mode: str) -> UpdateBounds:
    return UpdateBounds(BoundsConfig(clip_norm=1.0, clip_mode=mode))  # type: ignore[arg-type]


def test_aggregator_clip_mode_scales_and_counts() -> None:
    bounds = _bounds("clip")
    delta = {"w": np.full((2, 2), 1.0, np.float32)}  # norm 2
    out = bounds.clip(delta, 2.0)
    np.testing.assert_allclose(dense(out["w"]), np.full((2, 2), 0.5), rtol=1e-6)
    assert bounds.clipped == 1
    assert bounds.clip(out, 1.0) is out and bounds.clipped == 1


def test_aggregator_reject_mode_refuses_with_clip_bound() -> None:
    with pytest.raises(RejectedUpdate) as caught:
        _bounds("reject").clip({"w": np.ones(4, np.float32)}, 2.0)
    assert caught.value.reason == Reason.CLIP_BOUND


def test_admit_clips_a_large_update() -> None:
    big = {"w": np.full((2, 2), 10.0, np.float32), "b": np.zeros(2, np.float32)}  # norm 20
    body = update("dev-1", 1, 0, big)
    envelope, delta, norm = decode(
        body, spec=tensor_spec_of(INITIAL), limits=WireLimits(), verifier=None
    )
    bounds = _bounds("clip")
    strategy = make_strategy(StrategyConfig(name="fedbuff"))
    contribution = admit(
        envelope,
        delta,
        norm,
        "dev-1",
        allowed=None,
        last_seq={},
        version=0,
        strategy=strategy,
        bounds=bounds,
        history={0: INITIAL},
    )
    np.testing.assert_allclose(dense(contribution.delta["w"]), np.full((2, 2), 0.5), rtol=1e-6)
    assert bounds.clipped == 1


# -- the mechanism --------------------------------------------------------------------


def _privacy(z: float = 2.0, clip_norm: float = 1.0, k: int = 4, seed: int = 7) -> ClientPrivacy:
    config = ClientDPConfig(clip_norm=clip_norm, noise_multiplier=z)
    return ClientPrivacy(config, k, rng=np.random.default_rng(seed))


def test_combine_exact_values_with_a_seeded_rng() -> None:
    z, c, k = 2.0, 1.0, 4
    a = {"w": np.array([3.0, 4.0], np.float32), "b": np.array([0.5], np.float32)}  # norm > 1
    b = {"w": np.array([0.1, 0.2], np.float32), "b": np.array([0.2], np.float32)}  # within
    g = _privacy(z, c, k).combine([(a, 0.5), (b, 1.0)], 2)
    # by hand: a clipped to norm 1 (factor 1 / sqrt(25.25)), weighted 0.5; b as it is
    factor = 1.0 / math.sqrt(3.0**2 + 4.0**2 + 0.5**2)
    rng = np.random.default_rng(7)
    noise_w = rng.standard_normal((2,), dtype=np.float32)
    noise_b = rng.standard_normal((1,), dtype=np.float32)
    want_w = (0.5 * factor * np.array([3.0, 4.0]) + [0.1, 0.2] + z * c * noise_w) / k
    want_b = (0.5 * factor * 0.5 + 0.2 + z * c * noise_b) / k  # divided by K = 4, not by 2
    np.testing.assert_allclose(g["w"], want_w, rtol=1e-5)
    np.testing.assert_allclose(g["b"], want_b, rtol=1e-5)


def test_noise_std_on_the_mean_is_z_c_over_k() -> None:
    z, c, k = 1.5, 0.5, 10
    n = 400_000
    rng = np.random.default_rng(1)
    entries = [({"w": rng.normal(0, 1, n).astype(np.float32)}, 1.0) for _ in range(3)]
    g = _privacy(z, c, k, seed=3).combine(entries, 3)
    clipped_mean = np.sum([dense(clip(d, c)[0]["w"]) * w for d, w in entries], axis=0) / k
    noise = g["w"] - clipped_mean
    assert np.std(noise) == pytest.approx(z * c / k, rel=0.01)
    assert abs(float(np.mean(noise))) < 5 * z * c / k / math.sqrt(n)


def test_dp_fedbuff_step_uses_the_combine() -> None:
    privacy = _privacy(z=1.0, k=2)
    config = StrategyConfig(name="fedbuff", fedbuff=FedBuffConfig(buffer_size=2))
    strategy = make_strategy(config, combine=privacy.combine)
    from fedmq.strategies import Contribution

    state = strategy.init_state()
    zero = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    params = INITIAL
    for _ in range(2):
        new, state = strategy.step(
            params, state, Contribution(delta=zero, staleness=0, num_examples=1)
        )
    assert new is not None
    assert not np.allclose(new["w"], INITIAL["w"])  # only noise moved it


# -- the accountant -------------------------------------------------------------------


def _library_epsilon(z: float, count: int, delta: float) -> float:
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), count))
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize("min_gap", [1, 3])
def test_epsilon_after_a_few_steps_is_the_librarys(min_gap: int) -> None:
    z, delta = 1.1, 1e-5
    for steps in range(1, 6):
        want = _library_epsilon(z, math.ceil(steps / min_gap), delta)
        assert client_epsilon([(z, min_gap, steps)], delta) == pytest.approx(want, rel=1e-12)


def test_one_step_against_the_closed_form_gaussian_rdp() -> None:
    # RDP of the Gaussian mechanism: alpha / (2 z^2). The classical conversion
    # eps = min_alpha rdp(alpha) + log(1 / delta) / (alpha - 1) is an upper bound on
    # the library's (tighter) conversion, and close to it.
    z, delta = 2.0, 1e-5
    orders = np.concatenate([np.linspace(1.01, 8, 200), np.arange(8, 256)])
    classical = float(np.min(orders / (2 * z**2) + math.log(1 / delta) / (orders - 1)))
    got = client_epsilon([(z, 1, 1)], delta)
    assert got <= classical
    assert got == pytest.approx(classical, rel=0.15)
    # and by hand: at z = 2, classical is about sqrt(2 log(1/delta)) / z + 1 / (2 z^2)
    assert classical == pytest.approx(
        math.sqrt(2 * math.log(1 / delta)) / z + 1 / (2 * z**2), rel=0.02
    )


def test_segments_compose() -> None:
    delta = 1e-5
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 3))
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 2))
    want = accountant.get_epsilon(delta)
    assert client_epsilon([(1.0, 1, 3), (2.0, 2, 4)], delta) == pytest.approx(want)


def test_calibrated_noise_spends_the_target_over_the_planned_steps() -> None:
    z = calibrate_noise(8.0, 1e-5, 100, 2)
    spent = client_epsilon([(z, 2, 100)], 1e-5)
    assert spent <= 8.0
    assert spent == pytest.approx(8.0, rel=1e-3)
    config = ClientDPConfig(clip_norm=1.0, target_epsilon=8.0, planned_steps=100, min_gap=2)
    assert config.z == pytest.approx(z)


# -- participation and the budget -----------------------------------------------------


def test_one_update_per_device_per_step() -> None:
    privacy = _privacy(k=3)
    privacy.check("a")
    privacy.applied("a", stepped=False)
    with pytest.raises(RejectedUpdate) as caught:
        privacy.check("a")
    assert caught.value.reason == Reason.PARTICIPATION
    assert "already" in caught.value.detail
    privacy.check("b")
    privacy.applied("b", stepped=True)
    assert privacy.steps == 1
    privacy.check("a")  # min_gap 1: the next step is fine


def test_min_gap_refuses_a_device_too_soon() -> None:
    config = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, min_gap=3)
    privacy = ClientPrivacy(config, 1)
    privacy.applied("a", stepped=True)  # a in step 1
    for _ in range(2):
        with pytest.raises(RejectedUpdate, match="min_gap 3"):
            privacy.check("a")  # steps 2 and 3
        privacy.applied("x", stepped=True)
        privacy._last_step.pop("x", None)
    privacy.check("a")  # step 4 = 1 + 3


def test_state_round_trip_and_spent_budget() -> None:
    config = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, target_epsilon=20.0)
    privacy = ClientPrivacy(config, 1)
    while not privacy.exhausted():
        privacy.applied("a", stepped=True)
    state = privacy.state()
    assert privacy.epsilon() <= 20.0 < privacy.epsilon(1)
    with pytest.raises(ConfigError, match="budget 20 is spent"):
        ClientPrivacy(config, 1, state=state)
    # with a larger budget it carries on from the same steps
    more = ClientPrivacy(
        ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, target_epsilon=40.0), 1, state=state
    )
    assert more.steps == privacy.steps
    assert more.epsilon() == pytest.approx(privacy.epsilon())
    # a new z starts a new segment; the old steps still count
    other = ClientPrivacy(ClientDPConfig(clip_norm=1.0, noise_multiplier=3.0), 1, state=state)
    assert other.segments == [(1.0, 1, privacy.steps, 0.0), (3.0, 1, 0, 0.0)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, "delta"),
        ({"noise_multiplier": 1.0, "delta": 0.0}, "delta"),
        ({"noise_multiplier": 1.0, "target_epsilon": 0.0}, "epsilon"),
        ({"noise_multiplier": 1.0, "min_gap": 0}, "min_gap"),
        ({"target_epsilon": 1.0}, "planned-steps"),
        ({"noise_multiplier": 1.0, "clip_norm": -1.0}, "clip_norm"),
    ],
)
def test_bad_dp_config_is_one_line(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        ClientDPConfig(**{"clip_norm": 1.0, **kwargs})  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["fedasync", "fedavg"])
def test_dp_refused_without_fedbuff(name: str) -> None:
    with pytest.raises(ConfigError, match="fedbuff") as caught:
        AggregatorConfig(
            strategy=StrategyConfig(name=name),  # type: ignore[arg-type]
            privacy=ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0),
        )
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "norm_bounded"])
def test_dp_refused_with_a_robust_rule_live_too(rule: str) -> None:
    from fedmq.aggregator._tuning import retuned
    from fedmq.strategies import RobustConfig, tuned

    def fedbuff(robust: str) -> StrategyConfig:
        return StrategyConfig(name="fedbuff", robust=RobustConfig(rule=robust))  # type: ignore[arg-type]

    dp = ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="robust mean") as caught:
        AggregatorConfig(strategy=fedbuff(rule), privacy=dp)
    assert "\n" not in str(caught.value)
    running = AggregatorConfig(strategy=fedbuff("mean"), privacy=dp)
    with pytest.raises(ConfigError, match="robust mean"):  # `fedmq ctl set robust=...`
        retuned(running, tuned(running.strategy, {"robust": rule}))


def test_budget_too_small_for_one_step() -> None:
    with pytest.raises(ConfigError, match="spent"):
        ClientPrivacy(ClientDPConfig(clip_norm=1.0, noise_multiplier=0.5, target_epsilon=0.1), 1)


def test_a_ledger_newer_than_the_checkpoint_wins() -> None:
    from fedmq.privacy import newest_state

    checkpoint = {"segments": [[1.0, 2, 3]], "last_step": {"a": 3}, "pending": ["b"]}
    ledger = {"segments": [[1.0, 2, 4]], "last_step": {"a": 3, "b": 4}, "pending": []}
    merged = newest_state(checkpoint, ledger)
    assert merged is not None
    assert merged["segments"] == [[1.0, 2, 4]]  # the step whose model went out counts
    assert merged["last_step"] == {"a": 3, "b": 4}
    assert merged["pending"] == ["b"]  # the restored buffer's devices
    assert newest_state(checkpoint, {**checkpoint, "pending": []}) is checkpoint
    assert newest_state(None, ledger) == {**ledger, "pending": []}


def test_device_clips_before_the_codec_and_feedback_keeps_only_the_codec_error() -> None:
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from fedmq.codecs import CodecConfig
    from fedmq.participant._trainer import Trainer
    from fedmq.tasks import DeviceData, Metric, Task, Training
    from fedmq.wire import decode_update, materialize

    def train(model: nn.Module, data: object, training: Training, seed: int) -> float:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(3.0)  # a delta of 3 everywhere: norm 3 * sqrt(4) = 6
        return 0.5

    x = torch.zeros(4, 3)
    task = Task(
        name="tiny",
        model=lambda: nn.Linear(3, 1),
        load_data=lambda path: DeviceData(train=TensorDataset(x), held_out=TensorDataset(x)),
        evaluate=lambda model, dataset: {"rmse": 1.0},
        target=Metric("rmse", higher_is_better=False),
        train=train,
    )
    trainer = Trainer(
        participant_id="dev-1",
        task=task,
        data=TensorDataset(x),
        seed=0,
        codec=CodecConfig(name="int4", block_size=64),
        clip_norm=1.0,
    )
    base = {k: v.detach().numpy().copy() for k, v in trainer.model.state_dict().items()}
    body = trainer.step(0, base, 1, 0.0)
    assert body is not None
    sent = materialize(decode_update(body, spec=tensor_spec_of(base)).tensors)
    assert trainer.feedback is not None
    residual = trainer.feedback.state_dict()
    for name in base:  # clipped delta = 3 / 6 = 0.5 everywhere = what was sent + residual
        np.testing.assert_allclose(sent[name] + residual[name], 0.5, rtol=1e-5)
    total = math.sqrt(sum(float(np.sum(r**2)) for r in residual.values()))
    assert total < 0.1  # the codec's error only, not the 5 that clipping removed


# -- adaptive clipping (Andrew et al., 2021) -------------------------------------------


def test_adaptive_clipping_moves_c_from_a_noised_count_once_the_step_is_taken() -> None:
    z, c, k, q, lr, sigma = 1.0, 1.0, 4, 0.5, 0.2, 0.5
    config = ClientDPConfig(
        clip_norm=c,
        noise_multiplier=z,
        adaptive_quantile=q,
        adaptive_lr=lr,
        count_noise=sigma,
    )
    privacy = ClientPrivacy(config, k, rng=np.random.default_rng(11))
    small = {"w": np.array([0.3], np.float32)}  # within C
    large = {"w": np.array([5.0], np.float32)}  # above C
    g = privacy.combine([(small, 1.0), (small, 1.0), (small, 1.0), (large, 1.0)], 4)
    rng = np.random.default_rng(11)
    noise = rng.standard_normal((1,), dtype=np.float32)
    count = (3 + rng.normal(0.0, sigma)) / k  # three of four within C, noised
    np.testing.assert_allclose(g["w"], (0.9 + 1.0 + z * c * noise) / k, rtol=1e-5)
    assert privacy.clip_norm == c  # not before the step is applied
    privacy.stepped()
    assert privacy.clip_norm == pytest.approx(c * math.exp(-lr * (count - q)))
    assert privacy.state()["clip_norm"] == privacy.clip_norm  # checkpointed


def test_the_noised_count_is_accounted_as_a_second_gaussian_per_step() -> None:
    z, sigma, delta = 1.2, 2.0, 1e-5
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    )
    step = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z), dp_accounting.GaussianDpEvent(sigma)]
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(step, 5))
    got = client_epsilon([(z, 1, 5, sigma)], delta)
    assert got == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
    assert got > client_epsilon([(z, 1, 5)], delta)  # it costs something
    calibrated = ClientDPConfig(
        clip_norm=1.0,
        target_epsilon=4.0,
        planned_steps=50,
        adaptive_quantile=0.5,
        count_noise=20.0,
    )
    assert client_epsilon([(calibrated.z, 1, 50, 20.0)], delta) <= 4.0
    with pytest.raises(ConfigError, match="noised count alone"):
        ClientDPConfig(
            clip_norm=1.0,
            target_epsilon=4.0,
            planned_steps=50,
            adaptive_quantile=0.5,
            count_noise=sigma,
        )


def test_adaptive_clipping_needs_count_noise() -> None:
    with pytest.raises(ConfigError, match="count_noise"):
        ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, adaptive_quantile=0.5)
    with pytest.raises(ConfigError, match="adaptive_quantile"):
        ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0, adaptive_quantile=1.5, count_noise=1.0)
