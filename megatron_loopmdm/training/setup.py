"""Builds this rank's model chunks, wrapped in megatron DDP, and the megatron optimizer."""

from typing import Optional

from megatron_loopmdm.checkpointing.optimizer_fixes import apply_torch_adam_fixes
from megatron_loopmdm.models.builder import build_model
from megatron_loopmdm.models.config import LoopConfig, LoopMDMModelConfig

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.transformer_config import TransformerConfig


def build_model_chunks(
    config: TransformerConfig,
    loop_config: LoopConfig,
    model_config: LoopMDMModelConfig,
    init_seed: Optional[int] = None,
    device: str = "cpu",
    use_te: Optional[bool] = None,
) -> list:
    """This rank's model chunks: one per virtual pipeline stage (one without interleaving).

    `use_te` picks the layer spec: True Transformer Engine, False the local one even when TE is
    installed, None TE when installed on GPU.
    """
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        chunk = build_model(
            config,
            loop_config,
            model_config,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=vpp is None, vp_stage=vp_stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=vpp is None, vp_stage=vp_stage
            ),
            vp_stage=vp_stage,
            use_te=use_te,
            init_seed=init_seed,
        )
        chunks.append(_cast_parameters(chunk, config.params_dtype).to(device))
    return chunks


def _cast_parameters(chunk, dtype: torch.dtype):
    """Every floating parameter in the run's dtype, as Megatron-LM's `Float16Module` and
    DeepSpeed's bf16/fp16 engines make them: the local spec's norms create fp32 weights, which
    megatron's non-distributed fp16/bf16 optimizer cannot checkpoint ("Param id .. does not
    match any model sharded param"). Buffers (e.g. RoPE frequencies) keep their dtype."""
    for param in chunk.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return chunk


def wrap_with_ddp(
    config: TransformerConfig, chunks: list, ddp_config: DistributedDataParallelConfig
) -> list:
    """Megatron DDP around every chunk; sets the config hooks the schedules call.

    Overlapped grad reduce works with a loop count that changes every step: a looped layer's
    parameters receive one summed gradient per backward pass (the loop block's recompute is
    non-reentrant), so megatron's per-parameter grad-ready count stays one.
    """
    wrapped = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    if ddp_config.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in wrapped]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        grad_sync = [chunk.start_grad_sync for chunk in wrapped]
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    return wrapped


def build_optimizer(optimizer_config: OptimizerConfig, chunks: list):
    """megatron-core's optimizer (the distributed optimizer when the config asks for it)."""
    apply_torch_adam_fixes()
    return get_megatron_optimizer(optimizer_config, chunks)


def default_optimizer_config(lr: float = 1e-3, params_dtype=torch.float32, **overrides):
    """AdamW as in the paper-like recipe; fp32 main params whatever the model dtype."""
    fields = dict(
        optimizer="adam",
        lr=lr,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        clip_grad=1.0,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
    )
    fields.update(overrides)
    return OptimizerConfig(**fields)
