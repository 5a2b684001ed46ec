"""Model FLOPs of LoopMDM, counting the effective depth prelude + S x loop + coda.

One function serves logging (TFLOP/s per device), benchmarks (MFU) and the paper's
compute-matched comparisons. Recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from typing import TYPE_CHECKING, Optional

from megatron_loopmdm.models.config import LoopConfig
from megatron_loopmdm.models.loop_sampling import expected_num_loops

if TYPE_CHECKING:  # only the sizes are read: the inference side runs without megatron-core
    from megatron.core.transformer.transformer_config import TransformerConfig


def layer_flops_per_token(config: "TransformerConfig", seq_length: int) -> float:
    """Forward FLOPs of one transformer layer per token (bidirectional attention over s keys)."""
    h = config.hidden_size
    attention_width = config.num_attention_heads * config.kv_channels
    kv_width = (config.num_query_groups or config.num_attention_heads) * config.kv_channels
    qkv = 2 * h * (attention_width + 2 * kv_width)
    scores_and_values = 2 * 2 * seq_length * attention_width
    projection = 2 * attention_width * h
    fc1 = 2 * h * config.ffn_hidden_size * (2 if config.gated_linear_unit else 1)
    fc2 = 2 * config.ffn_hidden_size * h
    return float(qkv + scores_and_values + projection + fc1 + fc2)


def flops_per_token(
    config: "TransformerConfig",
    loop_config: LoopConfig,
    vocab_size: int,
    seq_length: int,
    num_loops: Optional[float] = None,
    training: bool = True,
) -> float:
    """Model FLOPs per token.

    Args:
        config: the transformer config (sizes).
        loop_config: the looped span; `num_loops` defaults to E[S] of its training draw.
        vocab_size: the (padded) vocabulary size, for the output layer.
        seq_length: the sequence length, for the attention terms.
        num_loops: the loop count S (may be fractional, e.g. an expectation).
        training: forward + backward (3x forward) if True, else forward only.
    """
    if num_loops is None:
        num_loops = expected_num_loops(loop_config)
    effective_layers = config.num_layers + (num_loops - 1) * loop_config.num_loop_layers
    forward = effective_layers * layer_flops_per_token(config, seq_length)
    forward += 2 * config.hidden_size * vocab_size
    return forward * (3 if training else 1)
