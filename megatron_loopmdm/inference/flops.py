"""Model FLOPs of inference forward passes, from a Hugging Face LoopMDM config.

The per-layer count is the trainer's (`models.flops.layer_flops_per_token`), so sampler and
training logs use one formula; the HF config's names are mapped onto the megatron ones it reads.
"""

from types import SimpleNamespace
from typing import Optional

from megatron_loopmdm.models.flops import layer_flops_per_token


def forward_flops_per_token(
    config, seq_length: int, num_loops: float, num_probes: int = 0
) -> Optional[float]:
    """Forward FLOPs per token of a `LoopMDMConfig` model at loop count S (None if unknown).

    Effective depth: num_hidden_layers + (S - 1) x loop-block layers, plus the output layer;
    each of `num_probes` probes (a loop state read out for a stopping rule) adds the coda layers
    and the output layer once more. S may be a mean over rows (the count is linear in S).
    """
    try:
        start, end = config.loop_layers
        sizes = SimpleNamespace(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_key_value_heads,
            kv_channels=config.head_dim,
            ffn_hidden_size=config.intermediate_size,
            gated_linear_unit=config.gated_linear_unit,
        )
        layers = config.num_hidden_layers + (num_loops - 1) * (end - start)
        vocab = config.vocab_size
    except AttributeError:
        return None
    layers += num_probes * (config.num_hidden_layers - end)
    head = 2 * config.hidden_size * vocab * (1 + num_probes)
    return layers * layer_flops_per_token(sizes, seq_length) + head
