"""Named model sizes, each with a default loop span in the early-middle layers.

`debug` is for tests. `mdlm-small` is MDLM's DiT-style 12-layer model (LayerNorm, GELU),
`smdm-113m` and `smdm-170m` are SMDM's LLaMA-style models (RMSNorm, SwiGLU) at the scale the
LoopMDM paper reports, and `1b` is a larger LLaMA-style model with grouped-query attention.
The paper finds a small looped block (1-2 layers of 12) in the early-middle layers works best.
"""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ModelSize:
    """Architecture of a named size."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    loop_layers: tuple[int, int]
    max_loops: int = 4
    num_query_groups: Optional[int] = None
    normalization: str = "RMSNorm"
    swiglu: bool = True
    seq_length: int = 1024
    kv_channels: Optional[int] = None
    """Per-head width; None means hidden_size / num_attention_heads (Qwen3 sets it apart)."""
    layernorm_epsilon: float = 1e-5
    """The norms' epsilon (pretrained Llama/Qwen models use 1e-5 or 1e-6)."""
    qk_layernorm: bool = False
    """A per-head norm of queries and keys before RoPE (Qwen3)."""
    add_qkv_bias: bool = False
    """Biases on the query/key/value projections only (Qwen2)."""


MODEL_SIZES = {
    "debug": ModelSize(
        4, 64, 4, 128, loop_layers=(1, 2), max_loops=3, num_query_groups=2, seq_length=64
    ),
    "mdlm-small": ModelSize(
        12, 768, 12, 3072, loop_layers=(3, 5), normalization="LayerNorm", swiglu=False
    ),
    "smdm-113m": ModelSize(12, 768, 12, 2048, loop_layers=(3, 5)),
    "smdm-170m": ModelSize(18, 768, 12, 2048, loop_layers=(4, 6)),
    "1b": ModelSize(24, 2048, 16, 5632, loop_layers=(6, 8), num_query_groups=8, seq_length=2048),
}


def get_model_size(name: str) -> ModelSize:
    """The named size, or a ValueError listing the known names."""
    if name not in MODEL_SIZES:
        raise ValueError(
            f"--model-size {name!r} is unknown; choose one of {', '.join(MODEL_SIZES)}."
        )
    return MODEL_SIZES[name]
