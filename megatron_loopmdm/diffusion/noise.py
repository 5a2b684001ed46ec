"""The forward (masking) process of masked diffusion, keyed by the seed and each sample's index.

Each sample's diffusion time t, its mask and its optional random cut are pure functions of
(seed, global sample index), never of the rank that holds the sample: tensor and pipeline ranks
of one replica agree, data-parallel replicas differ because their samples differ, and the same
run gives the same loss curve on any parallel layout.
"""

from typing import Optional

import torch
from torch import Tensor

# Separate streams for the different draws keyed by (seed, index).
_MASK_STREAM = 0x3A5C
_TIME_STREAM = 0x71E5
_GROUP_STREAM = 0x6A0B
_LENGTH_STREAM = 0x1E47

TIME_SAMPLINGS = ("uniform", "antithetic")

VALIDATION_T_GRID = 8
"""Points of the validation NELBO's midpoint rule in t (training and `evaluation.nelbo`)."""


def masking_probability(t: Tensor, eps: float) -> Tensor:
    """p = (1 - eps) t + eps: the chance each token is masked at time t ([b] float64)."""
    return (1 - eps) * t.double() + eps


def fixed_times(batch_size: int, t: float) -> Tensor:
    """Every sample at the same time t ([b] float64), e.g. one point of the validation grid."""
    return torch.full((batch_size,), t, dtype=torch.float64)


def validation_grid(grid: int = VALIDATION_T_GRID) -> list[tuple[float, int]]:
    """The validation NELBO's quadrature: (t_k, mask stream) for k < grid.

    t_k = (k + 0.5) / grid are the midpoints of `grid` equal slices of (0, 1); each point draws
    its masks from its own stream k + 1 (stream 0 is training's), keyed by the seed and the
    sample index, so a validation is identical across runs, layouts and tools.
    """
    return [((k + 0.5) / grid, k + 1) for k in range(grid)]


def _generator(seed: int, index: int, stream: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(hash((seed, int(index), stream)) % (1 << 63))
    return generator


def _uniform(seed: int, index: int, stream: int) -> float:
    return torch.rand((), generator=_generator(seed, index, stream), dtype=torch.float64).item()


def sample_times(
    sample_index: Tensor, seed: int, time_sampling: str = "uniform", group_size: int = 1
) -> Tensor:
    """t ~ U(0, 1) per sample; `antithetic` spreads t evenly over each group of samples.

    Antithetic (stratified) times: the samples with global indices in one group of
    `group_size` consecutive indices (e.g. one global batch) get t = (u + k / group_size) mod 1,
    with u shared by the group and k the position in it, which lowers the variance of the loss.

    Returns:
        [b] float64.
    """
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"time_sampling={time_sampling!r}: choose one of {TIME_SAMPLINGS}.")
    indices = sample_index.tolist()
    if time_sampling == "uniform":
        t = [_uniform(seed, i, _TIME_STREAM) for i in indices]
    else:
        t = [
            (_uniform(seed, i // group_size, _GROUP_STREAM) + (i % group_size) / group_size) % 1.0
            for i in indices
        ]
    return torch.tensor(t, dtype=torch.float64)


def random_lengths(sample_index: Tensor, seed: int, prob: float, seq_length: int) -> Tensor:
    """LLaDA's random-length batches: with probability `prob` a sample is cut to a length drawn
    uniformly from 1..seq_length; otherwise it keeps seq_length.

    Returns:
        [b] int64 lengths.
    """
    lengths = []
    for index in sample_index.tolist():
        generator = _generator(seed, index, _LENGTH_STREAM)
        cut = torch.rand((), generator=generator).item() < prob
        drawn = int(torch.randint(1, seq_length + 1, (), generator=generator))
        lengths.append(drawn if cut else seq_length)
    return torch.tensor(lengths, dtype=torch.long)


def mask_tokens(
    tokens: Tensor,
    sample_index: Tensor,
    seed: int,
    mask_token_id: int,
    eps: float = 1e-3,
    t: Optional[Tensor] = None,
    valid: Optional[Tensor] = None,
    stream: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Masks each valid token with probability p = (1 - eps) t + eps.

    Args:
        tokens: [b, s] int64 clean tokens.
        sample_index: [b] int64 global index of each sample in the training stream.
        seed: the run's seed.
        mask_token_id: the [MASK] id written at masked positions.
        eps: the smallest masking probability.
        t: [b] diffusion times; drawn by `sample_times(..., "uniform")` when None.
        valid: [b, s] bool, positions that take part (padding and cut-off positions do not).
        stream: selects an independent mask draw for the same samples (e.g. per point of an
            evaluation grid of t).

    Returns:
        noisy [b, s] int64 (masked positions hold mask_token_id), mask [b, s] bool,
        p_mask [b] float32 (each sample's masking probability).
    """
    b, s = tokens.shape
    if t is None:
        t = sample_times(sample_index, seed)
    u = torch.empty(b, s)
    for row, index in enumerate(sample_index.tolist()):
        u[row] = torch.rand(s, generator=_generator(seed, index, _MASK_STREAM + 7919 * stream))
    p_mask = masking_probability(t, eps).float()
    mask = u < p_mask[:, None]
    if valid is not None:
        mask &= valid.cpu()
    mask = mask.to(tokens.device)
    noisy = torch.where(mask, torch.full_like(tokens, mask_token_id), tokens)
    return noisy, mask, p_mask.to(tokens.device)
