"""The library's entry to the one LoopMDM sampler, with model FLOPs.

The sampler itself is `megatron_loopmdm/hf/generation_loopmdm.py`, plain PyTorch, so that the
exported Hugging Face model carries the very same code (`diffusion_generate`). See that module
for the algorithm: low-confidence / random remasking in semi-autoregressive blocks (LLaDA),
ancestral sampling (MDLM), parallel decoding by a confidence threshold or Fast-dLLM's factor
rule, and prefix / dual key/value caches of every layer and loop.
"""

from typing import Optional, Sequence, Union

from megatron_loopmdm.hf.generation_loopmdm import (
    CACHE_REFRESHES,
    CACHES,
    REMASKINGS,
    GenerationResult,
    SamplerConfig,
    pad_prompts,
    tokens_per_step,
)
from megatron_loopmdm.hf.generation_loopmdm import generate as _generate
from megatron_loopmdm.inference.flops import forward_flops_per_token

import torch
from torch import Tensor

__all__ = [
    "CACHES",
    "CACHE_REFRESHES",
    "REMASKINGS",
    "GenerationResult",
    "SamplerConfig",
    "generate",
    "pad_prompts",
    "tokens_per_step",
]


def generate(
    model,
    prompts: Union[Tensor, Sequence[Sequence[int]]],
    config: SamplerConfig,
    mask_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> GenerationResult:
    """Samples answers to a batch of prompts (lengths may differ), counting model FLOPs.

    Args:
        model: called as `model(ids [b, s], num_loops=S[, attention_mask=, position_ids=]
            [, loop_threshold=, min_loops=][, kv_cache=, window_start=])`, returning logits
            [b, s, vocab] (or an object with `.logits` and optionally `.num_loops`); a
            `LoopMDMForMaskedDiffusion` fits.
        prompts: token ids, one list per prompt, or a [b, p] tensor.
        config: the sampler settings.
        mask_token_id: the [MASK] id (default `model.config.mask_token_id`).
        pad_token_id: the left-padding id (default: EOS, else 0); padding is never attended.
        generator: a CPU generator for the float64 noise (seed it for reproducible text).

    Returns:
        `GenerationResult`, with `model_flops` from the model's `LoopMDMConfig` (None without).
    """
    model_config = getattr(model, "config", None)

    def flops_per_token(keys: int, num_loops: float, num_probes: int = 0) -> Optional[float]:
        return forward_flops_per_token(model_config, keys, num_loops, num_probes)

    return _generate(
        model, prompts, config, mask_token_id=mask_token_id, pad_token_id=pad_token_id,
        generator=generator, flops_per_token=flops_per_token,
    )  # fmt: skip
