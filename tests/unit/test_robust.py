"""Robust aggregation (issue #11): FedBuff's median, trimmed mean and norm-bounded mean
against arithmetic done by hand (dense and sparse), FedAsync's outlier check, their
configuration errors, the live knobs, and the bench attacks."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch.utils.data import TensorDataset

from fedmq.admin import ctl
from fedmq.aggregator import AggregatorConfig, BoundsConfig, ControlConfig
from fedmq.aggregator._checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedmq.cli import main
from fedmq.codecs import CodecConfig, SparseTensor
from fedmq.errors import ConfigError, Reason, RejectedUpdate
from fedmq.models import get_params
from fedmq.participant._trainer import Trainer
from fedmq.sim._attacks import Attack, AttackConfig, check_attack
from fedmq.strategies import (
    Contribution,
    Entry,
    FedAsyncConfig,
    FedAsyncState,
    FedBuffConfig,
    FedBuffState,
    RobustConfig,
    StalenessConfig,
    StrategyConfig,
    coordinate_median,
    knob_values,
    make_strategy,
    norm_bounded_mean,
    outlier_limit,
    parse_assignments,
    robust_combine,
    trimmed_mean,
    tuned,
    weighted_mean,
)
from fedmq.tasks.fashion_mnist import FmnistSettings, make_task
from fedmq.transport import TransportConfig
from fedmq.wire import decode_update, materialize, tensor_spec_of
from tests import updates

# The live-tuning tests' running aggregator and helpers (the in-process broker).
from tests.unit.test_tuning import URL, running, send, until
from tests.updates import INITIAL, delta

Arrays = dict[str, npt.NDArray[np.float32]]


def arrays(**tensors: list[float]) -> Arrays:
    out = {}
    for name, values in tensors.items():
        array = np.array(values, dtype=np.float32)
        array.flags.writeable = False  # a rule that writes to its input fails loudly
        out[name] = array
    return out


def sparse(shape: int, indices: list[int], values: list[float]) -> SparseTensor:
    return SparseTensor(
        (shape,), np.array(indices, dtype=np.uint32), np.array(values, dtype=np.float32)
    )


# Three deltas of two tensors; weights 1, 1, 0.5 (staleness weights).
ENTRIES: list[Entry] = [
    (arrays(a=[1.0, 10.0], b=[4.0]), 1.0),
    (arrays(a=[2.0, -1.0], b=[0.0]), 1.0),
    (arrays(a=[3.0, 0.0], b=[-4.0]), 0.5),
]


# -- the rules, by hand ---------------------------------------------------------------------


def test_median_is_per_coordinate_over_the_weighted_deltas() -> None:
    g = coordinate_median(ENTRIES, 3)
    # a[0]: median(1, 2, 1.5) = 1.5; a[1]: median(10, -1, 0) = 0; b: median(4, 0, -2) = 0
    np.testing.assert_array_equal(g["a"], np.array([1.5, 0.0], np.float32))
    np.testing.assert_array_equal(g["b"], np.array([0.0], np.float32))
    assert g["a"].dtype == np.float32
    # even count: the mean of the two middle values; a huge minority does not move it
    four = [*ENTRIES, (arrays(a=[1e6, 1e6], b=[1e6]), 1.0)]
    g = coordinate_median(four, 4)
    np.testing.assert_array_equal(g["a"], np.array([(1.5 + 2) / 2, (0 + 10) / 2], np.float32))
    np.testing.assert_array_equal(g["b"], np.array([(0 + 4) / 2], np.float32))


def test_median_makes_sparse_deltas_dense() -> None:
    entries: list[Entry] = [
        ({"a": sparse(3, [0], [5.0])}, 1.0),
        ({"a": sparse(3, [0, 2], [1.0, 2.0])}, 1.0),
        ({"a": np.array([3.0, 1.0, -1.0], np.float32)}, 1.0),
    ]
    # columns: (5, 1, 3) -> 3; (0, 0, 1) -> 0; (0, 2, -1) -> 0
    np.testing.assert_array_equal(coordinate_median(entries, 3)["a"], [3.0, 0.0, 0.0])


def test_trimmed_mean_cuts_floor_beta_k_at_each_end() -> None:
    five: list[Entry] = [(arrays(a=[v, -v]), 1.0) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    # beta 0.2, K 5: cut 1 each end -> mean(2, 3, 4) = 3, and mean(-4, -3, -2) = -3
    np.testing.assert_allclose(trimmed_mean(five, 5, 0.2)["a"], [3.0, -3.0])
    # beta 0.1, K 5: floor(0.5) = 0, nothing cut: the plain mean of the weighted deltas
    np.testing.assert_allclose(trimmed_mean(five, 5, 0.1)["a"], [22.0, -22.0])
    # weights scale each delta first: (1, 2, 1.5) -> cut 1 each end -> 1.5
    np.testing.assert_allclose(trimmed_mean(ENTRIES, 3, 0.34)["a"], [1.5, 0.0])
    # beta 0 is the unweighted mean of w_i * delta_i, i.e. weighted_mean with k = K
    np.testing.assert_allclose(
        trimmed_mean(ENTRIES, 3, 0.0)["a"], weighted_mean(ENTRIES, 3)["a"], rtol=1e-6
    )


def test_trimmed_mean_of_sparse_deltas() -> None:
    entries: list[Entry] = [
        ({"a": sparse(2, [0], [9.0])}, 1.0),
        ({"a": sparse(2, [1], [1.0])}, 1.0),
        ({"a": np.array([1.0, 2.0], np.float32)}, 1.0),
        ({"a": np.array([2.0, 3.0], np.float32)}, 1.0),
    ]
    # columns: (9, 0, 1, 2) -> cut 1 each end -> mean(1, 2) = 1.5; (0, 1, 2, 3) -> 1.5
    np.testing.assert_allclose(trimmed_mean(entries, 4, 0.25)["a"], [1.5, 1.5])


def test_norm_bounded_clips_to_the_buffers_median_norm_then_takes_the_weighted_mean() -> None:
    # norms: sqrt(1 + 100 + 16) = sqrt(117), sqrt(5), sqrt(9 + 16) = 5; median 5
    g, clipped = norm_bounded_mean(ENTRIES, 3, 1.0)
    assert clipped == 1
    s = 5.0 / math.sqrt(117.0)  # the first delta scaled down to norm 5
    np.testing.assert_allclose(g["a"], [(s * 1 + 2 + 0.5 * 3) / 3, (s * 10 - 1 + 0) / 3], rtol=1e-6)
    np.testing.assert_allclose(g["b"], [(s * 4 + 0 + 0.5 * -4) / 3], rtol=1e-6)
    # a bound above every norm is FedBuff's own weighted mean
    g, clipped = norm_bounded_mean(ENTRIES, 3, 3.0)
    assert clipped == 0
    np.testing.assert_array_equal(g["a"], weighted_mean(ENTRIES, 3)["a"])


def test_norm_bounded_keeps_sparse_deltas_sparse_and_clips_them() -> None:
    entries: list[Entry] = [
        ({"a": sparse(3, [1], [30.0])}, 1.0),  # norm 30
        ({"a": sparse(3, [0, 2], [3.0, 4.0])}, 1.0),  # norm 5
        ({"a": np.array([0.0, 2.0, 0.0], np.float32)}, 1.0),  # norm 2
    ]
    g, clipped = norm_bounded_mean(entries, 3, 2.0)  # bound 2 x median 5 = 10
    assert clipped == 1
    np.testing.assert_allclose(g["a"], [3.0 / 3, (10.0 + 2.0) / 3, 4.0 / 3], rtol=1e-6)


def test_the_rule_names_its_combine() -> None:
    assert robust_combine(RobustConfig()) is weighted_mean  # the default path, untouched
    median = robust_combine(RobustConfig(rule="median"))
    np.testing.assert_array_equal(median(ENTRIES, 3)["a"], coordinate_median(ENTRIES, 3)["a"])
    bounded = robust_combine(RobustConfig(rule="norm_bounded", norm_bound_factor=1.0))
    np.testing.assert_array_equal(
        bounded(ENTRIES, 3)["a"], norm_bounded_mean(ENTRIES, 3, 1.0)[0]["a"]
    )


# -- in the strategies ----------------------------------------------------------------------

FEDBUFF = StrategyConfig(
    name="fedbuff",
    fedbuff=FedBuffConfig(buffer_size=4, staleness=StalenessConfig(function="constant")),
)


def contribution(value: float, *, norm: float | None = None) -> Contribution:
    return Contribution(
        delta=delta(value), staleness=0, num_examples=1, base=dict(INITIAL), norm=norm
    )


def test_fedbuff_takes_its_step_with_the_configured_rule() -> None:
    values = (1.0, 2.0, 3.0, 100.0)
    results = {}
    for rule in ("mean", "median", "trimmed_mean", "norm_bounded"):
        config = dataclasses.replace(
            FEDBUFF, robust=RobustConfig(rule=rule, trim_fraction=0.25, norm_bound_factor=1.0)
        )
        strategy = make_strategy(config)
        state = strategy.init_state()
        for value in values:
            new, state = strategy.step(dict(INITIAL), state, contribution(value))
        assert new is not None
        results[rule] = float(new["w"][0, 0])
        assert strategy.clipped(state) == (2 if rule == "norm_bounded" else 0)
    # x = 0 + 1.0 * g; norm-bounded: the median norm is 2.5 x sqrt(6): 3 and 100 cut to 2.5
    assert results == pytest.approx(
        {
            "mean": 26.5,
            "median": 2.5,
            "trimmed_mean": 2.5,
            "norm_bounded": (1 + 2 + 2.5 + 2.5) / 4,
        }
    )


def test_an_explicit_combine_wins_over_the_rule() -> None:
    config = dataclasses.replace(FEDBUFF, robust=RobustConfig(rule="median"))
    strategy = make_strategy(config, combine=weighted_mean)
    state = strategy.init_state()
    for value in (1.0, 2.0, 3.0, 100.0):
        new, state = strategy.step(dict(INITIAL), state, contribution(value))
    assert new is not None and float(new["w"][0, 0]) == pytest.approx(26.5)


def test_clipped_count_and_fedasync_norms_survive_a_checkpoint(tmp_path: Path) -> None:
    config = dataclasses.replace(FEDBUFF, robust=RobustConfig(rule="norm_bounded"))
    strategy = make_strategy(config)
    state = strategy.init_state()
    for value in (1.0, 1.0, 1.0, 50.0, 1.0):  # one flush with one clipped, one buffered
        _, state = strategy.step(dict(INITIAL), state, contribution(value))
    assert isinstance(state, FedBuffState) and state.clipped == 1
    fedasync = make_strategy(StrategyConfig(name="fedasync"))
    _, recent = fedasync.step(dict(INITIAL), fedasync.init_state(), contribution(1.0, norm=2.0))
    for kept in (state, recent):
        save_checkpoint(
            tmp_path,
            Checkpoint(version=1, params=INITIAL, strategy_state=kept, last_seq={}),
        )
        loaded = load_checkpoint(tmp_path)
        assert loaded is not None
        assert type(loaded.strategy_state) is type(kept)
    assert loaded is not None and isinstance(loaded.strategy_state, FedAsyncState)
    assert loaded.strategy_state.norms == (2.0,)
    save_checkpoint(
        tmp_path, Checkpoint(version=1, params=INITIAL, strategy_state=state, last_seq={})
    )
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and strategy.clipped(loaded.strategy_state) == 1
    assert strategy.pending(loaded.strategy_state) == 1


def test_outlier_limit_is_median_plus_factor_mad() -> None:
    config = RobustConfig(outlier_factor=3.0, outlier_min_samples=5, outlier_window=6)
    assert outlier_limit([1.0, 2.0, 3.0, 4.0], config) == math.inf  # fewer than 5 seen
    # median 3, |n - 3| = (2, 1, 0, 1, 7) -> MAD 1: limit 3 + 3 x 1 = 6
    assert outlier_limit([1.0, 2.0, 3.0, 4.0, 10.0], config) == 6.0
    # only the last 6 count: (2, 3, 4, 10, 3, 3) -> median 3, MAD 1 (0,1,0,0,1,7 -> 0.5)
    assert outlier_limit([100.0, 2.0, 3.0, 4.0, 10.0, 3.0, 3.0], config) == 3.0 + 3.0 * 0.5
    # every norm equal: MAD 0, the floor 0.05 x median keeps room for an honest one
    assert outlier_limit([2.0] * 5, config) == pytest.approx(2.0 + 3.0 * 0.1)
    assert outlier_limit([1.0] * 50, RobustConfig()) == math.inf  # off by default


def test_fedasync_refuses_an_outlier_and_keeps_model_and_state() -> None:
    config = StrategyConfig(
        name="fedasync",
        fedasync=FedAsyncConfig(alpha=0.5, staleness=StalenessConfig(function="constant")),
        robust=RobustConfig(outlier_factor=3.0, outlier_min_samples=3),
    )
    strategy = make_strategy(config)
    state = strategy.init_state()
    params = dict(INITIAL)
    for norm in (1.0, 2.0, 3.0):
        params, state = strategy.step(params, state, contribution(0.1, norm=norm))  # type: ignore[assignment]
    assert isinstance(state, FedAsyncState) and state.norms == (1.0, 2.0, 3.0)
    # median 2, MAD 1: limit 5
    with pytest.raises(RejectedUpdate) as refused:
        strategy.step(params, state, contribution(0.1, norm=5.5))
    assert refused.value.reason is Reason.OUTLIER
    assert "5.5 > 5" in refused.value.detail
    new, after = strategy.step(params, state, contribution(0.1, norm=5.0))  # at the limit: in
    assert new is not None and after.norms == (1.0, 2.0, 3.0, 5.0)  # type: ignore[attr-defined]
    # without a norm given, the check computes it: delta(100) has norm 100 x sqrt(6)
    with pytest.raises(RejectedUpdate, match="outlier"):
        strategy.step(params, state, contribution(100.0))
    # an older checkpoint's None state is an empty history
    assert strategy.step(params, None, contribution(100.0))[0] is not None


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RobustConfig(rule="mode"), "RobustConfig.rule: must be mean | median"),  # type: ignore[arg-type]
        (lambda: RobustConfig(trim_fraction=0.5), r"trim_fraction: must be in \[0, 0.5\)"),
        (lambda: RobustConfig(trim_fraction=-0.1), r"trim_fraction: must be in \[0, 0.5\)"),
        (lambda: RobustConfig(norm_bound_factor=0.5), "norm_bound_factor: must be a finite"),
        (lambda: RobustConfig(outlier_factor=-1.0), "outlier_factor: must be a finite number"),
        (lambda: RobustConfig(outlier_min_samples=0), "outlier_min_samples"),
        (
            lambda: StrategyConfig(name="fedasync", robust=RobustConfig(rule="median")),
            "robust: must be mean with strategy fedasync",
        ),
        (
            lambda: StrategyConfig(name="fedbuff", robust=RobustConfig(outlier_factor=3.0)),
            "outlier_factor: must be 0 with strategy fedbuff",
        ),
        (lambda: AttackConfig(fraction=1.5), r"byzantine: 1.5 must be in \[0, 1\]"),
        (lambda: AttackConfig(kind="flood"), "attack: 'flood' is not one of"),  # type: ignore[arg-type]
        (lambda: AttackConfig(strength=-1.0), "attack_strength"),
    ],
)
def test_bad_configuration_is_a_one_line_error(make: object, message: str) -> None:
    assert callable(make)
    with pytest.raises(ConfigError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


def test_cli_refuses_label_flip_on_a_regression_task(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--virtual", "--task", "air-quality", "--byzantine", "0.1"]
    assert main([*argv, "--attack", "label-flip", "--data-dir", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "label-flip" in err and "air-quality" in err


# -- live tuning ----------------------------------------------------------------------------


def test_robust_knobs_parse_tune_and_show() -> None:
    values = parse_assignments(["robust=median", "trim-fraction=0.2", "norm_bound_factor=3"])
    assert values == {"robust": "median", "trim_fraction": 0.2, "norm_bound_factor": 3.0}
    config = tuned(FEDBUFF, values)
    assert config.robust == RobustConfig(rule="median", trim_fraction=0.2, norm_bound_factor=3.0)
    assert {"robust", "trim_fraction", "norm_bound_factor"} <= set(knob_values(config))
    assert "outlier_factor" not in knob_values(config)
    with pytest.raises(ConfigError, match="not one of"):
        parse_assignments(["robust=mode"])
    with pytest.raises(ConfigError, match=r"trim_fraction: must be in \[0, 0.5\)"):
        tuned(FEDBUFF, {"trim_fraction": 0.5})
    with pytest.raises(ConfigError, match="not used by strategy fedbuff"):
        tuned(FEDBUFF, {"outlier_factor": 3.0})
    fedasync = tuned(StrategyConfig(name="fedasync"), {"outlier_factor": 4.0})
    assert fedasync.robust.outlier_factor == 4.0
    assert knob_values(fedasync)["outlier_factor"] == 4.0


async def test_ctl_set_robust_median_takes_effect_at_the_next_flush(job: str) -> None:
    config = AggregatorConfig(
        strategy=FEDBUFF,
        eval_every=0,
        control=ControlConfig(accept_unsigned=True),  # the embedded broker: only this test
        bounds=BoundsConfig(norm_factor=0),  # only the robust rule is measured here
    )
    async with running(config, job) as aggregator:
        await ctl(TransportConfig(url=URL, job=job), "set", ["robust=median"])
        await until(lambda: aggregator.stats.controls["applied"] == 1)
        assert aggregator.config.strategy.robust.rule == "median"
        bodies = [updates.update("dev-1", s, 0, delta(v)) for s, v in enumerate((1, 2, 3, 100))]
        await send(job, "dev-1", *bodies)
        await until(lambda: aggregator.version == 1)
        # median of (1, 2, 3, 100) = 2.5; the mean would have been 26.5
        np.testing.assert_allclose(aggregator.params["w"], np.full((2, 2), 2.5))
        await ctl(TransportConfig(url=URL, job=job), "set", ["robust=norm_bounded"])
        await until(lambda: aggregator.stats.controls["applied"] == 2)
        bodies = [
            updates.update("dev-1", s, 1, delta(v))
            for s, v in zip(range(4, 8), (1, 1, 1, 50), strict=True)
        ]
        await send(job, "dev-1", *bodies)
        await until(lambda: aggregator.version == 2)
        assert aggregator.stats.robust_clipped == 1


# -- attacks --------------------------------------------------------------------------------


def test_the_malicious_devices_are_a_fixed_seeded_choice() -> None:
    config = AttackConfig(fraction=0.1)
    chosen = config.malicious(50)
    assert len(chosen) == 5 and chosen == sorted(chosen)
    expected = sorted(int(i) for i in np.random.default_rng([2, 0]).choice(50, 5, replace=False))
    assert chosen == expected == AttackConfig(fraction=0.1, kind="noise").malicious(50)
    assert AttackConfig(fraction=0.1, seed=1).malicious(50) != chosen
    assert AttackConfig().malicious(50) == []


def test_each_attack_changes_the_delta_as_documented() -> None:
    honest = {"w": np.array([3.0, 4.0], np.float32)}  # norm 5

    def sent(kind: str, **kw: float) -> Arrays:
        return Attack(AttackConfig(fraction=0.1, kind=kind, **kw), seed=1).poison_delta(honest, 0)  # type: ignore[arg-type]

    np.testing.assert_array_equal(sent("sign-flip")["w"], [-12.0, -16.0])  # lambda 4
    np.testing.assert_array_equal(sent("sign-flip", strength=1.0)["w"], [-3.0, -4.0])
    np.testing.assert_array_equal(sent("scale")["w"], [30.0, 40.0])  # lambda 10
    noise = sent("noise")["w"]
    assert float(np.linalg.norm(noise)) == pytest.approx(5.0, rel=1e-5)
    assert float(np.linalg.norm(sent("noise", strength=2.0)["w"])) == pytest.approx(10.0, rel=1e-5)
    assert sent("label-flip") is honest


def test_label_flip_trains_on_nine_minus_y_and_only_for_fmnist() -> None:
    data = TensorDataset(torch.zeros(3, 1, 28, 28), torch.tensor([0, 3, 9]))
    flipped = Attack(AttackConfig(fraction=0.1, kind="label-flip"), 0).poison_data(data)
    assert isinstance(flipped, TensorDataset)
    assert flipped.tensors[1].tolist() == [9, 6, 0]
    assert Attack(AttackConfig(fraction=0.1), 0).poison_data(data) is data
    config = AttackConfig(fraction=0.1, kind="label-flip")
    check_attack(config, make_task())
    regression = dataclasses.replace(make_task(), name="air-quality")
    with pytest.raises(ConfigError, match="no class labels"):
        check_attack(config, regression)


def test_a_malicious_trainer_sends_its_attack_and_an_honest_one_does_not(
    data_dir: Path,
) -> None:
    task = make_task(FmnistSettings(max_examples=32))
    data = task.fleet(data_dir, 5, 0)[0]  # type: ignore[misc]
    base = get_params(task.build_model(0))

    def sent(attack: Attack | None) -> Arrays:
        trainer = Trainer(
            participant_id="dev-0",
            task=task,
            data=data.train,
            seed=0,
            codec=CodecConfig(name="float32"),
            attack=attack,
        )
        body = trainer.step(0, base, seq=0, created=0.0)
        assert body is not None
        update = decode_update(body, spec=tensor_spec_of(base))
        assert (update.participant, update.seq, update.num_examples) == ("dev-0", 0, 32)
        return materialize(update.tensors)

    honest = sent(None)
    scaled = sent(Attack(AttackConfig(fraction=0.1, kind="scale"), seed=0))
    for name, value in honest.items():  # the same training, then x 10 in float32
        np.testing.assert_array_equal(scaled[name], np.multiply(value, 10, dtype=np.float32))
    flipped = sent(Attack(AttackConfig(fraction=0.1, kind="label-flip"), seed=0))
    assert any(not np.array_equal(flipped[k], v) for k, v in honest.items())
