"""Weight initialisation that does not depend on the parallel layout.

Megatron's CPU initialisation draws each full weight and splits it over tensor-parallel ranks,
so tensor parallelism already leaves the initial weights unchanged. Pipeline parallelism does
not: each stage builds a different subset of modules from its own RNG stream. Seeding each
module from (seed, module key) makes every layout start from the same weights, so the same run
gives the same loss curve under any TP/PP/DP split.
"""

import contextlib
from typing import Optional

import torch

EMBEDDING_KEY = 1 << 20
OUTPUT_LAYER_KEY = EMBEDDING_KEY + 1
LOOP_MODULES_KEY = EMBEDDING_KEY + 2


@contextlib.contextmanager
def seeded_init(seed: Optional[int], key: int):
    """Within the block, the CPU RNG is seeded from (seed, key); a no-op when seed is None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + key) % (1 << 63))
        yield
