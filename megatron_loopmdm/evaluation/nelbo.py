"""Validation NELBO per loop count, on the trainer's fixed t-quadrature.

The trainer's validation (`training.run.Run.evaluate`) and `nelbo_per_loops` share one
definition from `diffusion.noise`: every sample is noised at each point t_k of
`validation_grid()` with that point's own mask stream (keyed by the run's seed and the sample's
index), and the NELBO is the sum over masked positions of CE / p, over all grid points, divided
by the tokens counted at all grid points. Numbers are comparable with the training logs and
identical across runs.
"""

import math
from typing import Dict, List, Sequence

from megatron_loopmdm.diffusion.loss import masked_diffusion_loss_per_sample
from megatron_loopmdm.diffusion.noise import (
    VALIDATION_T_GRID,
    fixed_times,
    mask_tokens,
    masking_probability,
    validation_grid,
)

import torch
import torch.nn.functional as F
from torch import Tensor

EVAL_T_GRID = VALIDATION_T_GRID  # the trainer's grid


def _token_ce(model, noisy: Tensor, tokens: Tensor, num_loops: int, attention_mask=None) -> Tensor:
    """[b, s] fp32 cross entropy of the clean tokens."""
    logits = model(noisy, num_loops=num_loops, attention_mask=attention_mask).logits.float()
    return F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")


@torch.no_grad()
def nelbo_per_loops(
    model,
    samples: Sequence[Dict[str, Tensor]],
    num_loops: Sequence[int],
    seed: int = 1234,
    eps: float = 1e-3,
    batch_size: int = 8,
    grid: int = EVAL_T_GRID,
) -> List[Dict[str, float]]:
    """NELBO per token and its perplexity bound at each loop count.

    Args:
        model: a `LoopMDMForMaskedDiffusion` (eval mode).
        samples: dataset samples with `tokens` [s] int64, optional `loss_mask` [s]; the position
            in this sequence is the sample index that keys the masks (as the trainer's
            `sample_index` of the validation split).
        num_loops: the loop counts to evaluate.
        seed: the run's `--seed` (the masks depend on it).
        eps: the smallest masking probability (`--time-eps`).
        batch_size: samples per forward pass (does not change the result).
        grid: points of the midpoint rule in t.

    Returns:
        One dict per loop count: `num_loops`, `nelbo` (nats per token), `ppl_bound` (exp of it),
        `tokens` (tokens counted over the grid).
    """
    device = next(model.parameters()).device
    mask_id = model.config.mask_token_id
    rows = []
    for loops in num_loops:
        total, count = 0.0, 0
        for first in range(0, len(samples), batch_size):
            chunk = samples[first : first + batch_size]
            tokens = torch.stack([c["tokens"] for c in chunk]).to(device)
            valid = torch.stack(
                [c.get("loss_mask", torch.ones_like(c["tokens"], dtype=torch.float)) for c in chunk]
            ).bool()
            index = torch.arange(first, first + len(chunk))
            attention_mask = None if valid.all() else valid.long().to(device)
            for t_k, stream in validation_grid(grid):
                t = fixed_times(len(chunk), t_k)
                noisy, mask, p_mask = mask_tokens(
                    tokens, index, seed, mask_id, eps, t, valid.to(device), stream=stream
                )
                ce = _token_ce(model, noisy, tokens, loops, attention_mask)
                total += masked_diffusion_loss_per_sample(ce, mask, p_mask).sum().item()
                count += int(valid.sum())
        nelbo = total / max(count, 1)
        rows.append(
            {"num_loops": loops, "nelbo": nelbo, "ppl_bound": math.exp(nelbo), "tokens": count}
        )
    return rows


@torch.no_grad()
def sequence_nelbo(
    model,
    tokens: Tensor,
    num_loops: int,
    num_samples: int = 8,
    prompt_length: int = 0,
    eps: float = 1e-3,
    generator: torch.Generator = None,
    stratified: bool = True,
) -> Tensor:
    """A Monte Carlo upper bound on -log p(tokens[prompt_length:] | tokens[:prompt_length]).

    Each of `num_samples` draws masks the continuation with probability p(t) (never the prompt)
    and scores sum over masked positions of CE / p. `stratified` spreads t over (0, 1) in equal
    slices (lower variance). The estimate is in nats for the whole continuation.

    Args:
        tokens: [b, s] int64, the prompt then the continuation (same prompt length per row).

    Returns:
        [b] float64, the mean over draws.
    """
    b, s = tokens.shape
    device = tokens.device
    mask_id = model.config.mask_token_id
    target = torch.zeros(b, s, dtype=torch.bool, device=device)
    target[:, prompt_length:] = True
    total = torch.zeros(b, dtype=torch.float64)
    for n in range(num_samples):
        u = torch.rand(b, dtype=torch.float64, generator=generator)
        t = (n + u) / num_samples if stratified else u
        p_mask = masking_probability(t, eps)  # [b] float64
        draw = torch.rand(b, s, dtype=torch.float64, generator=generator)
        mask = (draw < p_mask[:, None]).to(device) & target
        noisy = torch.where(mask, mask_id, tokens)
        ce = _token_ce(model, noisy, tokens, num_loops)
        total += masked_diffusion_loss_per_sample(ce, mask, p_mask.to(device)).double().cpu()
    return total / num_samples
