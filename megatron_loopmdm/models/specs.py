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


SEGMENTS_ATTRIBUTE = "loopmdm_segments"


def attach_document_segments(attention_mask: Tensor, document_ids: Tensor, valid: Tensor) -> Tensor:
    """Attaches to a per-document mask the segments it allows, so attention can skip it on CPU.

    A dense boolean mask sends CPU `scaled_dot_product_attention` to a slow path, and most of
    it is masked anyway. Segments are the runs of one document id among `valid` positions;
    those of equal length are attended as one batch without a mask (`SDPAttention`). Computed
    once per micro-batch, read by every layer and loop. Only for contiguous documents, as
    `megatron_loopmdm.data` produces them.

    Args:
        attention_mask: bool [b, 1, s, s], True = not attended; returned with the attribute.
        document_ids: int64 [b, s].
        valid: bool [b, s], positions that take part (padding attends nothing).

    Returns:
        `attention_mask`, carrying a list of int64 [n_L, L] flat-position index tensors.
    """
    b, s = document_ids.shape
    ids = torch.where(valid, document_ids, torch.full_like(document_ids, -1))
    starts = torch.ones(b, s, dtype=torch.bool, device=ids.device)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first = starts.reshape(-1).nonzero().squeeze(1)  # flat start positions
    lengths = torch.diff(first, append=torch.tensor([b * s], device=first.device))
    keep = ids.reshape(-1)[first] >= 0
    first, lengths = first[keep], lengths[keep]
    segments = []
    for length in torch.unique(lengths).tolist():
        starts_l = first[lengths == length]
        segments.append(starts_l[:, None] + torch.arange(length, device=first.device))
    setattr(attention_mask, SEGMENTS_ATTRIBUTE, segments)
    return attention_mask


def _segmented_attention(q, k, v, segments, scale, dropout_p) -> Tensor:
    """Attention within each segment, without a mask; positions in no segment get zeros.

    q [s, b, np, hn], k/v [s, b, ng, hn] -> [s, b, np * hn].
    """
    s, b, np_, hn = q.shape
    gqa = k.size(2) != np_
    if len(segments) == 1 and segments[0].numel() == b * s:
        # Equal documents tiling every row: a reshape, no gather.
        n, length = segments[0].shape
        q, k, v = (x.transpose(0, 1).reshape(n, length, -1, hn).transpose(1, 2) for x in (q, k, v))
        context = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
        )
        return context.transpose(1, 2).reshape(b, s, np_ * hn).transpose(0, 1).contiguous()
    # [s, b, heads, hn] -> [b * s, heads, hn]
    flat = [x.transpose(0, 1).reshape(b * s, -1, hn) for x in (q, k, v)]
    out = q.new_zeros(b * s, np_, hn)
    for index in segments:
        n, length = index.shape
        # [n * L, heads, hn] -> [n, heads, L, hn]
        qs, ks, vs = (x[index.reshape(-1)].view(n, length, -1, hn).transpose(1, 2) for x in flat)
        context = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
        )
        out = out.index_copy(0, index.reshape(-1), context.transpose(1, 2).reshape(-1, np_, hn))
    return out.view(b, s, np_ * hn).transpose(0, 1).contiguous()


class SDPAttention(MegatronModule):
    """Bidirectional core attention through `scaled_dot_product_attention`.

    Grouped-query attention is native (`enable_gqa`), so keys and values are not repeated.
    `attention_mask`, when given, is megatron's boolean convention: shape [b, 1, sq or 1, sk],
    True where attention is *not* allowed (padding). On CPU, a per-document mask that carries
    its segments (`attach_document_segments`) is attended segment by segment instead; on GPU
    the fused kernels take the dense mask as before.
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
        dropout_p = self.dropout_p if self.training else 0.0
        segments = getattr(attention_mask, SEGMENTS_ATTRIBUTE, None)
        if segments is not None and query.device.type == "cpu":
            return _segmented_attention(query, key, value, segments, self.softmax_scale, dropout_p)
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask = None if attention_mask is None else ~attention_mask
        context = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout_p,
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
