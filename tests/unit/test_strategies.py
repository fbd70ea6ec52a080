"""FedAsync, FedBuff and FedAvg on tiny arrays, against arithmetic done by hand.

Every input is made read-only (so an in-place write would raise) and compared
with a copy afterwards (so nothing was changed some other way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt
import pytest

from fedmq.codecs import SparseTensor
from fedmq.errors import ConfigError
from fedmq.strategies import (
    Contribution,
    Delta,
    FedAsyncConfig,
    FedAvgConfig,
    FedAvgState,
    FedBuffConfig,
    FedBuffState,
    StalenessConfig,
    StrategyConfig,
    fedasync_apply,
    fedavg_aggregate,
    fedbuff_add,
    fedbuff_flush,
    fedbuff_init,
    fedbuff_ready,
    fedbuff_warnings,
    make_strategy,
    strategy_warnings,
)

Arrays = dict[str, npt.NDArray[np.float32]]


def params(**tensors: npt.ArrayLike) -> Arrays:
    """Read-only float32 arrays: a strategy that writes to its inputs fails loudly."""
    out = {}
    for name, values in tensors.items():
        array = np.array(values, dtype=np.float32)
        array.flags.writeable = False
        out[name] = array
    return out


def snapshot(*many: Mapping[str, npt.NDArray[np.float32]]) -> list[Arrays]:
    return [{k: v.copy() for k, v in p.items()} for p in many]


def assert_params(actual: Mapping[str, npt.NDArray[np.float32]], **expected: object) -> None:
    assert list(actual) == list(expected)
    for name, values in expected.items():
        assert actual[name].dtype == np.float32
        np.testing.assert_allclose(actual[name], np.array(values, dtype=np.float32), rtol=1e-6)


def assert_unchanged(before: list[Arrays], *after: Mapping[str, npt.NDArray[np.float32]]) -> None:
    for old, new in zip(before, after, strict=True):
        assert all(np.array_equal(old[k], new[k]) for k in old)


# --- FedAsync ----------------------------------------------------------------------------


def test_fedasync_mixes_by_alpha_times_staleness_weight() -> None:
    x, local = params(w=[0, 10], b=[4]), params(w=[10, 0], b=[0])
    before = snapshot(x, local)
    # defaults: alpha 0.6, polynomial a = 0.5; staleness 3 -> s = 4 ** -0.5 = 0.5
    # alpha_t = 0.6 * 0.5 = 0.3;  x <- 0.7 x + 0.3 x_local
    # w: 0.7 * [0, 10] + 0.3 * [10, 0] = [3, 7];  b: 0.7 * 4 + 0.3 * 0 = 2.8
    new = fedasync_apply(x, local, 3, FedAsyncConfig())
    assert_params(new, w=[3, 7], b=[2.8])
    assert_unchanged(before, x, local)
    assert not np.shares_memory(new["w"], x["w"])


def test_fedasync_fresh_update_with_alpha_one_replaces_the_model() -> None:
    x, local = params(w=[1, 2]), params(w=[5, 6])
    # alpha 1, staleness 0: alpha_t = 1 * 1 -> x = x_local
    assert_params(fedasync_apply(x, local, 0, FedAsyncConfig(alpha=1.0)), w=[5, 6])


def test_fedasync_with_hinge_staleness() -> None:
    config = FedAsyncConfig(alpha=0.5, staleness=StalenessConfig(function="hinge", a=1.0, b=2))
    x, local = params(w=[0]), params(w=[12])
    # d = 5 > b: s = 1 / (1 * (5 - 2) + 1) = 1/4; alpha_t = 0.5 / 4 = 0.125; 0.125 * 12 = 1.5
    assert_params(fedasync_apply(x, local, 5, config), w=[1.5])


def test_fedasync_rejects_mismatched_tensors() -> None:
    with pytest.raises(ValueError, match="tensor names differ"):
        fedasync_apply(params(w=[1]), params(v=[1]), 0, FedAsyncConfig())
    with pytest.raises(ValueError, match=r"w has shape \[2\], expected \[1\]"):
        fedasync_apply(params(w=[1]), params(w=[1, 2]), 0, FedAsyncConfig())


# --- FedBuff -----------------------------------------------------------------------------


def test_fedbuff_buffers_then_takes_the_weighted_mean() -> None:
    config = FedBuffConfig(buffer_size=2)  # sgd, lr 1, s(d) = 1 / sqrt(1 + d)
    x, d1, d2 = params(w=[10, 10]), params(w=[1, 2]), params(w=[4, -2])
    before = snapshot(x, d1, d2)
    state = fedbuff_init()
    state = fedbuff_add(state, d1, 0, config)  # s(0) = 1
    assert not fedbuff_ready(state, config)
    state = fedbuff_add(state, d2, 3, config)  # s(3) = 1/2
    assert fedbuff_ready(state, config)
    assert [w for _, w in state.entries] == [1.0, 0.5]
    # g = (1 * [1, 2] + 0.5 * [4, -2]) / K = ([1, 2] + [2, -1]) / 2 = [1.5, 0.5]
    # x <- [10, 10] + 1.0 * g = [11.5, 10.5]
    new, after = fedbuff_flush(x, state, config)
    assert_params(new, w=[11.5, 10.5])
    assert after.entries == () and after.flushes == 1
    assert_unchanged(before, x, d1, d2)
    assert len(state.entries) == 2  # the old state is unchanged too


def test_fedbuff_server_lr_scales_the_step() -> None:
    config = FedBuffConfig(buffer_size=1, server_lr=2.0)
    state = fedbuff_add(fedbuff_init(), params(w=[1.5, -1]), 0, config)
    # x <- [10, 10] + 2 * [1.5, -1] = [13, 8]
    new, _ = fedbuff_flush(params(w=[10, 10]), state, config)
    assert_params(new, w=[13, 8])


def test_fedbuff_copies_what_it_buffers() -> None:
    config = FedBuffConfig(buffer_size=2)
    delta = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    state = fedbuff_add(fedbuff_init(), delta, 0, config)
    delta["w"][:] = 100.0  # the caller reuses its array
    kept = state.entries[0][0]["w"]
    assert isinstance(kept, np.ndarray)
    assert kept.tolist() == [1.0, 2.0]
    assert not kept.flags.writeable


def test_fedbuff_sums_sparse_deltas_as_the_dense_ones_bit_for_bit() -> None:
    # Top-k deltas decoded sparse (SparseTensor) give the very same float32 step as
    # their dense forms, mixed in any order with dense deltas.
    rng = np.random.default_rng(3)
    config = FedBuffConfig(buffer_size=4)
    global_ = {"w": rng.standard_normal((3, 50)).astype(np.float32)}
    sparse: list[Delta] = []
    dense_forms: list[Delta] = []
    for _ in range(3):
        indices = np.sort(rng.choice(150, 40, replace=False)).astype(np.uint32)
        values = rng.standard_normal(40).astype(np.float32)
        tensor = SparseTensor((3, 50), indices, values)
        sparse.append({"w": tensor})
        dense_forms.append({"w": tensor.dense()})
        assert tensor.dense().reshape(-1)[indices].tolist() == values.tolist()
    plain = {"w": rng.standard_normal((3, 50)).astype(np.float32)}
    a = b = fedbuff_init()
    for i, (s, d) in enumerate(zip([*sparse, plain], [*dense_forms, plain], strict=True)):
        a = fedbuff_add(a, s, i, config)
        b = fedbuff_add(b, d, i, config)
    new_a, _ = fedbuff_flush(global_, a, config)
    new_b, _ = fedbuff_flush(global_, b, config)
    assert new_a["w"].tobytes() == new_b["w"].tobytes()


def test_fedbuff_momentum() -> None:
    config = FedBuffConfig(buffer_size=1, server_optimizer="momentum", momentum=0.5, server_lr=1.0)
    state = fedbuff_init()
    # flush 1: g = [2, 0]; m = 0.5 * 0 + g = [2, 0]; x = [0, 0] + m = [2, 0]
    x, state = fedbuff_flush(
        params(w=[0, 0]), fedbuff_add(state, params(w=[2, 0]), 0, config), config
    )
    assert_params(x, w=[2, 0])
    assert state.m is not None
    assert_params(state.m, w=[2, 0])
    # flush 2: g = [0, 4]; m = 0.5 * [2, 0] + [0, 4] = [1, 4]; x = [2, 0] + [1, 4] = [3, 4]
    x, state = fedbuff_flush(x, fedbuff_add(state, params(w=[0, 4]), 0, config), config)
    assert_params(x, w=[3, 4])
    assert state.m is not None
    assert_params(state.m, w=[1, 4])
    assert state.v is None and state.flushes == 2


def test_fedbuff_adam() -> None:
    config = FedBuffConfig(
        buffer_size=1,
        server_optimizer="adam",
        server_lr=1.0,
        adam_beta1=0.5,
        adam_beta2=0.75,
        adam_eps=1.0,
    )
    state = fedbuff_init()
    # flush 1: g = [2, -2, 0]
    #   m = 0.5 * 0 + 0.5 * g        = [1, -1, 0]
    #   v = 0.75 * 0 + 0.25 * g**2   = [1, 1, 0]
    #   x = 0 + m / (sqrt(v) + 1)    = [1/2, -1/2, 0/1] = [0.5, -0.5, 0]
    g1 = params(w=[2, -2, 0])
    x, state = fedbuff_flush(params(w=[0, 0, 0]), fedbuff_add(state, g1, 0, config), config)
    assert_params(x, w=[0.5, -0.5, 0])
    assert state.m is not None and state.v is not None
    assert_params(state.m, w=[1, -1, 0])
    assert_params(state.v, w=[1, 1, 0])
    # flush 2: g = [1, 1, 2]
    #   m = 0.5 * [1, -1, 0] + 0.5 * [1, 1, 2]    = [1, 0, 1]
    #   v = 0.75 * [1, 1, 0] + 0.25 * [1, 1, 4]   = [1, 1, 1]
    #   x = [0.5, -0.5, 0] + [1, 0, 1] / (1 + 1)  = [1, -0.5, 0.5]
    g2 = params(w=[1, 1, 2])
    x, state = fedbuff_flush(x, fedbuff_add(state, g2, 0, config), config)
    assert_params(x, w=[1, -0.5, 0.5])
    assert state.m is not None and state.v is not None
    assert_params(state.m, w=[1, 0, 1])
    assert_params(state.v, w=[1, 1, 1])


def test_fedbuff_adam_first_step_with_the_default_eps() -> None:
    # b1 0.9, b2 0.99, eps 1e-3, lr 0.01
    config = FedBuffConfig(buffer_size=1, server_optimizer="adam")
    # g = [0.5]: m = 0.1 * 0.5 = 0.05; v = 0.01 * 0.25 = 0.0025; sqrt(v) = 0.05
    # x = 0.01 * 0.05 / (0.05 + 0.001) = 0.01 * 0.98039...
    state = fedbuff_add(fedbuff_init(), params(w=[0.5]), 0, config)
    x, _ = fedbuff_flush(params(w=[0]), state, config)
    assert_params(x, w=[0.01 * 0.05 / 0.051])


def test_each_server_optimizer_has_its_own_default_lr() -> None:
    # The same lr is a different step per optimizer: momentum's effective step is
    # lr / (1 - beta), adam's is about lr per weight whatever the delta's size.
    assert FedBuffConfig().server_lr == 1.0
    momentum = FedBuffConfig(server_optimizer="momentum")
    assert momentum.server_lr == 0.1 and momentum.effective_step == pytest.approx(1.0)
    assert FedBuffConfig(server_optimizer="momentum", momentum=0.5).server_lr == 0.5
    assert FedBuffConfig(server_optimizer="adam").server_lr == 0.01
    # Given explicitly, it is kept; once built it is a number that replace() keeps.
    assert FedBuffConfig(server_optimizer="adam", server_lr=0.05).server_lr == 0.05
    config = dataclasses.replace(momentum, buffer_size=5)
    assert config.server_lr == 0.1 and dataclasses.asdict(config)["server_lr"] == 0.1


def test_momentum_keeps_the_effective_step_of_sgd_by_default() -> None:
    # Steady deltas g: sgd moves x by lr * g per step; momentum's default lr 1 - beta
    # converges to the same step (1 - beta) * g / (1 - beta) = g instead of 10 g.
    config = FedBuffConfig(buffer_size=1, server_optimizer="momentum")
    x, state = params(w=[0.0]), fedbuff_init()
    steps = []
    for _ in range(200):
        new, state = fedbuff_flush(x, fedbuff_add(state, params(w=[1.0]), 0, config), config)
        steps.append(float(new["w"][0] - x["w"][0]))
        x = params(w=new["w"])
    assert steps[0] == pytest.approx(0.1)
    assert steps[-1] == pytest.approx(1.0, rel=1e-3)


def test_adam_moves_each_weight_by_about_lr_whatever_the_delta_size() -> None:
    # Why adam's lr must be small: a delta of 0.1 and one of 100 move x alike.
    config = FedBuffConfig(buffer_size=1, server_optimizer="adam", server_lr=0.01)
    for size in (1e-1, 1e2):
        state = fedbuff_add(fedbuff_init(), params(w=[size]), 0, config)
        x, _ = fedbuff_flush(params(w=[0]), state, config)
        assert float(x["w"][0]) == pytest.approx(0.01, rel=0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # momentum 0.9 at lr 20: an effective step of 200
        (
            {"server_optimizer": "momentum", "server_lr": 20.0},
            r"FedBuffConfig\.server_lr: must be <= 10 with momentum 0\.9 \(an effective step "
            r"lr / \(1 - momentum\) <= 100\), got 20\.0",
        ),
        ({"server_lr": 101.0}, r"FedBuffConfig\.server_lr: must be <= 100 with sgd, got 101\.0"),
        (
            {"server_optimizer": "adam", "server_lr": 2.0},
            r"FedBuffConfig\.server_lr: must be <= 1 with adam, got 2\.0",
        ),
    ],
)
def test_server_steps_that_cannot_work_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FedBuffConfig(**kwargs)  # type: ignore[arg-type]


def test_settings_known_to_diverge_are_warned_about() -> None:
    # What `fedmq bench` ran into: momentum at lr 1.0 (effective step 10), adam at lr 1.0.
    (momentum,) = fedbuff_warnings(FedBuffConfig(server_optimizer="momentum", server_lr=1.0))
    assert "effective step lr / (1 - momentum) of 10" in momentum
    assert "default server_lr 0.1" in momentum
    (adam,) = fedbuff_warnings(FedBuffConfig(server_optimizer="adam", server_lr=1.0))
    assert "server_lr 1 with adam" in adam and "default 0.01" in adam
    (eps,) = fedbuff_warnings(FedBuffConfig(server_optimizer="adam", adam_eps=1e-8))
    assert "adam_eps 1e-08" in eps
    assert fedbuff_warnings(FedBuffConfig(server_lr=3.0))  # sgd at 3: an effective step of 3
    # The bounds are inclusive, whatever the float roundings of lr / (1 - beta).
    assert fedbuff_warnings(FedBuffConfig(server_optimizer="momentum", server_lr=0.2)) == ()
    assert FedBuffConfig(server_optimizer="momentum", server_lr=10.0).effective_step == 100
    # The defaults are quiet; warnings are for the strategy in use only.
    for optimizer in ("sgd", "momentum", "adam"):
        config = FedBuffConfig(server_optimizer=optimizer)
        assert fedbuff_warnings(config) == ()
    risky = FedBuffConfig(server_optimizer="momentum", server_lr=1.0)
    assert strategy_warnings(StrategyConfig(name="fedbuff", fedbuff=risky))
    assert strategy_warnings(StrategyConfig(name="fedasync", fedbuff=risky)) == ()


def test_fedbuff_errors() -> None:
    config = FedBuffConfig(buffer_size=2)
    with pytest.raises(ValueError, match="empty"):
        fedbuff_flush(params(w=[0]), fedbuff_init(), config)
    state = fedbuff_add(fedbuff_init(), params(w=[1]), 0, config)
    with pytest.raises(ValueError, match="shape"):
        fedbuff_add(state, params(w=[1, 2]), 0, config)
    with pytest.raises(ValueError, match="names differ"):
        fedbuff_flush(params(v=[0]), state, config)


# --- FedAvg ------------------------------------------------------------------------------


def test_fedavg_weights_deltas_by_example_count() -> None:
    x = params(w=[[0, 10]], b=[1])
    d1, d2 = params(w=[[1, 1]], b=[0]), params(w=[[4, -2]], b=[3])
    before = snapshot(x, d1, d2)
    # n = 1 and 2:  (1 * d1 + 2 * d2) / 3
    # w: ([1, 1] + [8, -4]) / 3 = [3, -1];  x = [0, 10] + [3, -1] = [3, 9]
    # b: (0 + 6) / 3 = 2;                   x = 1 + 2 = 3
    new = fedavg_aggregate(x, [(d1, 1), (d2, 2)])
    assert_params(new, w=[[3, 9]], b=[3])
    assert_unchanged(before, x, d1, d2)


def test_fedavg_ignores_contributions_without_examples() -> None:
    # n = 0 and 4: only the second counts; x = 1 + 5 = 6
    assert_params(
        fedavg_aggregate(params(w=[1]), [(params(w=[100]), 0), (params(w=[5]), 4)]), w=[6]
    )


def test_fedavg_errors() -> None:
    with pytest.raises(ValueError, match="no contributions"):
        fedavg_aggregate(params(w=[1]), [])
    with pytest.raises(ValueError, match="not all 0"):
        fedavg_aggregate(params(w=[1]), [(params(w=[1]), 0)])
    with pytest.raises(ValueError, match=">= 0"):
        fedavg_aggregate(params(w=[1]), [(params(w=[1]), -1), (params(w=[1]), 3)])


# --- the Strategy interface --------------------------------------------------------------


def test_make_strategy_properties() -> None:
    fedasync = make_strategy(StrategyConfig())
    assert fedasync.needs_base and fedasync.max_staleness == 50
    fedbuff = make_strategy(StrategyConfig(name="fedbuff", max_staleness=7))
    assert not fedbuff.needs_base and fedbuff.max_staleness == 7
    fedavg = make_strategy(StrategyConfig(name="fedavg", max_staleness=7))
    assert not fedavg.needs_base and fedavg.max_staleness == 0


def test_fedasync_strategy_uses_base_plus_delta() -> None:
    strategy = make_strategy(StrategyConfig(name="fedasync"))
    x, base, delta = params(w=[0, 10]), params(w=[2, 2]), params(w=[8, -2])
    before = snapshot(x, base, delta)
    state = strategy.init_state()
    # x_local = base + delta = [10, 0]; staleness 3 -> alpha_t = 0.6 * 0.5 = 0.3
    # x = 0.7 * [0, 10] + 0.3 * [10, 0] = [3, 7]
    new, state = strategy.step(
        x, state, Contribution(delta=delta, staleness=3, num_examples=5, base=base)
    )
    assert new is not None
    assert_params(new, w=[3, 7])
    assert strategy.pending(state) == 0
    assert strategy.flush(new, state) == (None, state)
    assert_unchanged(before, x, base, delta)
    with pytest.raises(ValueError, match=r"needs Contribution\.base"):
        strategy.step(x, state, Contribution(delta=delta, staleness=0, num_examples=5))


def test_fedbuff_strategy_buffers_until_k() -> None:
    config = StrategyConfig(name="fedbuff", fedbuff=FedBuffConfig(buffer_size=2))
    strategy = make_strategy(config)
    x = params(w=[10, 10])
    state = strategy.init_state()
    assert isinstance(state, FedBuffState)
    new, state = strategy.step(
        x, state, Contribution(delta=params(w=[1, 2]), staleness=0, num_examples=1)
    )
    assert new is None and strategy.pending(state) == 1
    new, state = strategy.step(
        x, state, Contribution(delta=params(w=[4, -2]), staleness=3, num_examples=1)
    )
    # as in test_fedbuff_buffers_then_takes_the_weighted_mean: [11.5, 10.5]
    assert new is not None
    assert_params(new, w=[11.5, 10.5])
    assert strategy.pending(state) == 0
    # a partial buffer can be drained (at shutdown): K = 1 here, g = 1/sqrt(2) * [2, 0]
    _, state = strategy.step(
        new, state, Contribution(delta=params(w=[2, 0]), staleness=1, num_examples=1)
    )
    drained, state = strategy.flush(new, state)
    assert drained is not None
    assert_params(drained, w=[11.5 + 2 / np.sqrt(2), 10.5])
    assert strategy.flush(drained, state) == (None, state)


def test_fedavg_strategy_closes_a_round_at_clients_per_round() -> None:
    strategy = make_strategy(
        StrategyConfig(name="fedavg", fedavg=FedAvgConfig(clients_per_round=2))
    )
    x = params(w=[0, 10])
    state = strategy.init_state()
    new, state = strategy.step(
        x, state, Contribution(delta=params(w=[1, 1]), staleness=0, num_examples=1)
    )
    assert new is None and strategy.pending(state) == 1
    new, state = strategy.step(
        x, state, Contribution(delta=params(w=[4, -2]), staleness=0, num_examples=2)
    )
    # (1 * [1, 1] + 2 * [4, -2]) / 3 = [3, -1]; x = [3, 9]
    assert new is not None
    assert_params(new, w=[3, 9])
    assert strategy.pending(state) == 0
    with pytest.raises(ValueError, match="staleness 0"):
        strategy.step(x, state, Contribution(delta=params(w=[1, 1]), staleness=1, num_examples=1))


def test_fedavg_strategy_flushes_a_short_round() -> None:
    strategy = make_strategy(StrategyConfig(name="fedavg"))  # waits for 10
    x = params(w=[0])
    _, state = strategy.step(
        x, strategy.init_state(), Contribution(delta=params(w=[6]), staleness=0, num_examples=3)
    )
    new, state = strategy.flush(x, state)
    assert new is not None
    assert_params(new, w=[6])
    assert strategy.pending(state) == 0
    # a round whose participants hold no examples leaves the model as it was
    _, state = strategy.step(
        x, state, Contribution(delta=params(w=[6]), staleness=0, num_examples=0)
    )
    same, _ = strategy.flush(x, state)
    assert same is not None
    assert_params(same, w=[0])


def test_a_strategy_refuses_another_strategys_state() -> None:
    strategy = make_strategy(StrategyConfig(name="fedbuff"))
    with pytest.raises(TypeError, match="expected a FedBuffState state, got FedAvgState"):
        strategy.pending(FedAvgState())


def test_contribution_checks_its_numbers() -> None:
    with pytest.raises(ValueError, match="staleness"):
        Contribution(delta=params(w=[1]), staleness=-1, num_examples=1)
    with pytest.raises(ValueError, match="num_examples"):
        Contribution(delta=params(w=[1]), staleness=0, num_examples=-5)


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: FedAsyncConfig(alpha=0.0),
            r"FedAsyncConfig\.alpha: must be in \(0, 1\], got 0\.0",
        ),
        (lambda: FedAsyncConfig(alpha=1.5), r"FedAsyncConfig\.alpha: must be in \(0, 1\]"),
        (
            lambda: FedBuffConfig(buffer_size=0),
            r"FedBuffConfig\.buffer_size: must be an integer >= 1",
        ),
        (
            lambda: FedBuffConfig(server_lr=-1.0),
            r"FedBuffConfig\.server_lr: must be a finite number > 0",
        ),
        (
            lambda: FedBuffConfig(server_optimizer="yogi"),  # type: ignore[arg-type]
            r"server_optimizer: must be sgd \| momentum \| adam",
        ),
        (lambda: FedBuffConfig(momentum=1.0), r"FedBuffConfig\.momentum: must be in \[0, 1\)"),
        (lambda: FedBuffConfig(adam_beta2=-0.1), r"FedBuffConfig\.adam_beta2: must be in \[0, 1\)"),
        (
            lambda: FedBuffConfig(adam_eps=0.0),
            r"FedBuffConfig\.adam_eps: must be a finite number > 0",
        ),
        (
            lambda: FedAvgConfig(clients_per_round=0),
            r"FedAvgConfig\.clients_per_round: must be an integer >= 1",
        ),
        (
            lambda: StrategyConfig(name="fedprox"),  # type: ignore[arg-type]
            r"StrategyConfig\.name: must be fedasync \| fedbuff \| fedavg",
        ),
        (
            lambda: StrategyConfig(max_staleness=-1),
            r"StrategyConfig\.max_staleness: must be an integer >= 0",
        ),
        (
            lambda: StrategyConfig(fedbuff=FedAvgConfig()),  # type: ignore[arg-type]
            r"StrategyConfig\.fedbuff: must be a FedBuffConfig",
        ),
    ],
)
def test_config_errors_name_the_field_and_range(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_default_configs_are_the_benchmarks() -> None:
    config = StrategyConfig()
    assert config.fedasync.alpha == 0.6
    assert config.fedasync.staleness == StalenessConfig(function="polynomial", a=0.5)
    assert config.fedbuff.buffer_size == 10 and config.fedbuff.server_lr == 1.0
    assert config.fedbuff.staleness == StalenessConfig(function="polynomial", a=0.5)
    assert config.fedavg.clients_per_round == 10


def test_changes_model_says_which_step_makes_a_new_version() -> None:
    # The aggregator runs a step in a worker thread only when it makes a new model.
    fedbuff = make_strategy(StrategyConfig(name="fedbuff", fedbuff=FedBuffConfig(buffer_size=2)))
    params = {"w": np.zeros(2, dtype=np.float32)}
    one = Contribution(delta={"w": np.ones(2, dtype=np.float32)}, staleness=0, num_examples=1)
    state = fedbuff.init_state()
    assert not fedbuff.changes_model(state)
    new, state = fedbuff.step(params, state, one)
    assert new is None and fedbuff.changes_model(state)
    new, state = fedbuff.step(params, state, one)
    assert new is not None and not fedbuff.changes_model(state)
    fedasync = make_strategy(StrategyConfig(name="fedasync"))
    assert fedasync.changes_model(fedasync.init_state())


def test_adam_above_twice_its_default_lr_is_warned_about() -> None:
    # Measured: adam at server lr 0.03 peaked at 0.70 after 4 versions, then fell back.
    assert fedbuff_warnings(FedBuffConfig(server_optimizer="adam", server_lr=0.02)) == ()
    (warning,) = fedbuff_warnings(FedBuffConfig(server_optimizer="adam", server_lr=0.03))
    assert "above 0.02" in warning
