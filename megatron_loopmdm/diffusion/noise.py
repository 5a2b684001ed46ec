"""The forward (masking) process of masked diffusion, keyed by the seed and each sample's index.

Each sample's diffusion time t and its mask are a pure function of (seed, global sample index),
never of the rank that holds the sample: tensor and pipeline ranks of one replica agree, data
parallel replicas differ because their samples differ, and the same run gives the same loss
curve on any parallel layout.
"""

import torch
from torch import Tensor

_NOISE_STREAM = 0x3A5C  # separates this stream from other (seed, index)-keyed streams


def _sample_generator(seed: int, sample_index: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(hash((seed, int(sample_index), _NOISE_STREAM)) % (1 << 63))
    return generator


def mask_tokens(
    tokens: Tensor,
    sample_index: Tensor,
    seed: int,
    mask_token_id: int,
    eps: float = 1e-3,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draws t ~ U(0, 1) per sample and masks each token with probability p = (1 - eps) t + eps.

    Args:
        tokens: [b, s] int64 clean tokens.
        sample_index: [b] int64 global index of each sample in the training stream.
        seed: the run's seed.
        mask_token_id: the [MASK] id written at masked positions.
        eps: the smallest masking probability.

    Returns:
        noisy [b, s] int64 (masked positions hold mask_token_id), mask [b, s] bool,
        p_mask [b] float32 (each sample's masking probability).
    """
    b, s = tokens.shape
    t = torch.empty(b)
    u = torch.empty(b, s)
    for row, index in enumerate(sample_index.tolist()):
        generator = _sample_generator(seed, index)
        t[row] = torch.rand((), generator=generator)
        u[row] = torch.rand(s, generator=generator)
    p_mask = (1 - eps) * t + eps
    mask = (u < p_mask[:, None]).to(tokens.device)
    noisy = torch.where(mask, torch.full_like(tokens, mask_token_id), tokens)
    return noisy, mask, p_mask.to(tokens.device)
