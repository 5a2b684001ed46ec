"""Hugging Face model of a LoopMDM, in plain PyTorch: the same maths as the megatron model.

This file is copied into every converted model directory and loaded there with
`trust_remote_code=True`, so it imports only torch and transformers: no megatron, no
megatron_loopmdm. It reproduces `megatron_loopmdm.models.LoopMDMModel` at TP=1/PP=1:

    embed_tokens (+ embed_positions) -> layers[:start] -> loop block x S -> layers[end:]
    -> norm -> lm_head, with the [MASK] logit set to -inf (SUBS)

where loop i (0-based) first re-injects the prelude output (i > 0, `add` or `concat`), then adds
loop-embedding row min(i, max_loops - 1), then runs layers[start:end].
"""

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

try:  # a relative import inside a model directory, an absolute one inside the package
    from .cache_loopmdm import LoopKVCache, LoopWarmStart
    from .configuration_loopmdm import LoopMDMConfig
    from .generation_loopmdm import SamplerConfig, generate
    from .loop_policy_loopmdm import (
        LoopController,
        LoopPolicy,
        read_loop_schedule,
        write_loop_schedule,
    )
except ImportError:  # pragma: no cover
    from cache_loopmdm import LoopKVCache, LoopWarmStart
    from configuration_loopmdm import LoopMDMConfig
    from generation_loopmdm import SamplerConfig, generate
    from loop_policy_loopmdm import (
        LoopController,
        LoopPolicy,
        read_loop_schedule,
        write_loop_schedule,
    )


def _norm(config: LoopMDMConfig) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def rotary_cos_sin(config: LoopMDMConfig, seq_len: int, device, dtype) -> tuple[Tensor, Tensor]:
    """Megatron's non-interleaved RoPE tables: cos, sin of [s, head_dim] (fp32 maths)."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    )
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # [s, dim]: each frequency serves both halves
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [b, heads, s, hn] rotated by halves: x cos + [-x2, x1] sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LoopMDMAttention(nn.Module):
    """Bidirectional grouped-query attention; q/k/v are megatron's fused linear_qkv, split."""

    def __init__(self, config: LoopMDMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(h, q_width, bias=bias)
        self.k_proj = nn.Linear(h, kv_width, bias=bias)
        self.v_proj = nn.Linear(h, kv_width, bias=bias)
        self.o_proj = nn.Linear(q_width, h, bias=False)
        if getattr(config, "qk_layernorm", False):
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.layer_norm_eps)

    def forward(
        self, x: Tensor, rotary: Optional[tuple], attn_mask: Optional[Tensor], kv=None
    ) -> Tensor:
        """x [b, w, h] (w = s without a cache); attn_mask [b, 1, 1, s] bool, True = attended.

        `kv`: (LoopKVCache, slot, window start), or None.
        """
        b, s, _ = x.shape
        # [b, s, heads * hn] -> [b, heads, s, hn]
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv is not None:
            cache, slot, start = kv
            k, v = cache.update(slot, start, k, v)  # [b, kv_heads, s, hn], the whole sequence
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, enable_gqa=self.num_kv_heads != self.num_heads
        )
        # [b, heads, s, hn] -> [b, s, heads * hn]
        return self.o_proj(context.transpose(1, 2).reshape(b, s, -1))


class LoopMDMMLP(nn.Module):
    """down(act(gate(x)) * up(x)) when gated (SwiGLU), else down(act(up(x)))."""

    def __init__(self, config: LoopMDMConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        if config.gated_linear_unit:
            self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)
        self.act = F.silu if config.hidden_act == "silu" else F.gelu

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class LoopMDMLayer(nn.Module):
    """A pre-norm transformer layer."""

    def __init__(self, config: LoopMDMConfig):
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attn = LoopMDMAttention(config)
        self.post_attention_layernorm = _norm(config)
        self.mlp = LoopMDMMLP(config)

    def forward(
        self, x: Tensor, rotary: Optional[tuple], attn_mask: Optional[Tensor], kv=None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, attn_mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LoopMDMTransformer(nn.Module):
    """Embeddings, prelude, loop block, coda and final norm: [b, s] ids -> [b, s, h]."""

    def __init__(self, config: LoopMDMConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, h)
        self.layers = nn.ModuleList(LoopMDMLayer(config) for _ in range(config.num_hidden_layers))
        if config.loop_input_injection == "concat":
            self.input_injection = nn.Linear(2 * h, h, bias=False)
        if config.loop_embedding:
            self.loop_embedding = nn.Embedding(config.max_loops, h)
        self.norm = _norm(config)

    def _inject(self, h: Tensor, e: Tensor) -> Tensor:
        if self.config.loop_input_injection == "add":
            return h + e
        return self.input_injection(torch.cat([h, e], dim=-1))

    def _warm_start(self, x: Tensor, input_ids: Tensor, start: int, warm_start) -> Tensor:
        """The loop block's initial state [b, w, h]: the previous pass's final state, with the
        prelude output x injected as before any later loop, where the token is unchanged."""
        state, warm = warm_start.initial(input_ids, start)
        if state is None:
            return x
        state = state.to(x.dtype)
        if self.config.loop_input_injection != "none":
            state = self._inject(state, x)
        return torch.where(warm[..., None], state, x)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor],
        position_ids: Optional[Tensor],
        num_loops: int,
        all_hidden_states: Optional[list] = None,
        loop_threshold: Optional[float] = None,
        min_loops: int = 1,
        kv_cache: Optional[LoopKVCache] = None,
        window_start: int = 0,
        loop_controller: Optional[LoopController] = None,
        head: Optional[Callable[[Tensor], Tensor]] = None,
        loop_warm_start: Optional[LoopWarmStart] = None,
    ) -> tuple[Tensor, int]:
        """[b, w] ids -> ([b, w, h] final-norm output, loops run).

        Without `kv_cache`, w = s, the whole sequence. An empty `kv_cache` is filled by this
        pass (w = s); a filled one makes `input_ids` the positions [window_start,
        window_start + w) of its s, attending to all s (`attention_mask` stays [b, s]).

        With `loop_threshold`, looping stops early (after at least `min_loops`, at most
        `num_loops`) once every sample's relative change of the loop block's output,
        ||x_i - x_{i-1}|| / ||x_{i-1}|| over its attended positions (of the window), falls
        below the threshold. A `loop_controller` (`LoopPolicy.controller`) decides per sample or
        position instead; its `kl` / `argmax` rules probe the state with the coda, the final
        norm and `head` ([b, w, h] -> logits) after every loop. A `loop_warm_start` starts the
        loop block from its previous pass's final state where the input token is unchanged.
        """
        config = self.config
        w = input_ids.size(1)
        s = kv_cache.length if kv_cache is not None and kv_cache.length else w
        if kv_cache is not None and not kv_cache.length:
            if window_start:
                raise ValueError("fill an empty kv_cache with a pass over the whole sequence.")
            kv_cache.length = s
        positions = slice(window_start, window_start + w)
        x = self.embed_tokens(input_ids)
        if hasattr(self, "embed_positions"):
            if position_ids is None:
                position_ids = torch.arange(window_start, window_start + w, device=x.device)
            x = x + self.embed_positions(position_ids)
        rotary = None
        if config.position_embedding_type == "rope":
            cos, sin = rotary_cos_sin(config, s, x.device, x.dtype)
            rotary = cos[positions], sin[positions]
        attn_mask = window_mask = None
        if attention_mask is not None:
            attn_mask = attention_mask.bool()[:, None, None, :]  # [b, s] -> [b, 1, 1, s]
            window_mask = attention_mask[:, positions]

        def run(first, layers, x, loop=0, rows=None):
            mask = attn_mask if rows is None or attn_mask is None else attn_mask[rows]
            for index, layer in enumerate(layers, start=first):
                kv = None if kv_cache is None else (kv_cache, (index, loop), window_start)
                x = layer(x, rotary, mask, kv)
                if all_hidden_states is not None:
                    all_hidden_states.append(x)
            return x

        def probe(state, rows):  # the prediction of a loop state: [r, w, h] -> [r, w, vocab]
            return head(self.norm(run(end, self.layers[end:], state, rows=rows)))

        if all_hidden_states is not None:
            all_hidden_states.append(x)
        start, end = config.loop_layers
        x = run(0, self.layers[:start], x)
        prelude_output = x
        if loop_warm_start is not None:
            x = self._warm_start(x, input_ids, window_start, loop_warm_start)
        loops_run = 0
        if loop_controller is not None:
            # Finished rows leave the batch only where nothing else needs their keys.
            skip = kv_cache is None and all_hidden_states is None
            loop_controller.begin(input_ids, window_mask, skip_rows=skip)
        for i in range(num_loops):
            previous = x
            rows = None if loop_controller is None else loop_controller.rows()
            if rows is not None:  # [b, w, h] -> [r, w, h], the rows still looping
                x, injected = x[rows], prelude_output[rows]
            else:
                injected = prelude_output
            if i > 0 and config.loop_input_injection != "none":
                x = self._inject(x, injected)
            if config.loop_embedding:
                x = x + self.loop_embedding.weight[min(i, config.max_loops - 1)]
            x = run(start, self.layers[start:end], x, loop=i, rows=rows)
            if rows is not None:
                x = previous.index_copy(0, rows, x)
            loops_run = i + 1
            if loop_threshold is not None and i > 0 and loops_run >= min_loops:
                if _relative_change(x, previous, window_mask).max() < loop_threshold:
                    break
            if loop_controller is not None:
                x = loop_controller.after_loop(i, x, previous, probe)
                if loop_controller.done:
                    break
        if loop_warm_start is not None:
            loop_warm_start.record(input_ids, window_start, x)
        x = run(end, self.layers[end:], x)
        return self.norm(x), loops_run


def _relative_change(x: Tensor, previous: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """[b] ||x - previous|| / ||previous|| per sample over attended positions (fp32 maths)."""
    delta = (x.float() - previous.float()).pow(2).sum(-1)  # [b, s]
    norm = previous.float().pow(2).sum(-1)
    if attention_mask is not None:
        delta, norm = delta * attention_mask.float(), norm * attention_mask.float()
    return (delta.sum(-1) / norm.sum(-1).clamp_min(1e-30)).sqrt()


@dataclass
class LoopMDMOutput(MaskedLMOutput):
    """`MaskedLMOutput` plus `num_loops`, the loop count actually run (adaptive loops)."""

    num_loops: Optional[int] = None


class LoopMDMPreTrainedModel(PreTrainedModel):
    config_class = LoopMDMConfig
    base_model_prefix = "model"
    _no_split_modules = ["LoopMDMLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Fresh weights (training starts in megatron; this serves untrained HF models)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, LoopMDMTransformer):
            # As in megatron: the loop embedding starts at zero, `concat` as [I, 0].
            if hasattr(module, "loop_embedding"):
                nn.init.zeros_(module.loop_embedding.weight)
            if hasattr(module, "input_injection"):
                h = module.config.hidden_size
                module.input_injection.weight.zero_()
                module.input_injection.weight[:, :h].copy_(torch.eye(h))


class LoopMDMForMaskedDiffusion(LoopMDMPreTrainedModel):
    """A LoopMDM with its output layer: [b, s] token ids -> [b, s, vocab] logits.

    The [MASK] logit is -inf. `num_loops` (default `config.max_loops`) may be any S >= 1.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LoopMDMConfig):
        super().__init__(config)
        self.model = LoopMDMTransformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.loop_schedule: Optional[dict] = None
        """The calibrated loop schedule (`loop_schedule.json`), used by default in sampling."""
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        num_loops: Optional[int] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        loop_threshold: Optional[float] = None,
        min_loops: int = 1,
        kv_cache: Optional[LoopKVCache] = None,
        window_start: int = 0,
        loop_controller: Optional[LoopController] = None,
        loop_warm_start: Optional[LoopWarmStart] = None,
        **kwargs,
    ):
        """Logits of the clean tokens at every position.

        Args:
            input_ids: [b, s] int64, masked positions holding `config.mask_token_id`.
            attention_mask: optional [b, s], 1 (True) = a real token, 0 = padding (not attended).
            position_ids: optional [b, s] int64 for learned absolute positions (default 0..s-1).
            num_loops: loop count S >= 1; default `config.max_loops`.
            output_hidden_states: also return the embedding output and every executed layer's
                output ([b, s, h] each; the loop block's layers appear once per loop).
            return_dict: return a `LoopMDMOutput` (default) or a tuple.
            loop_threshold: adaptive loops: stop looping once the relative change of the loop
                block's output falls below this for every sample (`num_loops` is then the most).
            min_loops: with `loop_threshold`, loops run before stopping is considered.
            kv_cache: a `LoopKVCache` (`make_kv_cache()`): an empty one is filled by this pass
                over the whole sequence; a filled one makes `input_ids` the [b, w] window
                starting at `window_start` of the cached sequence (logits [b, w, vocab]).
            window_start: the window's first position, with a filled `kv_cache`.
            loop_controller: adaptive loops per sample or position by any stopping rule
                (`LoopPolicy(...).controller(mask_token_id)`); it records what it computed.
            loop_warm_start: a `LoopWarmStart` (`make_loop_warm_start()`): the loop block
                starts from the previous pass's final state at positions whose input token did
                not change (a sampler's next denoising step), and this pass's state is kept.

        Returns:
            `LoopMDMOutput` with `logits` [b, s, vocab] in the model's dtype, [MASK] = -inf,
            and `num_loops`, the loops actually run.
        """
        num_loops = self.config.max_loops if num_loops is None else int(num_loops)
        if num_loops < 1:
            raise ValueError(f"num_loops={num_loops}: run the loop block at least once.")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = self.config.return_dict
        if loop_threshold is not None and not 1 <= min_loops <= num_loops:
            raise ValueError(f"min_loops={min_loops} must lie in [1, num_loops={num_loops}].")
        shift = getattr(self.config, "shift_logits", False)
        if shift and kv_cache is not None and kv_cache.length:
            # A window's first logit would need the output of the position before the window.
            raise ValueError(
                "This model shifts its logits (shift_logits=True, adapted from an AR model): "
                "key/value caches are not supported for it; sample with cache=None."
            )
        hidden = [] if output_hidden_states else None
        x, loops_run = self.model(
            input_ids, attention_mask, position_ids, num_loops, hidden, loop_threshold, min_loops,
            kv_cache, window_start, loop_controller, self._head, loop_warm_start,
        )  # fmt: skip
        logits = self._head(x)
        hidden_states = tuple(hidden) if hidden is not None else None
        if not return_dict:
            return (logits,) if hidden_states is None else (logits, hidden_states)
        return LoopMDMOutput(logits=logits, hidden_states=hidden_states, num_loops=loops_run)

    def _head(self, x: Tensor) -> Tensor:
        """[b, s, h] final-norm output -> [b, s, vocab] logits, [MASK] = -inf."""
        logits = self.lm_head(x)
        if getattr(self.config, "shift_logits", False):
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # i takes i - 1's output
        mask_id = torch.tensor([self.config.mask_token_id], device=logits.device)
        return logits.index_fill(-1, mask_id, float("-inf"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus the directory's calibrated loop schedule."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        path = str(pretrained_model_name_or_path)
        model.loop_schedule = read_loop_schedule(path) if os.path.isdir(path) else None
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus `loop_schedule.json` when calibrated."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if getattr(self, "loop_schedule", None):
            write_loop_schedule(save_directory, self.loop_schedule)

    def make_kv_cache(self) -> LoopKVCache:
        """An empty key/value cache for `forward(..., kv_cache=)` (every layer and loop)."""
        return LoopKVCache()

    def make_loop_warm_start(self) -> LoopWarmStart:
        """An empty loop state for `forward(..., loop_warm_start=)` across a sampler's steps."""
        return LoopWarmStart()

    @torch.no_grad()
    def diffusion_generate(
        self,
        input_ids: Tensor,
        gen_length: int,
        steps: int,
        block_length: Optional[int] = None,
        num_loops: Optional[int] = None,
        temperature: float = 0.0,
        generator: Optional[torch.Generator] = None,
        threshold: Optional[float] = None,
        factor: Optional[float] = None,
        cache: Optional[str] = None,
        attention_mask: Optional[Tensor] = None,
        return_dict_in_generate: bool = False,
        loop_policy: Optional[LoopPolicy] = None,
        **sampler_options,
    ):
        """Masked-diffusion sampling with the package's sampler (`generation_loopmdm.py`).

        LLaDA-style by default: semi-autoregressive blocks, low-confidence remasking, an equal
        share of each block's tokens per step; the fast paths are parallel decoding
        (`threshold` or `factor`) and key/value caches (`cache="prefix"` or `"dual"`).

        Args:
            input_ids: [b, p] int64 prompts; left-padded when `attention_mask` is given.
            gen_length: tokens to generate.
            steps: denoising steps in all (an upper bound with threshold/factor); a multiple
                of the number of blocks.
            block_length: tokens per block (default: one block of gen_length); divides
                gen_length.
            num_loops: loop count S for every forward pass (default config.max_loops).
            temperature: 0 picks the argmax; > 0 samples with Gumbel noise (in float64).
            generator: the random generator of the sampling noise.
            threshold: parallel decoding: also commit every token with confidence >= this.
            factor: parallel decoding by Fast-dLLM's factor rule.
            cache: None, `"prefix"` or `"dual"`.
            attention_mask: optional [b, p], 0 = left padding of a shorter prompt.
            return_dict_in_generate: return the `GenerationResult` (costs, loops per step).
            loop_policy: a `LoopPolicy` (instead of `num_loops` and the loop options below);
                with neither, the calibrated `loop_schedule` when the model has one, else S_max.
            **sampler_options: further `SamplerConfig` fields (`remasking`, `cfg_scale`,
                `suppress_eos`, `cache_refresh`, `cache_refresh_every`, `loop_warm_start`, ...);
                adaptive loops: `loop_threshold`, `min_loops`, `max_loops`, `loop_stop`
                (state/kl/argmax), `loop_per` (batch/sample/position), `loop_patience`,
                `loop_budget`; `loop_schedule`.

        Returns:
            [b, p + gen_length] int64: the prompt followed by the generated tokens.
        """
        names = {"min_loops": "min_loops", "max_loops": "max_loops", "loop_stop": "stop",
                 "loop_per": "per", "loop_patience": "patience", "loop_budget": "budget",
                 "loop_schedule": "schedule", "loop_threshold": "threshold"}  # fmt: skip
        loops = {names[k]: sampler_options.pop(k) for k in names if k in sampler_options}
        if isinstance(loops.get("schedule"), str):  # "1,2,4" as on the command line
            loops["schedule"] = LoopPolicy.parse_schedule(loops["schedule"]).schedule
        if loop_policy is not None and (loops or num_loops is not None):
            raise ValueError("give loop_policy or num_loops / loop_* options, not both.")
        policy = loop_policy or LoopPolicy(num_loops=num_loops, **loops)
        if "eos_token_id" not in sampler_options and sampler_options.get("suppress_eos"):
            sampler_options["eos_token_id"] = self.config.eos_token_id
        config = SamplerConfig(
            gen_length=gen_length, steps=steps, block_length=block_length,
            temperature=temperature, threshold=threshold, factor=factor,
            cache=cache or "none", loops=policy, **sampler_options,
        )  # fmt: skip
        prompts = input_ids
        if attention_mask is not None:
            prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        pad = getattr(self.config, "pad_token_id", None)
        result = generate(self, prompts, config, pad_token_id=pad, generator=generator)
        return result if return_dict_in_generate else result.tokens
