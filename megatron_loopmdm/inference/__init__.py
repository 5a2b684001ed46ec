"""Sampling from a LoopMDM: masked-diffusion samplers with per-step loop control.

`generate` runs any model that maps `[b, s]` token ids and a loop count to `[b, s, vocab]`
logits (the Hugging Face `LoopMDMForMaskedDiffusion` from `megatron_loopmdm.hf`, or a plain
callable); `LoopPolicy` says how many loops each denoising step runs (fixed, adaptive by
convergence, or a schedule over the steps). The sampler is
`megatron_loopmdm/hf/generation_loopmdm.py`, shared with the exported model; its fast paths
are parallel decoding (`SamplerConfig(threshold=)` or `factor=`) and key/value caches of every
layer and loop (`cache="prefix"` or `"dual"`).
"""

from megatron_loopmdm.inference.loops import LoopPolicy
from megatron_loopmdm.inference.sampler import (
    CACHE_REFRESHES,
    CACHES,
    REMASKINGS,
    GenerationResult,
    SamplerConfig,
    generate,
    pad_prompts,
    tokens_per_step,
)

__all__ = [
    "CACHES",
    "CACHE_REFRESHES",
    "REMASKINGS",
    "GenerationResult",
    "LoopPolicy",
    "SamplerConfig",
    "generate",
    "pad_prompts",
    "tokens_per_step",
]
