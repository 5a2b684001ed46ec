"""Sampling from a LoopMDM: masked-diffusion samplers with per-step loop control.

`generate` runs any model that maps `[b, s]` token ids and a loop count to `[b, s, vocab]`
logits (the Hugging Face `LoopMDMForMaskedDiffusion` from `megatron_loopmdm.hf`, or a plain
callable); `LoopPolicy` says how many loops each denoising step runs (fixed, adaptive by
convergence, or a schedule over the steps).
"""

from megatron_loopmdm.inference.loops import LoopPolicy
from megatron_loopmdm.inference.sampler import (
    REMASKINGS,
    GenerationResult,
    SamplerConfig,
    generate,
    pad_prompts,
    tokens_per_step,
)

__all__ = [
    "REMASKINGS",
    "GenerationResult",
    "LoopPolicy",
    "SamplerConfig",
    "generate",
    "pad_prompts",
    "tokens_per_step",
]
