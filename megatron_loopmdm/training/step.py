"""One masked-diffusion training step over megatron-core's schedules.

A batch is a dict with `tokens` [b, s] int64 (clean) and `sample_index` [b] int64 (each sample's
global index, which keys its diffusion noise). The loss is summed per micro-batch and
normalised by the number of tokens of the whole global batch (megatron's per-token loss), so
any split into micro-batches and data-parallel replicas gives the same loss and gradients.
"""

from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

from megatron_loopmdm.diffusion.loss import masked_diffusion_loss_sum
from megatron_loopmdm.diffusion.noise import mask_tokens

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func


@dataclass
class DiffusionConfig:
    """The masked-diffusion objective."""

    mask_token_id: int
    """The reserved [MASK] id."""

    time_eps: float = 1e-3
    """Smallest masking probability: p = (1 - eps) t + eps."""

    def __post_init__(self):
        if not 0 <= self.time_eps < 1:
            raise ValueError(f"time_eps={self.time_eps} must lie in [0, 1).")


def _loss_func(mask, p_mask, output_tensor):
    # output_tensor: [b, s] fp32 per-token cross entropy from the last stage.
    loss_sum = masked_diffusion_loss_sum(output_tensor, mask, p_mask)
    num_tokens = torch.tensor(mask.numel(), dtype=torch.int, device=loss_sum.device)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {"nelbo": report}


def make_forward_step(diffusion: DiffusionConfig, seed: int, num_loops: int):
    """A `forward_step_func` for megatron's schedules at one loop count."""

    def forward_step(data_iterator: Iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"]
        noisy, mask, p_mask = mask_tokens(
            tokens, batch["sample_index"], seed, diffusion.mask_token_id, diffusion.time_eps
        )
        position_ids = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
        output = model(
            noisy,
            position_ids=position_ids,
            attention_mask=batch.get("attention_mask"),
            num_loops=num_loops,
            labels=tokens,
        )
        return output, partial(_loss_func, mask, p_mask)

    return forward_step


@dataclass
class StepResult:
    """What one training step reports."""

    loss: Optional[float]
    """The global batch's per-token NELBO (on the last pipeline stage; None elsewhere)."""

    grad_norm: Optional[float]
    """The gradient norm before clipping."""

    update_successful: bool
    """False when the optimizer skipped the step (non-finite gradients)."""


def train_step(
    forward_step_func,
    data_iterator,
    model_chunks: list,
    optimizer,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> StepResult:
    """Forward, backward and optimizer step on one global batch."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    return StepResult(reduce_loss(losses), grad_norm, update_successful)


def reduce_loss(losses: list) -> Optional[float]:
    """The per-token NELBO of the global batch from the last stage's micro-batch reports."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([report["nelbo"] for report in losses]).sum(0)
    torch.distributed.all_reduce(
        total, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    return (total[0] / total[1]).item()
