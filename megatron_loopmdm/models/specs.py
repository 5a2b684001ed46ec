"""Layer specs for LoopMDM: a local spec (runs anywhere) and a Transformer Engine spec.

Both are megatron-core's GPT layer with bidirectional attention. The local spec swaps in two
modules of ours: a torch norm that supports sequence parallelism (megatron's wrapped torch norm
refuses it) and a core attention over `torch.nn.functional.scaled_dot_product_attention`, which
takes the flash / memory-efficient kernels on GPU and is faster than the unfused path on CPU.
"""

import dataclasses
import importlib.util
from typing import Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_submodules,
    get_gpt_layer_with_transformer_engine_submodules,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor


class TorchNorm:
    """`torch.nn.LayerNorm` or `torch.nn.RMSNorm` per `config.normalization`.

    Under sequence parallelism each tensor-parallel rank normalises a different slice of the
    sequence, so the norm's gradients differ across ranks. Tagging the parameters with
    `sequence_parallel=True` makes megatron's `finalize_model_grads` all-reduce them over the
    tensor-parallel group.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(
                f"normalization={config.normalization!r}: LoopMDM supports LayerNorm and RMSNorm."
            )
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class SDPAttention(MegatronModule):
    """Bidirectional core attention through `scaled_dot_product_attention`.

    Grouped-query attention is native (`enable_gqa`), so keys and values are not repeated.
    `attention_mask`, when given, is megatron's boolean convention: shape [b, 1, sq or 1, sk],
    True where attention is *not* allowed (padding).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism.")
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]."""
        if packed_seq_params is not None:
            raise ValueError("SDPAttention does not support packed sequences.")
        sq, b, np_, hn = query.shape
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask = None if attention_mask is None else ~attention_mask
        context = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=k.size(1) != np_,
        )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


def _bidirectional(submodules, **replacements):
    attention = submodules.self_attention
    attention = dataclasses.replace(
        attention,
        params={**attention.params, "attn_mask_type": AttnMaskType.no_mask},
        submodules=dataclasses.replace(attention.submodules, **replacements),
    )
    return attention


def loopmdm_layer_local_spec(normalization: str = "RMSNorm", qk_layernorm: bool = False):
    """The local (no Transformer Engine) spec of one bidirectional LoopMDM layer."""
    submodules = get_gpt_layer_local_submodules(
        normalization=normalization, qk_layernorm=qk_layernorm
    )
    self_attention = _bidirectional(submodules, core_attention=SDPAttention)
    if qk_layernorm:
        self_attention.submodules.q_layernorm = TorchNorm
        self_attention.submodules.k_layernorm = TorchNorm
    submodules = dataclasses.replace(
        submodules,
        input_layernorm=TorchNorm,
        self_attention=self_attention,
        pre_mlp_layernorm=TorchNorm,
    )
    return ModuleSpec(module=TransformerLayer, submodules=submodules)


def loopmdm_layer_te_spec(qk_layernorm: bool = False):
    """The Transformer Engine spec of one bidirectional LoopMDM layer (fused norms, flash)."""
    submodules = get_gpt_layer_with_transformer_engine_submodules(qk_layernorm=qk_layernorm)
    submodules = dataclasses.replace(submodules, self_attention=_bidirectional(submodules))
    return ModuleSpec(module=TransformerLayer, submodules=submodules)


def transformer_engine_available() -> bool:
    """Whether Transformer Engine can be imported."""
    return importlib.util.find_spec("transformer_engine") is not None


def loopmdm_layer_spec(
    normalization: str = "RMSNorm", use_te: Optional[bool] = None, qk_layernorm: bool = False
):
    """The TE spec when Transformer Engine is importable (and not refused), else the local one."""
    if use_te is None:
        use_te = transformer_engine_available() and torch.cuda.is_available()
    if use_te:
        if not transformer_engine_available():
            raise RuntimeError(
                "The Transformer Engine layer spec was asked for, but transformer_engine is not "
                "installed; drop --transformer-impl transformer_engine to use the local spec."
            )
        return loopmdm_layer_te_spec(qk_layernorm=qk_layernorm)
    return loopmdm_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
