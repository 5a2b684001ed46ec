"""Sampling from a LoopMDM: masked-diffusion samplers with per-step loop control.

`generate` runs any model that maps `[b, s]` token ids and a loop count to `[b, s, vocab]`
logits (the Hugging Face `LoopMDMForMaskedDiffusion` from `megatron_loopmdm.hf`, or a plain
callable); `LoopPolicy` says how many loops each denoising step runs (fixed, a schedule over
the steps, a calibrated schedule saved with the model, or adaptive by a stopping rule per
batch, sample or position, optionally within a compute budget). The sampler is
`megatron_loopmdm/hf/generation_loopmdm.py`, shared with the exported model; its fast paths
are parallel decoding (`SamplerConfig(threshold=)` or `factor=`) and key/value caches of every
layer and loop (`cache="prefix"` or `"dual"`).
"""

from megatron_loopmdm.inference.loops import (
    GRANULARITIES,
    SCHEDULE_FILE,
    STOP_RULES,
    LoopPolicy,
    read_loop_schedule,
    write_loop_schedule,
)
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
    "GRANULARITIES",
    "SCHEDULE_FILE",
    "STOP_RULES",
    "REMASKINGS",
    "GenerationResult",
    "LoopPolicy",
    "SamplerConfig",
    "generate",
    "pad_prompts",
    "read_loop_schedule",
    "tokens_per_step",
    "write_loop_schedule",
]
