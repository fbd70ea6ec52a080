"""Staleness weights, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq.errors import ConfigError
from fedmq.strategies import STALENESS_FUNCTIONS, StalenessConfig, staleness_weight


def test_constant_ignores_staleness() -> None:
    s = staleness_weight(StalenessConfig(function="constant", a=3.0))
    assert [s(0), s(1), s(100)] == [1.0, 1.0, 1.0]


def test_polynomial() -> None:
    s = staleness_weight(StalenessConfig(function="polynomial", a=0.5))  # (d + 1) ** -0.5
    assert s(0) == 1.0  # 1 ** -0.5
    assert s(3) == pytest.approx(0.5)  # 4 ** -0.5 = 1/2
    assert s(8) == pytest.approx(1 / 3)  # 9 ** -0.5 = 1/3
    s = staleness_weight(StalenessConfig(function="polynomial", a=1.0))  # 1 / (d + 1)
    assert s(1) == pytest.approx(0.5)
    assert s(4) == pytest.approx(0.2)


def test_polynomial_is_the_default() -> None:
    assert StalenessConfig() == StalenessConfig(function="polynomial", a=0.5, b=4)
    assert staleness_weight(StalenessConfig())(15) == pytest.approx(0.25)  # 16 ** -0.5


def test_hinge() -> None:
    s = staleness_weight(StalenessConfig(function="hinge", a=0.5, b=4))
    assert [s(0), s(4)] == [1.0, 1.0]  # d <= b: full weight
    assert s(5) == pytest.approx(2 / 3)  # 1 / (0.5 * (5 - 4) + 1) = 1 / 1.5
    assert s(6) == pytest.approx(0.5)  # 1 / (0.5 * 2 + 1) = 1 / 2
    assert s(10) == pytest.approx(0.25)  # 1 / (0.5 * 6 + 1) = 1 / 4


def test_exponential() -> None:
    s = staleness_weight(StalenessConfig(function="exponential", a=math.log(2)))  # 2 ** -d
    assert s(0) == 1.0
    assert s(1) == pytest.approx(0.5)
    assert s(3) == pytest.approx(0.125)
    s = staleness_weight(StalenessConfig(function="exponential", a=0.5))
    assert s(2) == pytest.approx(math.exp(-1))  # exp(-0.5 * 2)


def test_zero_rate_means_no_decay() -> None:
    for function in ("polynomial", "hinge", "exponential"):
        s = staleness_weight(StalenessConfig(function=function, a=0.0, b=0))
        assert s(50) == 1.0


@given(
    function=st.sampled_from(STALENESS_FUNCTIONS),
    a=st.floats(0.0, 5.0),
    b=st.integers(0, 20),
    d=st.integers(0, 1000),
)
def test_weights_are_in_0_1_and_never_increase(function: str, a: float, b: int, d: int) -> None:
    s = staleness_weight(StalenessConfig(function=function, a=a, b=b))  # type: ignore[arg-type]
    assert s(0) == 1.0
    assert 0.0 <= s(d + 1) <= s(d) <= 1.0


def test_negative_staleness_is_an_error() -> None:
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        staleness_weight(StalenessConfig())(-1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"function": "linear"}, r"StalenessConfig\.function: must be constant \| polynomial"),
        ({"a": -0.1}, r"StalenessConfig\.a: must be a finite number >= 0, got -0\.1"),
        ({"a": math.inf}, r"StalenessConfig\.a: must be a finite number >= 0"),
        ({"b": -1}, r"StalenessConfig\.b: must be an integer >= 0, got -1"),
        ({"b": 1.5}, r"StalenessConfig\.b: must be an integer >= 0"),
    ],
)
def test_config_errors_name_the_field_and_range(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StalenessConfig(**kwargs)  # type: ignore[arg-type]
