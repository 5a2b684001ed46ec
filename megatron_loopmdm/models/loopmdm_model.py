"""LoopMDM: a bidirectional masked-diffusion transformer with a looped block of layers."""

from typing import Optional

from megatron_loopmdm.models.config import LLAMA3_ROPE_FIELDS, LoopConfig, LoopMDMModelConfig
from megatron_loopmdm.models.init import EMBEDDING_KEY, OUTPUT_LAYER_KEY, seeded_init
from megatron_loopmdm.models.loop_block import LoopMDMBlock

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class LoopMDMModel(LanguageModule):
    """Embedding, prelude, loop block (run `num_loops` times), coda, final norm, output layer.

    Under pipeline parallelism each stage builds its own part: the embedding on the first stage
    (`pre_process`), the output layer on the last (`post_process`), and the layers megatron
    assigns to it. The parameter count does not depend on the loop count.

    Args:
        config: megatron-core transformer config (sizes, parallelism, dtypes).
        loop_config: the looped span and how loops are run.
        model_config: vocabulary, positions, [MASK] id, weight tying.
        transformer_layer_spec: the spec of one layer (see `models.specs`).
        pre_process: whether this stage holds the embedding.
        post_process: whether this stage holds the final norm and output layer.
        parallel_output: keep logits split over tensor-parallel ranks (for the loss).
        vp_stage: the virtual pipeline stage, under interleaved pipelining.
        init_seed: seed each module's initial weights from (init_seed, module), so that every
            parallel layout starts from the same weights (see `models.init`).
    """

    def __init__(
        self,
        config: TransformerConfig,
        loop_config: LoopConfig,
        model_config: LoopMDMModelConfig,
        transformer_layer_spec: ModuleSpec,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        vp_stage: Optional[int] = None,
        init_seed: Optional[int] = None,
    ):
        super().__init__(config=config)
        loop_config.validate_for(config.num_layers, config.pipeline_model_parallel_size)
        self.loop_config = loop_config
        self.model_config = model_config
        self.pre_process = pre_process
        self.post_process = post_process
        self.parallel_output = parallel_output
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.vocab_size = model_config.vocab_size
        self.max_sequence_length = model_config.max_sequence_length
        self.position_embedding_type = model_config.position_embedding_type
        self.share_embeddings_and_output_weights = model_config.share_embeddings_and_output_weights

        if pre_process:
            with seeded_init(init_seed, EMBEDDING_KEY):
                self.embedding = LanguageModelEmbedding(
                    config=config,
                    vocab_size=self.vocab_size,
                    max_sequence_length=self.max_sequence_length,
                    position_embedding_type=self.position_embedding_type,
                    tp_group=self.pg_collection.tp,
                )
        if self.position_embedding_type == "rope":
            self.rotary_pos_emb = _rotary_embedding(config, model_config)
        self.decoder = LoopMDMBlock(
            config,
            loop_config,
            transformer_layer_spec,
            pre_process,
            post_process,
            vp_stage,
            init_seed=init_seed,
        )
        if post_process:
            with seeded_init(init_seed, OUTPUT_LAYER_KEY):
                self.output_layer = self._build_output_layer()
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def _build_output_layer(self):
        config = self.config
        return tensor_parallel.ColumnParallelLinear(
            config.hidden_size,
            self.vocab_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=not self.parallel_output,
            skip_weight_param_allocation=self.pre_process
            and self.share_embeddings_and_output_weights,
            tp_group=self.pg_collection.tp,
        )

    def set_input_tensor(self, input_tensor) -> None:
        """Receives the previous pipeline stage's output (megatron's schedules call this)."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "LoopMDMModel takes one input tensor per stage"
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def _suppress_mask_logit(self, logits: Tensor) -> Tensor:
        """Sets the [MASK] logit to -inf (MDLM's SUBS parameterisation) on the rank holding it.

        logits: [s, b, v_local], the local vocabulary slice under tensor parallelism.
        """
        v_local = logits.size(-1)
        first = 0 if not self.parallel_output else self.pg_collection.tp.rank() * v_local
        local_id = self.model_config.mask_token_id - first
        if 0 <= local_id < v_local:
            logits = logits.index_fill(
                -1, torch.tensor([local_id], device=logits.device), float("-inf")
            )
        return logits

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        num_loops: Optional[int] = None,
        labels: Optional[Tensor] = None,
    ):
        """Runs this stage.

        Args:
            input_ids: [b, s] int64 token ids, masked positions holding the [MASK] id.
            position_ids: [b, s] int64, needed for learned absolute positions.
            attention_mask: optional [b, 1, s, s] or [b, 1, 1, s] bool, True = not attended.
            num_loops: loop count S >= 1; defaults to `max_loops`. Any S works at inference.
            labels: [b, s] int64 clean tokens. When given, returns the per-token cross entropy.

        Returns:
            On a non-last stage, the hidden states [s, b, h]. On the last stage, the per-token
            cross entropy [b, s] fp32 when `labels` is given, else the logits [b, s, v] (split
            over tensor-parallel ranks when `parallel_output`). In training mode with `labels`
            and `LoopConfig.intermediate_loss_weight` W > 0, the pair `(token_ce, loop_ce)`:
            `loop_ce` [b, s] fp32 is W times the mean over loops 1..S-1 of the per-token cross
            entropy of the output after that loop (zeros when S = 1), for the loss to score
            with the same masks as `token_ce` (`training.step`).
        """
        num_loops = self.loop_config.max_loops if num_loops is None else num_loops
        with_intermediate = (
            self.training and labels is not None and self.loop_config.intermediate_loss_weight > 0
        )
        hidden_states = None
        if self.pre_process:
            # [b, s] -> [s, b, h]
            hidden_states = self.embedding(input_ids=input_ids, position_ids=position_ids)
        rotary_pos_emb = None
        if self.position_embedding_type == "rope":
            rotary_pos_emb = self.rotary_pos_emb(input_ids.size(1))
        output = self.decoder(
            hidden_states,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            num_loops=num_loops,
            with_intermediate=with_intermediate,
        )
        if not self.post_process:
            return output
        hidden_states, intermediate = output if with_intermediate else (output, None)
        logits = self._logits(hidden_states)
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [s, b, v] -> [b, s, v]
        token_ce = self.compute_language_model_loss(labels, logits)
        if not with_intermediate:
            return token_ce
        return token_ce, self._intermediate_loop_ce(intermediate, labels, token_ce)

    def _logits(self, hidden_states: Tensor) -> Tensor:
        """The output layer on final-norm outputs: [s, b, h] -> [s, b, v_local] logits."""
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else None
        )
        logits, _ = self.output_layer(hidden_states, weight=weight)
        if self.model_config.shift_logits:
            # [s, b, v]: position i takes position i - 1's prediction of its next token.
            logits = torch.cat([logits[:1], logits[:-1]], dim=0)
        return self._suppress_mask_logit(logits)

    def _intermediate_loop_ce(self, states: list, labels: Tensor, token_ce: Tensor) -> Tensor:
        """W x the mean over the intermediate loops' head inputs ([s, b, h] each) of their
        per-token cross entropy: [b, s] fp32, zeros when there are none (S = 1)."""
        if not states:
            return torch.zeros_like(token_ce)
        ce = [self.compute_language_model_loss(labels, self._logits(h)) for h in states]
        return self.loop_config.intermediate_loss_weight * torch.stack(ce).mean(0)


def _rotary_embedding(config: TransformerConfig, model_config: LoopMDMModelConfig):
    """Megatron's RoPE with a pretrained model's frequency scaling (`rope_scaling`) applied."""
    scaling = model_config.rope_scaling or {}
    rotary = RotaryEmbedding(
        kv_channels=config.kv_channels,
        rotary_percent=1.0,
        rotary_base=model_config.rotary_base,
        use_cpu_initialization=config.use_cpu_initialization,
        seq_len_interpolation_factor=(
            scaling["factor"] if scaling.get("rope_type") == "linear" else None
        ),
    )
    if scaling.get("rope_type") == "llama3":
        fields = {k: scaling[k] for k in LLAMA3_ROPE_FIELDS}
        rotary.inv_freq = rotary._apply_scaling(rotary.inv_freq, factor=scaling["factor"], **fields)
    return rotary
