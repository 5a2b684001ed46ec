"""Attention masks for adapting an autoregressive model: causal, and causal annealed to full.

DiffuLLaMA-style annealing: training starts with the AR model's causal mask and opens the
future (keys j > i) gradually, each future entry independently with probability `progress`,
until at progress 1 attention is bidirectional. Masks use megatron's boolean convention
(True = not attended) and go through the model's ordinary `attention_mask` argument.
"""

from typing import Optional

import torch
from torch import Tensor

_ANNEAL_STREAM = 0x5EED


def causal_attention_mask(seq_length: int, device=None) -> Tensor:
    """[1, 1, s, s] bool, True above the diagonal (query i does not see keys j > i)."""
    ones = torch.ones(seq_length, seq_length, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)[None, None]


def anneal_progress(iteration: int, anneal_iters: int) -> float:
    """The share of future entries opened at `iteration`: 0 at step 0, 1 from `anneal_iters`."""
    if anneal_iters <= 0:
        return 1.0
    return min(1.0, iteration / anneal_iters)


def annealed_attention_mask(
    sample_index: Tensor, seq_length: int, seed: int, progress: float
) -> Optional[Tensor]:
    """The annealed mask of each sample, or None once attention is fully bidirectional.

    Args:
        sample_index: [b] int64 global sample indices; the draw is keyed by (seed, index), so
            every tensor/pipeline rank of one model replica builds the same mask.
        seq_length: s.
        seed: the run's seed.
        progress: in [0, 1]; 0 gives the causal mask, 1 gives None.

    Returns:
        [b, 1, s, s] bool, True = not attended, or None.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress={progress} must lie in [0, 1].")
    if progress >= 1.0:
        return None
    future = causal_attention_mask(seq_length)[0, 0]
    rows = []
    for index in sample_index.tolist():
        generator = torch.Generator().manual_seed(hash((seed, index, _ANNEAL_STREAM)) % (1 << 63))
        opened = torch.rand(seq_length, seq_length, generator=generator) < progress
        rows.append(future & ~opened)
    return torch.stack(rows)[:, None].to(sample_index.device)
