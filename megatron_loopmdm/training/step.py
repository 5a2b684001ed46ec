"""One masked-diffusion training step over megatron-core's schedules.

A batch is a dict with `tokens` [b, s] int64 (clean) and `sample_index` [b] int64 (each sample's
global index, which keys its diffusion noise), and optionally `loss_mask` [b, s] (0 on padding),
`position_ids` and `document_ids` (per-document attention) from `megatron_loopmdm.data`.
A batch with `response_mask` [b, s] (supervised fine-tuning, `megatron_loopmdm.data.sft`) is
masked and scored on its response tokens only (`diffusion.loss.sft_loss_positions`).
The loss is summed per micro-batch and normalised by the number of tokens of the whole global
batch (megatron's per-token loss), so any split into micro-batches and data-parallel replicas
gives the same loss and gradients. With `LoopConfig.intermediate_loss_weight` > 0 the model in
training mode also returns the intermediate loops' weighted per-token CE, which the loss scores
with the same masks and adds (reported apart from the final loop's NELBO).
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

from megatron_loopmdm.data.dataset import document_attention_mask
from megatron_loopmdm.diffusion.config import DiffusionConfig
from megatron_loopmdm.diffusion.loss import masked_diffusion_loss_per_sample, sft_loss_positions
from megatron_loopmdm.diffusion.noise import fixed_times, mask_tokens, random_lengths, sample_times
from megatron_loopmdm.distributed.parallel import any_rank
from megatron_loopmdm.models.attention_masks import annealed_attention_mask
from megatron_loopmdm.models.specs import attach_document_segments

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

T_BUCKETS = 4  # the loss is also reported per quarter of t in [0, 1]


def _loss_func(mask, p_mask, valid, output_tensor):
    # output_tensor: [b, s] fp32 per-token cross entropy from the last stage, or with the
    # intermediate-loop loss the pair (that, W x the intermediate loops' mean CE [b, s]).
    loop_ce = None
    if isinstance(output_tensor, tuple):
        output_tensor, loop_ce = output_tensor
    per_sample = masked_diffusion_loss_per_sample(output_tensor, mask, p_mask)  # [b]
    loss_sum = per_sample.sum()
    tokens_per_sample = valid.sum(1)
    num_tokens = tokens_per_sample.sum().to(torch.int)
    # Loss by t-bucket: p_mask ~ t, so bucket by p.
    bucket = (p_mask.float() * T_BUCKETS).long().clamp(0, T_BUCKETS - 1)
    by_t = torch.zeros(2, T_BUCKETS, device=loss_sum.device)
    by_t[0].index_add_(0, bucket, per_sample.detach())
    by_t[1].index_add_(0, bucket, tokens_per_sample.float())
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    reported = {"nelbo": report, "nelbo_by_t": by_t}
    if loop_ce is not None:
        # The NELBO is linear in the per-token CE: this is W x the loops' mean NELBO numerator.
        loop_sum = masked_diffusion_loss_per_sample(loop_ce, mask, p_mask).sum()
        reported["intermediate_loss"] = torch.stack([loop_sum.detach(), num_tokens.float()])
        loss_sum = loss_sum + loop_sum
    return loss_sum, num_tokens, reported


def _prepare(batch, diffusion: DiffusionConfig, seed: int):
    """Valid positions and the attention mask of a batch (padding, cuts, document bounds)."""
    tokens = batch["tokens"]
    valid = batch["loss_mask"].bool() if "loss_mask" in batch else torch.ones_like(tokens).bool()
    if diffusion.random_length_prob > 0:
        lengths = random_lengths(
            batch["sample_index"], seed, diffusion.random_length_prob, tokens.size(1)
        )
        valid &= torch.arange(tokens.size(1))[None, :] < lengths[:, None].to(tokens.device)
    attention_mask = None
    if "document_ids" in batch:
        attention_mask = document_attention_mask(batch["document_ids"]) | ~valid[:, None, None]
        attention_mask = attach_document_segments(attention_mask, batch["document_ids"], valid)
    elif not valid.all():
        attention_mask = ~valid[:, None, None, :]  # [b, 1, 1, s], True = not attended
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
    return tokens, valid, attention_mask, position_ids


def _with_annealing(attention_mask, sample_index, seq_length, seed, progress):
    """The batch's mask OR the annealed causal mask ([b, 1, s, s]); unchanged at progress 1."""
    annealed = annealed_attention_mask(sample_index, seq_length, seed, progress)
    if annealed is None:
        return attention_mask
    annealed = annealed.to(sample_index.device)
    return annealed if attention_mask is None else attention_mask | annealed


def _loss_positions(batch, valid):
    """Positions that may be masked and are counted: `valid`, or its response part in SFT."""
    if "response_mask" not in batch:
        return valid
    return sft_loss_positions(valid, batch["response_mask"])


def count_loss_tokens(batch: dict, diffusion: DiffusionConfig, seed: int) -> int:
    """The number of tokens a micro-batch contributes to the loss's normaliser."""
    return int(_loss_positions(batch, _prepare(batch, diffusion, seed)[1]).sum())


def make_forward_step(
    diffusion: DiffusionConfig,
    seed: int,
    num_loops: int,
    fixed_t: Optional[float] = None,
    stream: int = 0,
    anneal_progress: float = 1.0,
):
    """A `forward_step_func` for megatron's schedules at one loop count.

    With `fixed_t`, every sample is noised at that t (validation on a fixed t-grid); `stream`
    then selects an independent mask draw per grid point. `anneal_progress` < 1 adds the
    causal-to-bidirectional annealed attention mask (see `models.attention_masks`).
    """

    def forward_step(data_iterator: Iterator, model):
        batch = next(data_iterator)
        tokens, valid, attention_mask, position_ids = _prepare(batch, diffusion, seed)
        valid = _loss_positions(batch, valid)  # attention keeps the prompt; noise and loss do not
        index = batch["sample_index"]
        if fixed_t is None:
            t = sample_times(index, seed, diffusion.time_sampling, diffusion.global_batch_size)
        else:
            t = fixed_times(tokens.size(0), fixed_t)
        noisy, mask, p_mask = mask_tokens(
            tokens, index, seed, diffusion.mask_token_id, diffusion.time_eps, t, valid, stream
        )
        attention_mask = _with_annealing(
            attention_mask, index, tokens.size(1), seed, anneal_progress
        )
        output = model(
            noisy,
            position_ids=position_ids,
            attention_mask=attention_mask,
            num_loops=num_loops,
            labels=tokens,
        )
        return output, partial(_loss_func, mask, p_mask, valid)

    return forward_step


@dataclass
class StepResult:
    """What one training step reports."""

    loss: Optional[float]
    """The global batch's per-token NELBO (on the last pipeline stage; None elsewhere)."""

    grad_norm: Optional[float]
    """The gradient norm before clipping (None when the step was skipped)."""

    update_successful: bool
    """False when the step was skipped because the loss or a gradient was not finite."""

    loss_by_t: Optional[torch.Tensor] = None
    """[2, T_BUCKETS]: NELBO numerator and token count per bucket of t (last stage only)."""

    intermediate_loss: Optional[float] = None
    """The intermediate-loop term added to the trained loss, per token: W x the mean over loops
    1..S-1 of their NELBO (`LoopConfig.intermediate_loss_weight`; None when off or not the last
    stage). The trained loss is `loss + intermediate_loss`."""


def _all_finite(model_chunks: list, loss: Optional[float]) -> bool:
    """Whether the loss and every gradient on every rank are finite (one all-reduce)."""
    finite = loss is None or math.isfinite(loss)
    finite = finite and all(torch.isfinite(grads).all() for grads in _gradients(model_chunks))
    return not any_rank(not finite)


def _gradients(model_chunks: list):
    """Every gradient: megatron DDP's contiguous grad buffers (one check each, not one per
    parameter: fewer host-side steps), else each parameter's `main_grad`."""
    for chunk in model_chunks:
        buffers = getattr(chunk, "buffers", None)
        if buffers is not None:
            yield from (b.grad_data for b in [*buffers, *chunk.expert_parallel_buffers])
        else:
            yield from (
                p.main_grad for p in chunk.parameters() if getattr(p, "main_grad", None) is not None
            )


def train_step(
    forward_step_func,
    data_iterator,
    model_chunks: list,
    optimizer,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> StepResult:
    """Forward, backward and optimizer step on one global batch.

    A step whose loss or gradients are not finite anywhere is skipped: no update, and
    `update_successful` is False.
    """
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
    loss, by_t = reduce_loss(losses)
    intermediate = reduce_intermediate_loss(losses)
    if not _all_finite(model_chunks, loss):
        return StepResult(loss, None, False, by_t, intermediate)
    update_successful, grad_norm, _ = optimizer.step()
    return StepResult(loss, grad_norm, update_successful, by_t, intermediate)


def sum_reports(reports: list, key: str) -> torch.Tensor:
    """One field of the loss functions' reports summed over this rank's micro-batches and then
    over the data-parallel replicas: the one loss reduction of both backends."""
    total = torch.stack([report[key] for report in reports]).sum(0)
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    torch.distributed.all_reduce(total, group=group)
    return total


def reduce_loss(losses: list) -> tuple[Optional[float], Optional[torch.Tensor]]:
    """The global batch's per-token NELBO and loss by t-bucket, from the last stage's reports."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None, None
    total = sum_reports(losses, "nelbo")
    by_t = sum_reports(losses, "nelbo_by_t")
    return (total[0] / total[1]).item(), by_t


def reduce_intermediate_loss(reports: list) -> Optional[float]:
    """The global batch's per-token intermediate-loop term from the loss functions' reports
    (None when the model did not compute it, or off the last stage, where reports are empty)."""
    if not reports or "intermediate_loss" not in reports[0]:
        return None
    total = sum_reports(reports, "intermediate_loss")
    return (total[0] / total[1]).item()
