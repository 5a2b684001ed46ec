"""Configuration of the loop block and of the LoopMDM language model.

The transformer itself is configured by megatron-core's `TransformerConfig`; these dataclasses
hold what LoopMDM adds. Each validates itself on construction and says what to change.
"""

from dataclasses import dataclass
from typing import Optional

LOOP_SAMPLINGS = ("uniform", "fixed", "poisson-lognormal")
INPUT_INJECTIONS = ("none", "add", "concat")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
ROPE_SCALINGS = ("linear", "llama3")
LLAMA3_ROPE_FIELDS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LoopConfig:
    """Which layers loop, how often, and how the loops are trained."""

    loop_layers: tuple[int, int] = (1, 2)
    """The looped span `(start, end)`: 0-based global layer indices, end exclusive."""

    max_loops: int = 4
    """S_max: the largest loop count drawn in training. Inference accepts any S >= 1."""

    loop_sampling: str = "uniform"
    """How S is drawn per training step: `uniform` over 1..max_loops, `fixed` (always
    max_loops), or `poisson-lognormal`, a heavy-tailed draw (as in recurrent-depth models) with
    mean near (max_loops + 1) / 2, clipped to 1..max_loops."""

    input_injection: str = "none"
    """Re-inject the prelude output before loops 2..S: `none` (plain residual carry), `add`
    (h + e), or `concat` (a linear adapter on [h; e], initialised to pass h through)."""

    loop_embedding: bool = False
    """Add a learned loop-index embedding (zero-initialised) before every loop. Loop indices
    beyond max_loops reuse the last row."""

    backprop_depth: Optional[int] = None
    """Truncated backprop: gradients flow through the last k loops only. None means all.
    Earlier loops run without autograd; the prelude then learns only through input injection."""

    state_noise: float = 0.0
    """Training only: add Gaussian noise of this standard deviation to the loop block's input
    state (before loop 1), so the loops learn to pull a perturbed state back. 0 turns it off;
    eval mode and inference never add noise. Drawn from torch's default generator."""

    intermediate_loss_weight: float = 0.0
    """Training only: the weight W of an extra loss on the intermediate loops. The training
    loss becomes NELBO(final) + W * mean over loops i = 1..S-1 of NELBO(output after loop i),
    where the output after loop i is the loop state after loop i passed through the coda
    layers, final norm and output layer (the final output's head), scored with the same masks
    and p_mask. S = 1 adds nothing; 0 turns it off (the loss is then bit-identical to a model
    without the option). The reported NELBO stays the final loop's; eval mode and inference
    never compute the term. Needs the loop block and the output layer on one pipeline stage
    (pipeline-parallel size 1). Under `backprop_depth`, loops run without autograd still add
    their term, which then trains the coda and head only."""

    def __post_init__(self):
        self.loop_layers = tuple(self.loop_layers)
        start, end = self.loop_layers
        if not 0 <= start < end:
            raise ValueError(
                f"loop_layers={self.loop_layers} must be (start, end) with 0 <= start < end "
                "(0-based layer indices, end exclusive); e.g. --loop-layers 2 4 loops layers 2, 3."
            )
        if self.max_loops < 1:
            raise ValueError(f"max_loops={self.max_loops}: the loop count must be at least 1.")
        if self.loop_sampling not in LOOP_SAMPLINGS:
            raise ValueError(
                f"loop_sampling={self.loop_sampling!r}: choose one of {', '.join(LOOP_SAMPLINGS)}."
            )
        if self.input_injection not in INPUT_INJECTIONS:
            raise ValueError(
                f"input_injection={self.input_injection!r}: choose one of "
                f"{', '.join(INPUT_INJECTIONS)}."
            )
        if self.backprop_depth is not None and self.backprop_depth < 1:
            raise ValueError(
                f"backprop_depth={self.backprop_depth}: backprop through at least 1 loop, or "
                "leave it unset to backprop through all loops."
            )
        if not self.state_noise >= 0.0:
            raise ValueError(
                f"state_noise={self.state_noise}: the noise standard deviation must be >= 0 "
                "(0 turns it off)."
            )
        if not self.intermediate_loss_weight >= 0.0:
            raise ValueError(
                f"intermediate_loss_weight={self.intermediate_loss_weight}: the weight of the "
                "intermediate-loop loss must be >= 0 (0 turns it off)."
            )

    @property
    def num_loop_layers(self) -> int:
        return self.loop_layers[1] - self.loop_layers[0]

    def unrolled_layer_indices(self, num_layers: int, num_loops: int) -> list[int]:
        """The looped model's layer behind each layer of its unrolled equivalent.

        The unrolled model has prelude + num_loops x loop + coda layers; entry j names the
        looped model's layer whose weights unrolled layer j holds.
        """
        start, end = self.loop_layers
        loop = list(range(start, end))
        return list(range(start)) + loop * num_loops + list(range(end, num_layers))

    def validate_for(self, num_layers: int, pipeline_model_parallel_size: int = 1) -> None:
        """Checks that the looped span lies inside a model of `num_layers` layers, and that the
        options fit a model split over `pipeline_model_parallel_size` stages."""
        if self.loop_layers[1] > num_layers:
            raise ValueError(
                f"loop_layers={self.loop_layers} reaches past the last layer of a "
                f"{num_layers}-layer model; the end index must be <= {num_layers}."
            )
        if self.intermediate_loss_weight > 0 and pipeline_model_parallel_size > 1:
            # The intermediate loops' outputs would need the coda and output layer of a later
            # stage, and the pipeline schedules send one tensor per micro-batch.
            raise ValueError(
                f"intermediate_loss_weight={self.intermediate_loss_weight} needs the loop block "
                "and the output layer on one pipeline stage: use --pipeline-model-parallel-size "
                "1, or set --intermediate-loop-loss-weight 0."
            )


@dataclass
class LoopMDMModelConfig:
    """What the language model needs beyond the transformer and the loop block."""

    vocab_size: int
    """The (padded) vocabulary size, [MASK] included."""

    max_sequence_length: int
    """The longest sequence the position embedding serves."""

    mask_token_id: int
    """The reserved [MASK] id. Its logit is -inf (SUBS), so it is never predicted."""

    position_embedding_type: str = "rope"
    """`rope` or `learned_absolute`."""

    rotary_base: int = 10000
    """RoPE base."""

    share_embeddings_and_output_weights: bool = True
    """Tie the output layer to the input embedding."""

    rope_scaling: Optional[dict] = None
    """RoPE frequency scaling of a pretrained model, in Hugging Face's form: `{"rope_type":
    "linear", "factor": f}` (positions divided by f) or `{"rope_type": "llama3", "factor": f,
    "low_freq_factor": .., "high_freq_factor": .., "original_max_position_embeddings": ..}`.
    None: plain RoPE."""

    shift_logits: bool = False
    """Shifted prediction (AR adaptation, as in Dream): position i's logits are the output at
    position i - 1, so an autoregressive head keeps predicting the next token; position 0 keeps
    its own output."""

    def __post_init__(self):
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding_type={self.position_embedding_type!r}: choose one of "
                f"{', '.join(POSITION_EMBEDDINGS)}."
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id={self.mask_token_id} is outside the vocabulary of size "
                f"{self.vocab_size}; the [MASK] token must be part of the vocabulary."
            )
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length={self.max_sequence_length} must be positive.")
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling)


def _validate_rope_scaling(scaling: dict) -> None:
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported; choose one of "
            f"{', '.join(ROPE_SCALINGS)} (or no scaling)."
        )
    if not scaling.get("factor", 0) > 0:
        raise ValueError(f"rope_scaling={scaling}: needs a positive 'factor'.")
    missing = [k for k in LLAMA3_ROPE_FIELDS if kind == "llama3" and k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling={scaling}: llama3 scaling needs {', '.join(missing)}.")
