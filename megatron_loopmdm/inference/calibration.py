"""A calibrated loop schedule: the fewest loops per part of the sampling that keep S_max's
predictions, measured on a small calibration set (a validation split, never the test split).

The sampler runs at fixed S_max (plain schedule, no cache, no guidance) over the calibration
prompts; at every step one pass also reads out the prediction after each loop (the coda and
output layer applied to the loop state). For each of `num_parts` equal parts of the steps,
the agreement at S is the share of the current block's [MASK] positions whose argmax after S
loops equals the argmax after S_max. The schedule takes, per part, the smallest S whose
agreement is >= `target`. `write_loop_schedule` saves it as `loop_schedule.json` next to the
model; the sampler then uses it whenever no loop mode is given.
"""

import dataclasses
from typing import Dict, List, Optional, Sequence

from megatron_loopmdm.hf.generation_loopmdm import SamplerConfig, generate
from megatron_loopmdm.hf.loop_policy_loopmdm import LoopPolicy

import torch
from torch import Tensor


class _Tracer:
    """Wraps a model: every call runs S_max loops and records per-loop agreement with S_max."""

    def __init__(self, model, max_loops: int, gen_length: int, block_length: int):
        self.model, self.config = model, model.config
        self.max_loops, self.gen_length, self.block_length = max_loops, gen_length, block_length
        self.calls: List[tuple] = []
        """Per call: ([S_max] agreeing positions per S, positions)."""

    def parameters(self):
        return self.model.parameters()

    def __call__(self, ids: Tensor, num_loops: int, **kwargs):
        mask_id = self.config.mask_token_id
        # patience beyond any loop count: never stops, only records each loop's argmax.
        controller = LoopPolicy(stop="argmax", patience=10**9).controller(mask_id)
        controller.trace = []
        out = self.model(ids, num_loops=self.max_loops, loop_controller=controller, **kwargs)
        self.calls.append(self._agreement(ids, controller.trace))
        return out

    def _agreement(self, ids: Tensor, trace: List[Tensor]) -> tuple:
        masked = ids == self.config.mask_token_id  # [b, s]
        p = ids.size(1) - self.gen_length
        # The current block of each row: its first block that still holds a [MASK].
        blocks = masked[:, p:].view(ids.size(0), -1, self.block_length).any(-1)  # [b, blocks]
        first = blocks.float().argmax(-1)  # [b]
        block_of = (torch.arange(ids.size(1), device=ids.device) - p).div(
            self.block_length, rounding_mode="floor"
        )
        relevant = masked & (block_of[None] == first[:, None].to(block_of.dtype))
        final = trace[-1]
        agree = [int(((step == final) & relevant).sum()) for step in trace]
        return agree, int(relevant.sum())


@torch.no_grad()
def calibrate_loop_schedule(
    model,
    prompts: Sequence[Sequence[int]],
    sampler: SamplerConfig,
    num_parts: int = 4,
    target: float = 0.99,
    max_loops: Optional[int] = None,
    batch_size: int = 8,
    seed: int = 0,
) -> Dict:
    """Measures the calibrated schedule of `model` on `prompts`.

    Args:
        model: a `LoopMDMForMaskedDiffusion` (eval mode).
        prompts: token ids of the calibration prompts (validation split).
        sampler: the sampler settings the schedule is for (its loop policy, cache, guidance and
            parallel decoding are ignored: calibration runs every step at S_max).
        num_parts: the schedule's length (equal parts of the steps).
        target: the least argmax agreement with S_max each part must keep, in (0, 1].
        max_loops: S_max (default the model's).
        batch_size: prompts per sampler call.
        seed: seeds the sampler's noise.

    Returns:
        The record to save: `schedule`, `target`, `max_loops`, `num_parts`, `agreement`
        ([num_parts][S_max] shares), `positions` (per part), and the sampler settings.
    """
    if not 0 < target <= 1:
        raise ValueError(f"calibration target {target} must lie in (0, 1].")
    if num_parts < 1 or num_parts > sampler.steps:
        raise ValueError(f"num_parts={num_parts} must lie in [1, steps={sampler.steps}].")
    if not prompts:
        raise ValueError("calibration needs at least one prompt.")
    most = max_loops or model.config.max_loops
    config = dataclasses.replace(
        sampler, loops=LoopPolicy(num_loops=most), cache="none", cfg_scale=0.0,
        threshold=None, factor=None,
    )  # fmt: skip
    agree = [[0] * most for _ in range(num_parts)]
    positions = [0] * num_parts
    generator = torch.Generator().manual_seed(seed)
    for first in range(0, len(prompts), batch_size):
        tracer = _Tracer(model, most, config.gen_length, config.block_length)
        generate(tracer, list(prompts[first : first + batch_size]), config, generator=generator)
        assert len(tracer.calls) == config.steps, "one pass per step without a cache"
        for step, (counts, total) in enumerate(tracer.calls):
            part = min(step * num_parts // config.steps, num_parts - 1)
            positions[part] += total
            for s in range(most):
                agree[part][s] += counts[s]
    shares = [[a / max(n, 1) for a in row] for row, n in zip(agree, positions)]
    schedule = [
        next((s + 1 for s in range(most) if n and row[s] >= target), most)
        for row, n in zip(shares, positions)
    ]
    return {
        "schedule": schedule, "target": target, "max_loops": most, "num_parts": num_parts,
        "agreement": [[round(a, 6) for a in row] for row in shares], "positions": positions,
        "calibration_prompts": len(prompts),
        "sampler": {"gen_length": config.gen_length, "steps": config.steps,
                    "block_length": config.block_length, "remasking": config.remasking},
    }  # fmt: skip
