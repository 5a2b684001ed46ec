"""Hugging Face configuration of a LoopMDM (looped masked diffusion language model).

This file is copied into every converted model directory and loaded there with
`trust_remote_code=True`, so it imports only `transformers`: no megatron, no megatron_loopmdm.
"""

from transformers import PretrainedConfig

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
ACTIVATIONS = ("silu", "gelu")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
INPUT_INJECTIONS = ("none", "add", "concat")


class LoopMDMConfig(PretrainedConfig):
    """A LoopMDM: bidirectional transformer whose layers [start, end) run `num_loops` times.

    Args:
        vocab_size: the (padded) vocabulary size, [MASK] included.
        hidden_size: the residual width h.
        intermediate_size: the MLP width (per branch when gated).
        num_hidden_layers: distinct layers (the loop block counts once).
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (query groups); equal to the heads without GQA.
        head_dim: per-head width (megatron's kv_channels); default hidden_size / heads.
        normalization: `RMSNorm` or `LayerNorm` (pre-norm, and the final norm).
        layer_norm_eps: the norms' epsilon.
        hidden_act: `silu` or `gelu` (exact, not the tanh approximation).
        gated_linear_unit: SwiGLU-style MLP, act(gate) * up.
        position_embedding_type: `rope` or `learned_absolute`.
        max_position_embeddings: rows of the learned position table (also the trained length).
        rope_theta: RoPE base.
        mask_token_id: the [MASK] id; its logit is -inf (SUBS).
        loop_layers: `[start, end)`, 0-based, the looped span.
        max_loops: S_max of training; the default loop count and the loop-embedding rows.
        loop_input_injection: `none`, `add` (h + e) or `concat` (W [h; e]) before loops 2..S.
        loop_embedding: a learned loop-index embedding added before every loop.
        tie_word_embeddings: the output layer shares the token embedding.
        attention_bias: biases on the q/k/v projections (Qwen2).
        qk_layernorm: an RMSNorm over each head's queries and keys before RoPE (Qwen3).
        shift_logits: position i's logits are the output at position i - 1 (AR adaptation;
            position 0 keeps its own), as in Dream.
    """

    model_type = "loopmdm"

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = None,
        head_dim: int = None,
        normalization: str = "RMSNorm",
        layer_norm_eps: float = 1e-5,
        hidden_act: str = "silu",
        gated_linear_unit: bool = True,
        position_embedding_type: str = "rope",
        max_position_embeddings: int = 1024,
        rope_theta: float = 10000.0,
        mask_token_id: int = 127,
        loop_layers=(1, 2),
        max_loops: int = 4,
        loop_input_injection: str = "none",
        loop_embedding: bool = False,
        tie_word_embeddings: bool = True,
        attention_bias: bool = False,
        qk_layernorm: bool = False,
        shift_logits: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.normalization = normalization
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.gated_linear_unit = gated_linear_unit
        self.position_embedding_type = position_embedding_type
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.mask_token_id = mask_token_id
        self.loop_layers = list(loop_layers)
        self.max_loops = max_loops
        self.loop_input_injection = loop_input_injection
        self.loop_embedding = loop_embedding
        self.tie_word_embeddings = tie_word_embeddings
        self.attention_bias = attention_bias
        self.qk_layernorm = qk_layernorm
        self.shift_logits = shift_logits
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate()

    def _validate(self):
        for name, value, choices in (
            ("normalization", self.normalization, NORMALIZATIONS),
            ("hidden_act", self.hidden_act, ACTIVATIONS),
            ("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDINGS),
            ("loop_input_injection", self.loop_input_injection, INPUT_INJECTIONS),
        ):
            if value not in choices:
                raise ValueError(f"{name}={value!r}: choose one of {', '.join(choices)}.")
        start, end = self.loop_layers
        if not 0 <= start < end <= self.num_hidden_layers:
            raise ValueError(
                f"loop_layers={self.loop_layers} must be [start, end) with "
                f"0 <= start < end <= num_hidden_layers ({self.num_hidden_layers})."
            )
        if self.max_loops < 1:
            raise ValueError(f"max_loops={self.max_loops} must be at least 1.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id={self.mask_token_id} is outside the vocabulary ({self.vocab_size})."
            )
