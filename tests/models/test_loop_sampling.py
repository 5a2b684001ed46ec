"""The per-step loop count: identical on every rank, distributed as configured."""

import collections

from megatron_loopmdm.models.config import LoopConfig
from megatron_loopmdm.models.loop_sampling import draw_num_loops, expected_num_loops

import pytest


def test_same_seed_and_step_give_same_loops_and_steps_vary():
    loop = LoopConfig(loop_layers=(1, 2), max_loops=6)
    draws = [draw_num_loops(loop, seed=5, iteration=i) for i in range(200)]
    assert draws == [draw_num_loops(loop, seed=5, iteration=i) for i in range(200)]
    assert draws != [draw_num_loops(loop, seed=6, iteration=i) for i in range(200)]


def test_uniform_covers_1_to_s_max_evenly():
    loop = LoopConfig(loop_layers=(1, 2), max_loops=4)
    counts = collections.Counter(draw_num_loops(loop, 0, i) for i in range(4000))
    assert set(counts) == {1, 2, 3, 4}
    assert all(abs(c / 4000 - 0.25) < 0.03 for c in counts.values())
    assert expected_num_loops(loop) == 2.5


def test_fixed_is_always_s_max():
    loop = LoopConfig(loop_layers=(1, 2), max_loops=3, loop_sampling="fixed")
    assert {draw_num_loops(loop, 0, i) for i in range(50)} == {3}
    assert expected_num_loops(loop) == 3.0


def test_heavy_tailed_stays_in_range_with_matching_expectation():
    loop = LoopConfig(loop_layers=(1, 2), max_loops=8, loop_sampling="poisson-lognormal")
    draws = [draw_num_loops(loop, 1, i) for i in range(6000)]
    assert min(draws) >= 1 and max(draws) <= 8
    mean = sum(draws) / len(draws)
    assert mean == pytest.approx(expected_num_loops(loop), abs=0.1)
    # Heavier-tailed than uniform: the mode sits below the mean and S_max is still drawn.
    counts = collections.Counter(draws)
    assert counts[8] > 0 and max(counts, key=counts.get) < mean
