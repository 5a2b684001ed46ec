"""Masked-diffusion samplers: low-confidence and random remasking in semi-autoregressive
blocks (LLaDA), and MDLM-style ancestral sampling, with a loop count per denoising step.

The answer starts as `gen_length` [MASK] tokens after the prompt. It is filled block by block,
left to right; each block gets `steps / num_blocks` steps. Remasking samplers commit a fixed
number of the block's masked tokens per step (an equal share, the remainder first): the most
confident predictions (`low_confidence`) or random ones (`random`). `ancestral` steps the
block's time from t to s = t - 1/steps_per_block and unmasks each masked token with probability
(t - s) / t, so the last step fills the rest. Committed tokens never change again; the prompt
never changes. All sampling noise is float64 and drawn on the CPU from the given generator, so
a seed gives the same tokens on any device.
"""

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

from megatron_loopmdm.inference.flops import forward_flops_per_token
from megatron_loopmdm.inference.loops import LoopPolicy

import torch
from torch import Tensor

REMASKINGS = ("low_confidence", "random", "ancestral")


@dataclass
class SamplerConfig:
    """What to generate and how."""

    gen_length: int = 128
    """Tokens to generate after each prompt."""
    steps: int = 128
    """Denoising steps in all (forward passes, twice that with guidance)."""
    block_length: Optional[int] = None
    """Tokens per semi-autoregressive block; divides gen_length (default: one block)."""
    remasking: str = "low_confidence"
    """`low_confidence`, `random` or `ancestral`."""
    temperature: float = 0.0
    """0: argmax; > 0: sample softmax(logits / temperature) by Gumbel-max in float64."""
    cfg_scale: float = 0.0
    """Classifier-free guidance weight w: logits = u + (w + 1)(c - u), u with the prompt masked."""
    suppress_eos: bool = False
    """Never predict `eos_token_id` (forces answers of the full length)."""
    eos_token_id: Optional[int] = None
    """The EOS id, for `suppress_eos`."""
    loops: LoopPolicy = field(default_factory=LoopPolicy)
    """The loop count of each step."""

    def __post_init__(self) -> None:
        self.block_length = self.block_length or self.gen_length
        if self.gen_length < 1 or self.steps < 1:
            raise ValueError(
                f"gen_length={self.gen_length}, steps={self.steps}: both must be >= 1."
            )
        if self.gen_length % self.block_length:
            raise ValueError(
                f"--block-length {self.block_length} must divide --gen-length {self.gen_length}."
            )
        if self.steps % self.num_blocks:
            raise ValueError(
                f"--steps {self.steps} must be a multiple of the number of blocks "
                f"({self.num_blocks} = gen_length / block_length)."
            )
        if self.remasking not in REMASKINGS:
            raise ValueError(
                f"remasking={self.remasking!r}: choose one of {', '.join(REMASKINGS)}."
            )
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0.")
        if self.suppress_eos and self.eos_token_id is None:
            raise ValueError("suppress_eos needs eos_token_id (the tokenizer's EOS).")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


@dataclass
class GenerationResult:
    """Generated tokens and what producing them cost."""

    tokens: Tensor
    """[b, p + gen_length] int64: left-padded prompts, then the answers."""
    prompt_lengths: List[int]
    """Each prompt's length (its padding is tokens[:, :p - length])."""
    gen_length: int
    loops_per_step: List[int]
    """Loops run at each denoising step (the conditional pass, when guided)."""
    committed_per_step: Tensor
    """[b, steps] int64, tokens committed at each step."""
    loop_evaluations: int
    """Loop-block runs summed over every forward pass."""
    model_flops: Optional[float]
    """Forward model FLOPs of all passes (None if the model has no LoopMDM config)."""
    seconds: float

    @property
    def generated(self) -> Tensor:
        """[b, gen_length] int64, the answers."""
        return self.tokens[:, -self.gen_length :]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens.size(0) * self.gen_length / max(self.seconds, 1e-9)


def tokens_per_step(num_masked: Tensor, steps: int) -> Tensor:
    """[b] masked counts -> [b, steps] tokens to commit per step, the remainder spread first."""
    base = num_masked[:, None] // steps
    extra = torch.arange(steps, device=num_masked.device)[None] < (num_masked % steps)[:, None]
    return base + extra.long()


def pad_prompts(
    prompts: Union[Tensor, Sequence[Sequence[int]]], gen_length: int, mask_id: int, pad_id: int
) -> tuple[Tensor, Optional[Tensor], List[int]]:
    """Left-pads prompts of different lengths and appends `gen_length` masks.

    Left padding lines the answers up in one block grid; padding is hidden from attention
    (and, with RoPE, relative positions between real tokens are unchanged).

    Returns:
        x [b, p + gen_length] int64, attention_mask [b, p + gen_length] int64 (None when no
        prompt is padded), the prompt lengths.
    """
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist()
    lengths = [len(p) for p in prompts]
    p = max(lengths)
    x = torch.full((len(prompts), p + gen_length), mask_id, dtype=torch.long)
    attention_mask = torch.ones_like(x)
    for row, prompt in enumerate(prompts):
        x[row, : p - len(prompt)] = pad_id
        attention_mask[row, : p - len(prompt)] = 0
        x[row, p - len(prompt) : p] = torch.tensor(list(prompt), dtype=torch.long)
    return x, (None if min(lengths) == p else attention_mask), lengths


def _model_call(model, x, attention_mask, num_loops: int, policy: LoopPolicy):
    """One forward pass -> (logits [b, s, vocab] float64, loops run)."""
    kwargs = {"num_loops": num_loops}
    if policy.adaptive:
        kwargs.update(loop_threshold=policy.threshold, min_loops=min(policy.min_loops, num_loops))
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        # Learned positions count real tokens only; RoPE ignores position_ids.
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(x, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    used = getattr(out, "num_loops", None) or num_loops
    return logits.double(), int(used)


def _gumbel_argmax(logits: Tensor, temperature: float, generator) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, dtype=torch.float64, generator=generator).to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
    return (logits / temperature + gumbel).argmax(-1)


@torch.no_grad()
def generate(
    model,
    prompts: Union[Tensor, Sequence[Sequence[int]]],
    config: SamplerConfig,
    mask_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> GenerationResult:
    """Samples answers to a batch of prompts (lengths may differ).

    Args:
        model: called as `model(ids [b, s], num_loops=S[, attention_mask=, position_ids=]
            [, loop_threshold=, min_loops=])`, returning logits [b, s, vocab] (or an object with
            `.logits` and optionally `.num_loops`); a `LoopMDMForMaskedDiffusion` fits.
        prompts: token ids, one list per prompt, or a [b, p] tensor.
        config: the sampler settings.
        mask_token_id: the [MASK] id (default `model.config.mask_token_id`).
        pad_token_id: the left-padding id (default: EOS, else 0); padding is never attended.
        generator: a CPU generator for the float64 noise (seed it for reproducible text).

    Returns:
        `GenerationResult`.
    """
    model_config = getattr(model, "config", None)
    if mask_token_id is None:
        mask_token_id = model_config.mask_token_id
    if pad_token_id is None:
        pad_token_id = config.eos_token_id if config.eos_token_id is not None else 0
    default_loops = getattr(model_config, "max_loops", 1)
    device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    x, attention_mask, prompt_lengths = pad_prompts(
        prompts, config.gen_length, mask_token_id, pad_token_id
    )
    x = x.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    b, s = x.shape
    p = s - config.gen_length
    prompt_region = torch.zeros_like(x, dtype=torch.bool)
    prompt_region[:, :p] = True
    committed = torch.zeros(b, config.steps, dtype=torch.long)
    loops_per_step, loop_evaluations, flops = [], 0, 0.0
    start_time = time.perf_counter()
    spb = config.steps_per_block
    for block in range(config.num_blocks):
        start, end = p + block * config.block_length, p + (block + 1) * config.block_length
        in_block = torch.zeros_like(prompt_region)
        in_block[:, start:end] = True
        schedule = tokens_per_step((x[:, start:end] == mask_token_id).sum(-1).cpu(), spb)
        for j in range(spb):
            step = block * spb + j
            num_loops = config.loops.loops_at(step, config.steps, default_loops)
            logits, used = _model_call(model, x, attention_mask, num_loops, config.loops)
            loops_per_step.append(used)
            passes = [used]
            if config.cfg_scale > 0:
                unconditional = torch.where(prompt_region, mask_token_id, x)
                logits_u, used_u = _model_call(
                    model, unconditional, attention_mask, num_loops, config.loops
                )
                logits = logits_u + (config.cfg_scale + 1) * (logits - logits_u)
                # -inf - (-inf) is NaN at [MASK] (SUBS): keep [MASK] impossible after guidance.
                logits[..., mask_token_id] = -math.inf
                passes.append(used_u)
            for n in passes:
                loop_evaluations += n
                per_token = forward_flops_per_token(model_config, s, n)
                flops = None if per_token is None or flops is None else flops + per_token * b * s
            if config.suppress_eos:
                logits[..., config.eos_token_id] = -math.inf
            prediction = _gumbel_argmax(logits, config.temperature, generator)
            candidates = (x == mask_token_id) & in_block
            commit = _choose(config, logits, prediction, candidates, schedule[:, j], j, generator)
            x = torch.where(commit, prediction, x)
            committed[:, step] = commit.sum(-1).cpu()
    return GenerationResult(
        tokens=x,
        prompt_lengths=prompt_lengths,
        gen_length=config.gen_length,
        loops_per_step=loops_per_step,
        committed_per_step=committed,
        loop_evaluations=loop_evaluations,
        model_flops=flops,
        seconds=time.perf_counter() - start_time,
    )


def _choose(config, logits, prediction, candidates, num_commit, j, generator) -> Tensor:
    """[b, s] bool: which candidate positions take their prediction at this step."""
    if config.remasking == "ancestral":
        t = 1.0 - j / config.steps_per_block
        s = 1.0 - (j + 1) / config.steps_per_block
        u = torch.rand(candidates.shape, dtype=torch.float64, generator=generator)
        return candidates & (u.to(candidates.device) < (t - s) / t)
    if config.remasking == "low_confidence":
        confidence = logits.softmax(-1).gather(-1, prediction[..., None]).squeeze(-1)
    else:
        confidence = torch.rand(candidates.shape, dtype=torch.float64, generator=generator)
        confidence = confidence.to(candidates.device)
    confidence = torch.where(candidates, confidence, -math.inf)
    # rank 0 = the most confident; a stable sort breaks ties by position.
    order = torch.argsort(confidence, dim=-1, descending=True, stable=True)
    rank = order.argsort(-1)
    return candidates & (rank < num_commit.to(candidates.device)[:, None])
