"""Mask-to-mask attention: the share of attention mass that masked queries put on masked keys.

SDPA returns no attention weights, so a forward pre-hook on each attention module captures its
(normed) input and the weights are recomputed from the module's own projections. A layer of
the loop block is called once per loop; the hooks see the calls in execution order, which the
model's layout (prelude, loop block x S, coda) turns into (layer, loop) pairs.
"""

import math
from typing import Dict, List

from megatron_loopmdm.diffusion.noise import mask_tokens

import torch
from torch import Tensor


def _attention_probs(attn, x: Tensor, rotary, attn_mask, kv=None) -> Tensor:
    """[b, heads, s, s] softmax weights of a `LoopMDMAttention` on its input x [b, s, h].

    The analysis runs uncached full passes, so `kv` (the module's cache argument) is None.
    """
    assert kv is None, "mask-to-mask attention is measured on uncached passes"
    from megatron_loopmdm.hf.modeling_loopmdm import apply_rotary

    b, s, _ = x.shape
    # [b, s, heads * hn] -> [b, heads, s, hn]
    q = attn.q_proj(x).view(b, s, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1)


def _call_layout(config, num_loops: int) -> List[tuple]:
    """(layer, part, loop) of each attention call, in execution order (loop is 1-based)."""
    start, end = config.loop_layers
    calls = [(i, "prelude", 1) for i in range(start)]
    calls += [(i, "loop", n + 1) for n in range(num_loops) for i in range(start, end)]
    return calls + [(i, "coda", 1) for i in range(end, config.num_hidden_layers)]


@torch.no_grad()
def mask_attention_share(
    model, tokens: Tensor, num_loops: int, t: float = 0.5, seed: int = 1234, eps: float = 1e-3
) -> List[Dict]:
    """Per attention call, the mean over heads and masked queries of the attention mass on
    masked keys, with each sequence masked at time t (mask keyed by seed and row index).

    Args:
        model: a `LoopMDMForMaskedDiffusion`.
        tokens: [b, s] int64 clean sequences.

    Returns:
        One dict per call: `num_loops`, `layer`, `part` (prelude/loop/coda), `loop` (1-based),
        `share` (in [0, 1]), and `mask_fraction` (the share of keys that are masked: the value
        a query attending uniformly would give).
    """
    index = torch.arange(tokens.size(0))
    t_grid = torch.full((tokens.size(0),), t, dtype=torch.float64)
    noisy, mask, _ = mask_tokens(tokens, index, seed, model.config.mask_token_id, eps, t_grid)
    shares = []

    def hook(module, args):
        probs = _attention_probs(module, *args)  # [b, heads, s, s]
        to_masked = (probs * mask[:, None, None, :].float()).sum(-1)  # [b, heads, s]
        weight = mask[:, None, :].float().expand_as(to_masked)
        shares.append(float((to_masked * weight).sum() / weight.sum().clamp_min(1)))

    handles = [layer.self_attn.register_forward_pre_hook(hook) for layer in model.model.layers]
    try:
        model(noisy, num_loops=num_loops)
    finally:
        for handle in handles:
            handle.remove()
    layout = _call_layout(model.config, num_loops)
    assert len(layout) == len(shares), "attention calls do not match the model's layout"
    fraction = float(mask.float().mean())
    return [
        {"num_loops": num_loops, "layer": layer, "part": part, "loop": loop, "share": share,
         "mask_fraction": fraction}
        for (layer, part, loop), share in zip(layout, shares)
    ]  # fmt: skip
