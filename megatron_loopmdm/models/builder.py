"""Builds the megatron `TransformerConfig` and the LoopMDM model of a run.

The entry points turn command-line arguments into `ModelSize`, `LoopConfig`,
`LoopMDMModelConfig` and `ParallelConfig` once; everything below takes those objects.
"""

import dataclasses
from typing import Optional

from megatron_loopmdm.distributed.parallel import ParallelConfig
from megatron_loopmdm.models.config import LoopConfig, LoopMDMModelConfig
from megatron_loopmdm.models.loopmdm_model import LoopMDMModel
from megatron_loopmdm.models.pipeline_layout import validate_pipeline_layout
from megatron_loopmdm.models.sizes import ModelSize
from megatron_loopmdm.models.specs import loopmdm_layer_spec

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def transformer_config(
    size: ModelSize,
    parallel: ParallelConfig,
    params_dtype: torch.dtype = torch.float32,
    **overrides,
) -> TransformerConfig:
    """A megatron `TransformerConfig` for a size and a layout; `overrides` set any field."""
    fields = dict(
        num_layers=size.num_layers,
        hidden_size=size.hidden_size,
        num_attention_heads=size.num_attention_heads,
        num_query_groups=size.num_query_groups,
        ffn_hidden_size=size.ffn_hidden_size,
        normalization=size.normalization,
        gated_linear_unit=size.swiglu,
        activation_func=F.silu if size.swiglu else F.gelu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=size.layernorm_epsilon,
        kv_channels=size.kv_channels,
        qk_layernorm=size.qk_layernorm,
        add_qkv_bias=size.add_qkv_bias,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
        pipeline_model_parallel_layout=parallel.pipeline_model_parallel_layout,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        # CPU initialisation draws each full weight once and splits it, so a model's initial
        # weights do not depend on the tensor-parallel size.
        use_cpu_initialization=True,
        perform_initialization=True,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        batch_p2p_comm=_batch_p2p_comm(parallel),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def _batch_p2p_comm(parallel: ParallelConfig) -> bool:
    """The layout's p2p mode; by default batched, except over gloo, which mismatches the
    messages of batched isend/irecv under the interleaved schedule (micro-batches arrive
    swapped), where one-by-one p2p is exact."""
    if parallel.batch_p2p_comm is not None:
        return parallel.batch_p2p_comm
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not (initialized and torch.distributed.get_backend() == "gloo")


def build_model(
    config: TransformerConfig,
    loop_config: LoopConfig,
    model_config: LoopMDMModelConfig,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    use_te: Optional[bool] = None,
    init_seed: Optional[int] = None,
) -> LoopMDMModel:
    """The LoopMDM stage for this rank, after checking the pipeline layout keeps the loop whole."""
    validate_pipeline_layout(config, loop_config)
    spec = loopmdm_layer_spec(config.normalization, use_te=use_te, qk_layernorm=config.qk_layernorm)
    return LoopMDMModel(
        config,
        loop_config,
        model_config,
        spec,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        init_seed=init_seed,
    )


def loop_config_for(size: ModelSize, **overrides) -> LoopConfig:
    """The size's default loop span and S_max, with `overrides` applied."""
    fields = dict(loop_layers=size.loop_layers, max_loops=size.max_loops)
    fields.update(overrides)
    return LoopConfig(**fields)


def replace_size(size: ModelSize, **changes) -> ModelSize:
    """A copy of `size` with some fields changed (e.g. from command-line overrides)."""
    return dataclasses.replace(size, **changes)
