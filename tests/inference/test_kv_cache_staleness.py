"""What a block-refreshed key/value cache computes: the uncached pass with stale keys/values.

A cached pass over a window reads every other position's keys and values from the pass that
filled the cache. The claim tested here, which decides whether a cache's disagreement with the
plain sampler is a bug or the approximation itself: the window's logits equal those of an
ordinary full pass over the new tokens in which, at every layer execution (each loop of the
loop block separately), the key and value projections outside the window are replaced by
those of the filling pass. The replacement is done with forward hooks on `k_proj` / `v_proj`,
independently of `LoopKVCache` and of the window code (RoPE offsets, position ids, padding
mask, loop embedding, input injection, per-loop slots), so a mistake in any of those fails it.
"""

from collections import defaultdict

from megatron_loopmdm.hf import LoopMDMConfig, LoopMDMForMaskedDiffusion
from megatron_loopmdm.inference import pad_prompts

import pytest
import torch

MASK, EOS = 31, 30
PROMPTS = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]  # ragged: left padding
GEN, BLOCK, LOOPS = 8, 4, 3
VARIANTS = {
    "rope": {},
    "learned_positions": {"position_embedding_type": "learned_absolute"},
    "loop_embedding_concat_gqa": {"loop_embedding": True, "loop_input_injection": "concat",
                                  "num_key_value_heads": 2},
    "add_injection_qk_norm": {"loop_input_injection": "add", "qk_layernorm": True},
}  # fmt: skip


def random_model(**extra) -> LoopMDMForMaskedDiffusion:
    """4 layers, a 2-layer loop block; every weight random (the loop embedding and the concat
    injection start as zero / [I, 0] otherwise, which would hide their use)."""
    config = LoopMDMConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=4, num_attention_heads=4, mask_token_id=MASK,
                           loop_layers=(1, 3), max_loops=LOOPS, max_position_embeddings=64,
                           eos_token_id=EOS, **extra)  # fmt: skip
    torch.manual_seed(0)
    model = LoopMDMForMaskedDiffusion(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.3)
    return model


class StaleKeysValues:
    """Forward hooks that record every `k_proj` / `v_proj` output of one pass, then, in a later
    pass, put the recorded outputs back at the positions outside [start, end)."""

    def __init__(self, model):
        self.mode, self.start, self.end = None, 0, 0
        self.recorded, self.calls = defaultdict(list), defaultdict(int)
        self.handles = [
            getattr(layer.self_attn, name).register_forward_hook(self._hook((index, name)))
            for index, layer in enumerate(model.model.layers)
            for name in ("k_proj", "v_proj")
        ]

    def _hook(self, key):
        def hook(module, inputs, output):
            if self.mode == "record":
                self.recorded[key].append(output.clone())
            elif self.mode == "replay":  # the n-th call of a layer is its n-th loop
                old = self.recorded[key][self.calls[key]].clone()
                self.calls[key] += 1
                old[:, self.start : self.end] = output[:, self.start : self.end]
                return old
            return None

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _finite(logits):
    return logits.masked_fill(~torch.isfinite(logits), 0.0)  # the [MASK] column is -inf


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_window_is_the_full_pass_with_stale_keys_and_values(variant, cache):
    model = random_model(**VARIANTS[variant])
    x_old, attention_mask, _ = pad_prompts(PROMPTS, GEN, MASK, EOS)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    s, p = x_old.size(1), x_old.size(1) - GEN
    # The second block is current: the first block and the prompt are finished.
    start, end = p + BLOCK, p + 2 * BLOCK
    x_old[:, p:start] = torch.tensor([[1, 2, 3, EOS], [4, 5, EOS, EOS], [6, 7, 8, 9]])
    ws, we = start, s if cache == "prefix" else end
    full = dict(attention_mask=attention_mask, position_ids=position_ids, num_loops=LOOPS)
    hooks = StaleKeysValues(model)
    with torch.no_grad():
        kv_cache = model.make_kv_cache()
        hooks.mode = "record"
        model(x_old, **full, kv_cache=kv_cache)  # fills the cache, as at a block's first step
        hooks.mode = None
        # Later steps commit tokens in the block: every earlier position's state would change.
        x_new = x_old.clone()
        x_new[:, start : start + 2] = torch.tensor([[13, 14], [15, 16], [17, 18]])
        cached = model(x_new[:, ws:we], attention_mask=attention_mask,
                       position_ids=position_ids[:, ws:we], num_loops=LOOPS, kv_cache=kv_cache,
                       window_start=ws).logits  # fmt: skip
        hooks.mode, hooks.start, hooks.end = "replay", ws, we
        stale_reference = model(x_new, **full).logits[:, ws:we]
        hooks.mode = None
        uncached = model(x_new, **full).logits[:, ws:we]
        fresh_cache = model.make_kv_cache()
        model(x_new, **full, kv_cache=fresh_cache)
        fresh = model(x_new[:, ws:we], attention_mask=attention_mask,
                      position_ids=position_ids[:, ws:we], num_loops=LOOPS,
                      kv_cache=fresh_cache, window_start=ws).logits  # fmt: skip
    hooks.remove()
    torch.testing.assert_close(_finite(cached), _finite(stale_reference), atol=1e-5, rtol=1e-5)
    # A cache filled from the current tokens gives the uncached logits ...
    torch.testing.assert_close(_finite(fresh), _finite(uncached), atol=1e-5, rtol=1e-5)
    # ... and the stale one does not: the keys really are stale, so the first check has teeth.
    assert (_finite(cached) - _finite(uncached)).abs().max() > 1e-2
