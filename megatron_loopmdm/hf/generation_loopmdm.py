"""The one LoopMDM sampler, in plain PyTorch: library, tools, evaluation and the export share it.

This file is copied into every converted model directory next to `modeling_loopmdm.py` (whose
`diffusion_generate` calls it), so it imports only torch: no megatron, no megatron_loopmdm.
`megatron_loopmdm.inference` re-exports it and adds model FLOPs.

The answer starts as `gen_length` [MASK] tokens after the (left-padded) prompt. It is filled
block by block, left to right; each block gets `steps / num_blocks` steps. Remasking samplers
commit a number of the block's masked tokens per step: an equal share (the remainder first) of
the most confident predictions (`low_confidence`) or random ones (`random`). `ancestral` steps
the block's time from t to s = t - 1/steps_per_block and unmasks each masked token with
probability (t - s) / t. With parallel decoding (`threshold` or `factor`, low-confidence only)
a step also commits every further token that passes the rule, so a block may finish early and
`steps` becomes an upper bound. With a key/value cache (`prefix` or `dual`) only the current
block (and, for `prefix`, the masked suffix) runs through the model at most steps (a full
pass refills the cache when a block starts and, with `cache_refresh_every`, every k steps).
Committed tokens never change again; the prompt never changes. Sampling noise is float64 drawn
on the CPU from the given generator, at the full sequence shape, so a seed gives the same tokens
on any device and with or without a cache. A loop warm start (`loop_warm_start`) starts each
pass's loop block from the previous pass's final loop state where the input token did not
change.
"""

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

try:  # a relative import inside a model directory, an absolute one inside the package
    from .loop_policy_loopmdm import LoopPolicy
except ImportError:  # pragma: no cover
    from loop_policy_loopmdm import LoopPolicy

REMASKINGS = ("low_confidence", "random", "ancestral")
CACHES = ("none", "prefix", "dual")
CACHE_REFRESHES = ("block", "step")


@dataclass
class SamplerConfig:
    """What to generate and how."""

    gen_length: int = 128
    """Tokens to generate after each prompt."""
    steps: int = 128
    """Denoising steps in all (an upper bound with `threshold`/`factor`)."""
    block_length: Optional[int] = None
    """Tokens per semi-autoregressive block; divides gen_length (default: one block)."""
    remasking: str = "low_confidence"
    """`low_confidence`, `random` or `ancestral`."""
    temperature: float = 0.0
    """0: argmax; > 0: sample softmax(logits / temperature) by Gumbel-max in float64."""
    cfg_scale: float = 0.0
    """Classifier-free guidance weight w: logits = u + (w + 1)(c - u), u with the prompt masked."""
    suppress_eos: bool = False
    """Never predict `eos_token_id` (forces answers of the full length)."""
    eos_token_id: Optional[int] = None
    """The EOS id, for `suppress_eos`."""
    loops: LoopPolicy = field(default_factory=LoopPolicy)
    """The loop count of each step."""
    threshold: Optional[float] = None
    """Parallel decoding (Fast-dLLM): also commit every masked token of the block whose
    confidence is >= this, in (0, 1]."""
    factor: Optional[float] = None
    """Parallel decoding, Fast-dLLM's factor rule: commit the r-th most confident masked token
    (r = 1, 2, ...) while its confidence is >= 1 - factor / (r + 1); factor > 0."""
    cache: str = "none"
    """Key/value cache of every layer and loop: `none`, `prefix` (prompt and finished blocks)
    or `dual` (also the suffix after the current block)."""
    cache_refresh: str = "block"
    """`block`: recompute the cache by a full pass when a block starts (that pass's logits serve
    the step); `step`: a full pass before every step, then the cached pass (a check of the
    cache: it gives the uncached tokens, at two passes per step)."""
    cache_refresh_every: Optional[int] = None
    """With `block` refresh: also refresh at every k-th step of a block (steps k, 2k, ... after
    its first; a full pass whose logits serve the step), so cached keys are at most k - 1 steps
    stale. None: only when a block starts."""
    loop_warm_start: bool = False
    """Start each pass's loop block from the previous pass's final loop state at positions
    whose input token did not change (the others start as usual): adaptive loops then stop
    earlier. Off by default: it changes the computation, so tokens may differ."""

    def __post_init__(self) -> None:
        self.block_length = self.block_length or self.gen_length
        if self.gen_length < 1 or self.steps < 1:
            raise ValueError(
                f"gen_length={self.gen_length}, steps={self.steps}: both must be >= 1."
            )
        if self.gen_length % self.block_length:
            raise ValueError(
                f"--block-length {self.block_length} must divide --gen-length {self.gen_length}."
            )
        if self.steps % self.num_blocks:
            raise ValueError(
                f"--steps {self.steps} must be a multiple of the number of blocks "
                f"({self.num_blocks} = gen_length / block_length)."
            )
        if self.remasking not in REMASKINGS:
            raise ValueError(
                f"remasking={self.remasking!r}: choose one of {', '.join(REMASKINGS)}."
            )
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0.")
        if self.suppress_eos and self.eos_token_id is None:
            raise ValueError("suppress_eos needs eos_token_id (the tokenizer's EOS).")
        self._check_fast_paths()

    def _check_fast_paths(self) -> None:
        if self.threshold is not None and self.factor is not None:
            raise ValueError("give --threshold or --factor for parallel decoding, not both.")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"--threshold {self.threshold} must lie in (0, 1].")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"--factor {self.factor} must be > 0.")
        if self.parallel and self.remasking != "low_confidence":
            raise ValueError(
                f"--threshold/--factor rank by confidence: use --remasking low_confidence "
                f"(not {self.remasking})."
            )
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r}: choose one of {', '.join(CACHES)}.")
        if not isinstance(self.loop_warm_start, bool):
            raise ValueError(f"loop_warm_start={self.loop_warm_start!r}: give True or False.")
        if self.cache_refresh not in CACHE_REFRESHES:
            raise ValueError(
                f"cache_refresh={self.cache_refresh!r}: choose one of {', '.join(CACHE_REFRESHES)}."
            )
        if self.cache_refresh_every is not None:
            k = self.cache_refresh_every
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"cache_refresh_every={k!r} must be an integer >= 1.")
            if self.cache == "none" or self.cache_refresh != "block":
                raise ValueError(
                    "--cache-refresh-every refreshes a block-refreshed cache: give --cache "
                    "prefix|dual with --cache-refresh block, or drop it."
                )
        if self.loops.budget is not None:
            if self.cfg_scale > 0 or self.cache_refresh == "step":
                raise ValueError(
                    "--loop-budget counts one pass per step: drop --cfg-scale and "
                    "--cache-refresh step, or the budget."
                )
            if self.loops.budget * self.gen_length < self.steps:
                raise ValueError(
                    f"--loop-budget {self.loops.budget} per token gives fewer loop evaluations "
                    f"than steps ({self.steps} for {self.gen_length} tokens): raise it to at "
                    f"least {self.steps / self.gen_length:g}."
                )

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def parallel(self) -> bool:
        return self.threshold is not None or self.factor is not None


@dataclass
class GenerationResult:
    """Generated tokens and what producing them cost."""

    tokens: Tensor
    """[b, p + gen_length] int64: left-padded prompts, then the answers."""
    prompt_lengths: List[int]
    """Each prompt's length (its padding is tokens[:, :p - length])."""
    gen_length: int
    loops_per_step: List[int]
    """Loops run at each denoising step run (the conditional pass, when guided)."""
    committed_per_step: Tensor
    """[b, steps] int64, tokens committed at each step (0 for steps a finished block skipped)."""
    loop_evaluations: int
    """Loop-block runs summed over every forward pass (a pass counts its deepest row)."""
    model_flops: Optional[float]
    """Forward model FLOPs of all passes (None without a FLOPs formula for the model)."""
    seconds: float
    forward_passes: int = 0
    """Model calls (full and cached)."""
    token_evaluations: int = 0
    """Positions run through the model, summed over passes and rows (cached passes run few)."""
    cache_bytes: int = 0
    """The largest key/value cache held (all layers, loops and rows; both caches with CFG)."""
    cache_bytes_per_token_per_layer_per_loop: int = 0
    """Keys plus values of one position in one layer execution (2 x kv heads x head dim x
    bytes per element); 0 without a cache."""
    loops_per_row: Optional[Tensor] = None
    """[b] int64: loop-block runs computed for each row, summed over passes (a row frozen
    early by a per-sample rule is not computed further without a cache)."""
    active_position_loops: int = 0
    """Position-loops whose state was updated, over all passes and rows (frozen positions are
    still computed: the difference to row loops x width is what per-position freezing would
    save with a sparse kernel)."""
    probe_evaluations: int = 0
    """Rows run through coda + output layer after a loop to test `kl` / `argmax` (in FLOPs)."""
    loop_policy: str = ""
    """The policy applied (a calibrated schedule says so)."""

    @property
    def generated(self) -> Tensor:
        """[b, gen_length] int64, the answers."""
        return self.tokens[:, -self.gen_length :]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens.size(0) * self.gen_length / max(self.seconds, 1e-9)

    @property
    def steps_run(self) -> int:
        return len(self.loops_per_step)

    @property
    def loop_evaluations_per_sample(self) -> float:
        """Mean over rows of the loop-block runs computed for the row."""
        if self.loops_per_row is None:
            return float(self.loop_evaluations)
        return float(self.loops_per_row.double().mean())


def tokens_per_step(num_masked: Tensor, steps: int) -> Tensor:
    """[b] masked counts -> [b, steps] tokens to commit per step, the remainder spread first."""
    base = num_masked[:, None] // steps
    extra = torch.arange(steps, device=num_masked.device)[None] < (num_masked % steps)[:, None]
    return base + extra.long()


def pad_prompts(
    prompts: Union[Tensor, Sequence[Sequence[int]]], gen_length: int, mask_id: int, pad_id: int
) -> Tuple[Tensor, Optional[Tensor], List[int]]:
    """Left-pads prompts of different lengths and appends `gen_length` masks.

    Left padding lines the answers up in one block grid; padding is hidden from attention
    (and, with RoPE, relative positions between real tokens are unchanged).

    Returns:
        x [b, p + gen_length] int64, attention_mask [b, p + gen_length] int64 (None when no
        prompt is padded), the prompt lengths.
    """
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist()
    lengths = [len(p) for p in prompts]
    p = max(lengths)
    x = torch.full((len(prompts), p + gen_length), mask_id, dtype=torch.long)
    attention_mask = torch.ones_like(x)
    for row, prompt in enumerate(prompts):
        x[row, : p - len(prompt)] = pad_id
        attention_mask[row, : p - len(prompt)] = 0
        x[row, p - len(prompt) : p] = torch.tensor(list(prompt), dtype=torch.long)
    return x, (None if min(lengths) == p else attention_mask), lengths


class _Pass:
    """One stream of forward passes (conditional, or unconditional for CFG) with its cache
    and loop warm start."""

    def __init__(self, model, attention_mask: Optional[Tensor], policy: LoopPolicy, cache,
                 mask_token_id: int, warm_start=None):  # fmt: skip
        self.model, self.attention_mask = model, attention_mask
        self.policy, self.cache, self.mask_token_id = policy, cache, mask_token_id
        self.warm_start = warm_start
        self.row_max_loops: Optional[Tensor] = None
        """[b] per-row loop caps of the next passes (the compute budget), or None."""
        self.last: dict = {}
        """What the last pass computed: `row_loops` [b], `active_positions`, `probes`."""
        self.position_ids = None
        if attention_mask is not None:
            # Learned positions count real tokens only; RoPE ignores position_ids.
            self.position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)

    def __call__(self, x: Tensor, num_loops: int, adaptive: bool, window=None, fill=False):
        """-> (logits [b, w, vocab] float64 of window [ws, we) (all of x without), loops run)."""
        kwargs = {"num_loops": num_loops}
        controller = None
        # The batch-wide state rule stays the model's own `loop_threshold` (unchanged tokens).
        if adaptive and not (self.policy.legacy and self.row_max_loops is None):
            controller = self.policy.controller(self.mask_token_id, self.row_max_loops)
        if controller is not None:
            kwargs["loop_controller"] = controller
        elif adaptive:
            kwargs.update(loop_threshold=self.policy.threshold,
                          min_loops=min(self.policy.min_loops, num_loops))  # fmt: skip
        ws, we = window or (0, x.size(1))
        if self.attention_mask is not None:
            kwargs["attention_mask"] = self.attention_mask  # keys: always the whole sequence
            kwargs["position_ids"] = self.position_ids[:, ws:we]
        if self.cache is not None:
            if fill:
                self.cache.reset()
            kwargs.update(kv_cache=self.cache, window_start=ws)
        if self.warm_start is not None:
            kwargs["loop_warm_start"] = self.warm_start
        out = self.model(x[:, ws:we], **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
        used = int(getattr(out, "num_loops", None) or num_loops)
        if self.cache is not None and fill:
            self.cache.num_loops = used
        b, w = x.size(0), we - ws
        if controller is not None:
            self.last = {"row_loops": controller.row_loops.cpu(), "probes": controller.probe_rows,
                         "active_positions": controller.active_position_loops}  # fmt: skip
        else:
            self.last = {"row_loops": torch.full((b,), used, dtype=torch.long), "probes": 0,
                         "active_positions": b * w * used}  # fmt: skip
        return logits.double(), used


def _gumbel_argmax(logits: Tensor, temperature: float, generator, ws: int, full_len: int):
    """Argmax of logits [b, w, V] (+ Gumbel noise drawn for all `full_len` positions)."""
    if temperature == 0:
        return logits.argmax(-1)
    b, w, vocab = logits.shape
    u = torch.rand((b, full_len, vocab), dtype=torch.float64, generator=generator)
    u = u[:, ws : ws + w].to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
    return (logits / temperature + gumbel).argmax(-1)


class _Costs:
    """Running totals of what the passes cost."""

    def __init__(self, flops_per_token: Optional[Callable[..., Optional[float]]], rows: int):
        self.flops_per_token = flops_per_token
        self.loop_evaluations = self.passes = self.tokens = self.cache_bytes = 0
        self.active_positions = self.probes = 0
        self.row_loops = torch.zeros(rows, dtype=torch.long)
        self.flops: Optional[float] = 0.0 if flops_per_token is not None else None

    def add(self, rows: int, width: int, full_len: int, loops: int, cache, last=None) -> None:
        """A pass over `width` positions of `rows` rows attending to `full_len` keys.

        `last`: the stream's record of the pass (loops per row, probes); FLOPs count each row's
        own loops and the probes.
        """
        self.loop_evaluations += loops
        self.passes += 1
        self.tokens += rows * width
        row_loops = torch.full((rows,), loops) if last is None else last["row_loops"]
        probes = 0 if last is None else last["probes"]
        self.row_loops += row_loops
        self.active_positions += rows * width * loops if last is None else last["active_positions"]
        self.probes += probes
        if self.flops is not None:
            # FLOPs are linear in S: the mean loops per row give the sum over rows.
            same = bool((row_loops == row_loops[0]).all())
            mean = int(row_loops[0]) if same else float(row_loops.double().mean())
            per_token = self.flops_per_token(full_len, mean)
            if per_token is not None and probes:
                probe = self.flops_per_token(full_len, 1, 1)
                per_token += (probe - self.flops_per_token(full_len, 1)) * probes / rows
            self.flops = None if per_token is None else self.flops + per_token * rows * width
        if cache is not None:
            self.cache_bytes = max(self.cache_bytes, cache.nbytes())


def _stream_logits(stream: _Pass, x: Tensor, config: SamplerConfig, num_loops: int,
                   refresh: bool, start: int, end: int, costs: _Costs):  # fmt: skip
    """-> (logits [b, w, vocab] of the window, loops run, window (ws, we)) of one step.

    `refresh`: the block's first step, or a step `cache_refresh_every` refreshes at.
    """
    b, s = x.shape
    adaptive = config.loops.adaptive
    cache = stream.cache
    if cache is None:
        logits, used = stream(x, num_loops, adaptive)
        costs.add(b, s, s, used, None, stream.last)
        return logits, used, (0, s)
    window = (start, s if config.cache == "prefix" else end)
    width = window[1] - window[0]
    # A cache holds one loop count's keys and values: a new fixed/scheduled count refreshes it.
    stale = refresh or config.cache_refresh == "step"
    if stale or (not adaptive and cache.num_loops != num_loops):
        logits, used = stream(x, num_loops, adaptive, fill=True)
        costs.add(b, s, s, used, cache, stream.last)
        if config.cache_refresh == "block":
            return logits, used, (0, s)
        logits, _ = stream(x, used, False, window=window)
        costs.add(b, width, s, used, cache, stream.last)
        return logits, used, window
    # Adaptive loops stop at most at the cache's depth (deeper loops have no cached keys).
    logits, used = stream(x, cache.num_loops if adaptive else num_loops, adaptive, window=window)
    costs.add(b, width, s, used, cache, stream.last)
    return logits, used, window


def _new_cache(model, config: SamplerConfig):
    if config.cache == "none":
        return None
    make = getattr(model, "make_kv_cache", None)
    if make is None:
        raise ValueError(
            f"cache={config.cache!r} needs a model with key/value caching "
            "(LoopMDMForMaskedDiffusion); use cache='none' for this model."
        )
    return make()


def _new_warm_start(model, config: SamplerConfig):
    if not config.loop_warm_start:
        return None
    make = getattr(model, "make_loop_warm_start", None)
    if make is None:
        raise ValueError(
            "loop_warm_start needs a model that takes a loop state "
            "(LoopMDMForMaskedDiffusion); drop --loop-warm-start for this model."
        )
    return make()


@torch.no_grad()
def generate(
    model,
    prompts: Union[Tensor, Sequence[Sequence[int]]],
    config: SamplerConfig,
    mask_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    flops_per_token: Optional[Callable[[int, int], Optional[float]]] = None,
) -> GenerationResult:
    """Samples answers to a batch of prompts (lengths may differ).

    Args:
        model: called as `model(ids [b, w], num_loops=S[, attention_mask=, position_ids=]
            [, loop_threshold=, min_loops=][, kv_cache=, window_start=][, loop_warm_start=])`,
            returning logits [b, w, vocab] (or an object with `.logits` and optionally
            `.num_loops`); a `LoopMDMForMaskedDiffusion` fits (caches need its
            `make_kv_cache`, the warm start its `make_loop_warm_start`).
        prompts: token ids, one list per prompt, or a [b, p] tensor.
        config: the sampler settings.
        mask_token_id: the [MASK] id (default `model.config.mask_token_id`).
        pad_token_id: the left-padding id (default: EOS, else 0); padding is never attended.
        generator: a CPU generator for the float64 noise (seed it for reproducible text).
        flops_per_token: `(keys, loops[, probes]) -> forward FLOPs per processed position`
            (or None; `loops` may be a mean over rows, `probes` the stopping rule's read-outs
            per row); without it `model_flops` is None.

    Returns:
        `GenerationResult`.
    """
    model_config = getattr(model, "config", None)
    if mask_token_id is None:
        mask_token_id = model_config.mask_token_id
    if pad_token_id is None:
        pad_token_id = config.eos_token_id if config.eos_token_id is not None else 0
    default_loops = getattr(model_config, "max_loops", 1)
    config, policy_name = _resolve_policy(model, config, default_loops)
    device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    x, attention_mask, prompt_lengths = pad_prompts(
        prompts, config.gen_length, mask_token_id, pad_token_id
    )
    x = x.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    b, s = x.shape
    p = s - config.gen_length
    streams = []
    for _ in range(2 if config.cfg_scale > 0 else 1):
        cache, warm_start = _new_cache(model, config), _new_warm_start(model, config)
        streams.append(_Pass(model, attention_mask, config.loops, cache, mask_token_id, warm_start))
    committed = torch.zeros(b, config.steps, dtype=torch.long)
    loops_per_step, costs = [], _Costs(flops_per_token, b)
    start_time = time.perf_counter()
    spb = config.steps_per_block
    for block in range(config.num_blocks):
        start, end = p + block * config.block_length, p + (block + 1) * config.block_length
        schedule = tokens_per_step((x[:, start:end] == mask_token_id).sum(-1).cpu(), spb)
        for j in range(spb):
            remaining = (x[:, start:end] == mask_token_id).sum(-1).cpu()
            if not remaining.any():  # parallel decoding finished the block early
                break
            step = block * spb + j
            num_loops = config.loops.loops_at(step, config.steps, default_loops)
            if config.loops.budget is not None:
                streams[0].row_max_loops = _budget_caps(config, costs.row_loops, step, num_loops)
            every = config.cache_refresh_every
            refresh = j == 0 or (every is not None and j % every == 0)
            logits, used, (ws, we) = _stream_logits(
                streams[0], x, config, num_loops, refresh, start, end, costs
            )
            loops_per_step.append(used)
            if config.cfg_scale > 0:
                unconditional = x.clone()
                unconditional[:, :p] = mask_token_id
                logits_u, _, _ = _stream_logits(
                    streams[1], unconditional, config, num_loops, refresh, start, end, costs
                )
                logits = logits_u + (config.cfg_scale + 1) * (logits - logits_u)
                # -inf - (-inf) is NaN at [MASK] (SUBS): keep [MASK] impossible after guidance.
                logits[..., mask_token_id] = -math.inf
            if config.suppress_eos:
                logits[..., config.eos_token_id] = -math.inf
            prediction = _gumbel_argmax(logits, config.temperature, generator, ws, s)
            window = x[:, ws:we]
            candidates = window == mask_token_id
            candidates[:, : start - ws] = False
            candidates[:, end - ws :] = False
            if config.parallel:  # at least the share that still finishes the block in time
                num_commit = (remaining + spb - j - 1) // (spb - j)
            else:
                num_commit = schedule[:, j]
            commit = _choose(
                config, logits, prediction, candidates, num_commit, j, generator, ws, s
            )
            x[:, ws:we] = torch.where(commit, prediction, window)
            committed[:, step] = commit.sum(-1).cpu()
    bytes_per_entry = 0
    if streams[0].cache is not None:
        bytes_per_entry = streams[0].cache.bytes_per_token_per_layer()
    return GenerationResult(
        tokens=x,
        prompt_lengths=prompt_lengths,
        gen_length=config.gen_length,
        loops_per_step=loops_per_step,
        committed_per_step=committed,
        loop_evaluations=costs.loop_evaluations,
        model_flops=costs.flops,
        seconds=time.perf_counter() - start_time,
        forward_passes=costs.passes,
        token_evaluations=costs.tokens,
        cache_bytes=costs.cache_bytes * len(streams),
        cache_bytes_per_token_per_layer_per_loop=bytes_per_entry,
        loops_per_row=costs.row_loops,
        active_position_loops=costs.active_positions,
        probe_evaluations=costs.probes,
        loop_policy=policy_name,
    )


def _resolve_policy(model, config: SamplerConfig, default_loops: int):
    """-> (config with the loop policy to apply, its description).

    A policy with no mode set takes the model's calibrated schedule (`model.loop_schedule`,
    read from `loop_schedule.json`) unless `calibrated=False`.
    """
    policy = config.loops
    record = getattr(model, "loop_schedule", None)
    if policy.unset and policy.calibrated and record:
        policy = dataclasses.replace(policy, schedule=tuple(record["schedule"]))
        config = dataclasses.replace(config, loops=policy)
        return config, f"calibrated {policy.describe(default_loops)} (loop_schedule.json)"
    return config, policy.describe(default_loops)


def _budget_caps(config: SamplerConfig, spent: Tensor, step: int, most: int) -> Tensor:
    """[b] the most loops each row may run at `step`: what its budget leaves after keeping one
    loop for every later step, at most `most`."""
    total = int(config.loops.budget * config.gen_length)
    later = config.steps - step - 1
    return (total - spent - later).clamp(1, most)


def _choose(config, logits, prediction, candidates, num_commit, j, generator, ws, full_len):
    """[b, w] bool: which candidate positions of the window take their prediction now.

    Random draws cover all `full_len` positions (then the window is cut out), so the tokens do
    not depend on the window, i.e. on whether a cache is used.
    """
    b, w = candidates.shape
    if config.remasking != "low_confidence":
        u = torch.rand((b, full_len), dtype=torch.float64, generator=generator)
        u = u[:, ws : ws + w].to(candidates.device)
    if config.remasking == "ancestral":
        t = 1.0 - j / config.steps_per_block
        s = 1.0 - (j + 1) / config.steps_per_block
        return candidates & (u < (t - s) / t)
    if config.remasking == "low_confidence":
        confidence = logits.softmax(-1).gather(-1, prediction[..., None]).squeeze(-1)
    else:
        confidence = u
    confidence = torch.where(candidates, confidence, -math.inf)
    # rank 0 = the most confident; a stable sort breaks ties by position.
    order = torch.argsort(confidence, dim=-1, descending=True, stable=True)
    rank = order.argsort(-1)
    num_commit = num_commit.to(candidates.device)
    if config.threshold is not None:
        passing = confidence >= config.threshold
    elif config.factor is not None:  # the r-th best (r = rank + 1) needs 1 - factor / (r + 1)
        passing = confidence >= 1.0 - config.factor / (rank + 2).double()
    if config.parallel:
        # Both rules pass a prefix of the ranking (confidence falls as the bar rises).
        num_commit = torch.maximum(num_commit, (passing & candidates).sum(-1))
    return candidates & (rank < num_commit[:, None])
