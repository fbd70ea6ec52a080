"""BENCHMARK.md's fleet, as pure functions: the values two implementations must agree on."""

from __future__ import annotations

import numpy as np

from fedmq.sim._fleet import RoundPicker, is_online, online_periods, speed_factors


def test_speed_factors_are_the_protocols() -> None:
    s = speed_factors(50)
    assert np.array_equal(s, np.random.default_rng(0).lognormal(0.0, 1.0, size=50))


def test_online_periods_alternate_from_the_devices_own_generator() -> None:
    periods = online_periods(3, 500.0, 60.0, 20.0)
    rng = np.random.default_rng([1, 3])
    t = 0.0
    for start, end in periods:
        on, off = rng.exponential(60.0), rng.exponential(20.0)
        assert (start, end) == (t, t + on)
        t += on + off
    assert periods[0][0] == 0.0 and periods[-1][0] < 500.0 <= t
    assert is_online(periods, 0.0) and not is_online(periods, periods[0][1])


def test_round_picker_is_sorted_and_uses_one_generator_per_run() -> None:
    picker = RoundPicker(3)
    assert picker.pick([4, 1]) == [1, 4]  # fewer than C: all of them, sorted
    rng = np.random.default_rng(0)
    online = [9, 2, 5, 7, 1]
    expected = sorted(int(i) for i in rng.choice(np.array(sorted(online)), 3, replace=False))
    assert picker.pick(online) == expected
    expected = sorted(int(i) for i in rng.choice(np.array(sorted(online)), 3, replace=False))
    assert picker.pick(online) == expected  # the same generator, advanced
