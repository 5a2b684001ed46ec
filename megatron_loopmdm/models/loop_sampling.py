"""The loop count S of each training step, identical on every rank of the job.

S is a pure function of (seed, iteration, loop config), so tensor, pipeline and data-parallel
ranks agree without communication, and a resumed run draws the same S as an uninterrupted one.
"""

import functools

from megatron_loopmdm.models.config import LoopConfig

import numpy as np

_LOOP_STREAM = 0x100F  # separates this stream from other (seed, index)-keyed streams
_LOGNORMAL_SIGMA = 0.5


def _poisson_lognormal(rng: np.random.Generator, mean: float, size=None):
    # A Poisson whose rate is log-normal: mean-preserving, with a heavy right tail.
    rate = rng.lognormal(np.log(mean) - _LOGNORMAL_SIGMA**2 / 2, _LOGNORMAL_SIGMA, size=size)
    return rng.poisson(rate, size=size)


def draw_num_loops(loop_config: LoopConfig, seed: int, iteration: int) -> int:
    """The loop count for training step `iteration` (any rank, any layout, same answer)."""
    s_max = loop_config.max_loops
    if loop_config.loop_sampling == "fixed":
        return s_max
    rng = np.random.default_rng([seed, iteration, _LOOP_STREAM])
    if loop_config.loop_sampling == "uniform":
        return int(rng.integers(1, s_max + 1))
    # poisson-lognormal around the uniform mean, shifted to start at 1, clipped to S_max.
    draw = _poisson_lognormal(rng, (s_max - 1) / 2) + 1 if s_max > 1 else 1
    return int(min(draw, s_max))


@functools.lru_cache(maxsize=64)
def _expected_poisson_lognormal(s_max: int) -> float:
    # No closed form once clipped: a fixed-seed estimate, deterministic and accurate to ~1e-3.
    rng = np.random.default_rng(0)
    draws = np.minimum(_poisson_lognormal(rng, (s_max - 1) / 2, size=400_000) + 1, s_max)
    return float(draws.mean())


def expected_num_loops(loop_config: LoopConfig) -> float:
    """E[S] under the training distribution (for FLOPs and pipeline balancing)."""
    s_max = loop_config.max_loops
    if loop_config.loop_sampling == "fixed":
        return float(s_max)
    if loop_config.loop_sampling == "uniform":
        return (s_max + 1) / 2
    return 1.0 if s_max == 1 else _expected_poisson_lognormal(s_max)
