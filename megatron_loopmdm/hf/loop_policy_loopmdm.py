"""How many loops a forward pass runs: fixed, scheduled, or adaptive by a stopping rule.

This file is copied into every converted model directory next to `generation_loopmdm.py`, so it
imports only torch. `LoopPolicy` is the user's choice; `LoopController` applies an adaptive
policy inside one forward pass of `LoopMDMForMaskedDiffusion` (its `loop_controller=`).

Stopping rules (`LoopPolicy.stop`), tested after every loop from the second on:
- `state`: relative L2 change of the loop block's output, ||x_i - x_{i-1}|| / ||x_{i-1}||.
- `kl`: KL(p_i || p_{i-1}) of the predicted distributions at [MASK] positions (the coda and
  the output layer run after every loop to get p_i: a "probe", counted in the costs).
- `argmax`: the predicted token at every [MASK] position unchanged for `patience` loops.

Granularity (`LoopPolicy.per`): `batch` stops the pass when every sample has converged (one
slow sample holds all); `sample` freezes each converged sample (its rows are no longer
computed when there is no key/value cache, so the saving is real); `position` freezes each
converged position (its state is kept bit for bit and still attended; its compute is not
skipped, which `active_position_loops` makes visible) and a sample stops once all its
positions have. A per-row cap (`row_max_loops`) serves the compute budget of the sampler.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

STOP_RULES = ("state", "kl", "argmax")
GRANULARITIES = ("batch", "sample", "position")
SCHEDULE_FILE = "loop_schedule.json"
"""The calibrated schedule's file in a Hugging Face model directory."""


@dataclass(frozen=True)
class LoopPolicy:
    """The loop count of each forward pass of a sampler.

    Exactly one mode applies: `schedule` if given, else adaptive if `threshold` is given (or
    `stop="argmax"`, or a `budget`), else the fixed `num_loops`; with none of them set, a
    model's calibrated schedule (`loop_schedule.json`) when it has one and `calibrated` is True,
    else the model's S_max.
    """

    num_loops: Optional[int] = None
    """Fixed S for every step (any S >= 1, S > S_max included); None: the model's S_max."""
    threshold: Optional[float] = None
    """Adaptive: the stopping rule's threshold (relative change for `state`, nats for `kl`)."""
    min_loops: int = 1
    """Adaptive: loops always run (the rules compare two loops, so at least 2 run whenever
    max_loops >= 2)."""
    max_loops: Optional[int] = None
    """Adaptive: the most loops (default `num_loops`, else the model's S_max)."""
    schedule: Optional[Tuple[int, ...]] = None
    """S(step): entry k serves the k-th of len(schedule) equal parts of the steps."""
    stop: str = "state"
    """Adaptive stopping rule: `state`, `kl` or `argmax` (see the module docstring)."""
    per: str = "batch"
    """Adaptive granularity: `batch`, `sample` or `position`."""
    patience: int = 1
    """`argmax`: loops the prediction must stay unchanged (k)."""
    budget: Optional[float] = None
    """At most this many loop evaluations per generated token and sample, over the whole
    generation; the stopping rule decides where they go (the sampler caps each step so every
    later step keeps one loop)."""
    calibrated: bool = True
    """With no mode set: use the model's calibrated schedule when it has one."""

    def __post_init__(self) -> None:
        if self.num_loops is not None and self.num_loops < 1:
            raise ValueError(f"num_loops={self.num_loops}: loop at least once (--num-loops >= 1).")
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"loop threshold {self.threshold} must be non-negative.")
        if self.min_loops < 1:
            raise ValueError(f"min_loops={self.min_loops} must be at least 1.")
        if self.max_loops is not None and self.max_loops < self.min_loops:
            raise ValueError(
                f"max_loops={self.max_loops} < min_loops={self.min_loops}; raise --max-loops."
            )
        if self.schedule is not None:
            if not self.schedule or any(int(s) < 1 for s in self.schedule):
                raise ValueError(f"loop schedule {self.schedule}: give loop counts >= 1.")
            object.__setattr__(self, "schedule", tuple(int(s) for s in self.schedule))
        if self.stop not in STOP_RULES:
            raise ValueError(
                f"loop stop rule {self.stop!r}: choose one of {', '.join(STOP_RULES)}."
            )
        if self.per not in GRANULARITIES:
            raise ValueError(
                f"loop granularity {self.per!r}: choose one of {', '.join(GRANULARITIES)}."
            )
        if self.patience < 1:
            raise ValueError(f"loop patience {self.patience} must be at least 1 (--loop-patience).")
        if self.stop in ("state", "kl") and self.threshold is None and self.adaptive:
            raise ValueError(
                f"the {self.stop!r} loop stop rule needs a threshold (--loop-threshold)."
            )
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"loop budget {self.budget} must be > 0 (--loop-budget).")

    @classmethod
    def parse_schedule(cls, text: str) -> "LoopPolicy":
        """`"1,2,4,2"` -> a schedule policy."""
        try:
            values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
        except ValueError:
            raise ValueError(f"--loop-schedule {text!r}: expected integers like '1,2,4,2'.")
        return cls(schedule=values)

    @property
    def adaptive(self) -> bool:
        return self.schedule is None and (
            self.threshold is not None or self.stop == "argmax" or self.budget is not None
        )

    @property
    def legacy(self) -> bool:
        """Adaptive by the batch's relative state change: the model's own `loop_threshold`."""
        return self.adaptive and self.stop == "state" and self.per == "batch" and not self.budget

    @property
    def unset(self) -> bool:
        """No mode given: the model's calibrated schedule (if any and allowed) or S_max."""
        return self.num_loops is None and self.schedule is None and not self.adaptive

    def loops_at(self, step: int, num_steps: int, default: int) -> int:
        """The loop count (the most, when adaptive) of denoising step `step` of `num_steps`."""
        if self.schedule is not None:
            return self.schedule[
                min(step * len(self.schedule) // num_steps, len(self.schedule) - 1)
            ]
        if self.adaptive:
            return self.max_loops or self.num_loops or default
        return self.num_loops or default

    def describe(self, default: int) -> str:
        if self.schedule is not None:
            return f"schedule {','.join(map(str, self.schedule))}"
        if self.adaptive:
            most = self.max_loops or self.num_loops or default
            rule = {"state": f"threshold {self.threshold}", "kl": f"kl < {self.threshold}",
                    "argmax": f"argmax unchanged {self.patience} loop(s)"}[self.stop]  # fmt: skip
            budget = f", budget {self.budget}/token" if self.budget else ""
            return f"adaptive ({rule}, per {self.per}, {self.min_loops}..{most} loops{budget})"
        return f"fixed S={self.num_loops or default}"

    def controller(self, mask_token_id: int, row_max_loops: Optional[Tensor] = None):
        """A fresh `LoopController` for one forward pass (None unless adaptive)."""
        if not self.adaptive:
            return None
        return LoopController(self, mask_token_id, row_max_loops)


def read_loop_schedule(directory) -> Optional[dict]:
    """The calibrated schedule of a model directory (`loop_schedule.json`), or None."""
    path = Path(directory) / SCHEDULE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        LoopPolicy(schedule=tuple(record["schedule"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is not a loop schedule ({e}); recalibrate or delete the file."
        ) from e
    return record


def write_loop_schedule(directory, record: dict) -> Path:
    """Writes `record` (with a `schedule` list) as the directory's `loop_schedule.json`."""
    LoopPolicy(schedule=tuple(record["schedule"]))
    path = Path(directory) / SCHEDULE_FILE
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


class LoopController:
    """Applies an adaptive `LoopPolicy` inside one forward pass; holds what the pass cost.

    The model calls `begin` before the first loop, `rows()` before every loop (the rows still
    computed), and `after_loop` after every loop, then stops once `done`.
    """

    def __init__(self, policy: LoopPolicy, mask_token_id: int, row_max_loops=None):
        self.policy, self.mask_token_id = policy, mask_token_id
        self.row_max_loops = row_max_loops
        self.skip_rows = True
        """Whether finished rows are left out of the compute (no key/value cache)."""
        self.done = False
        self.row_loops: Optional[Tensor] = None
        """[b] int64: loops computed per row."""
        self.active_position_loops = 0
        """Position-loops whose state was updated (not frozen), over computed rows."""
        self.probe_rows = 0
        """Rows run through the coda and output layer to test `kl` / `argmax`."""
        self.trace: Optional[list] = None
        """A list to collect each loop's argmax [b, w] into (calibration), or None."""

    def begin(self, input_ids: Tensor, window_mask: Optional[Tensor], skip_rows: bool) -> None:
        """input_ids [b, w]; window_mask [b, w] (1 = real token) or None."""
        b, w = input_ids.shape
        device = input_ids.device
        self.skip_rows = skip_rows
        self.valid = torch.ones(b, w, dtype=torch.bool, device=device)
        if window_mask is not None:
            self.valid = window_mask.bool()
        self.watched = self.valid & (input_ids == self.mask_token_id)  # predictions that matter
        self.frozen = torch.zeros(b, w, dtype=torch.bool, device=device)
        self.row_done = torch.zeros(b, dtype=torch.bool, device=device)
        self.row_loops = torch.zeros(b, dtype=torch.long, device=device)
        self.stable = torch.zeros(b, w, dtype=torch.long, device=device)
        self.previous_logp: Optional[Tensor] = None
        self.previous_argmax: Optional[Tensor] = None
        if self.row_max_loops is not None:
            self.row_max_loops = self.row_max_loops.to(device)

    def rows(self) -> Optional[Tensor]:
        """Indices of the rows this loop computes (None: all of them)."""
        if not self.skip_rows or not self.row_done.any():
            return None
        return (~self.row_done).nonzero().squeeze(-1)

    def after_loop(self, i: int, x: Tensor, previous: Tensor, probe: Callable) -> Tensor:
        """Loop i's output x [b, w, h] (loop input `previous`) -> x with frozen parts kept.

        `probe(x, rows)` -> logits [len(rows), w, vocab] of those rows' state (coda + head).
        """
        computed = ~self.row_done if self.skip_rows else torch.ones_like(self.row_done)
        self.row_loops += computed.long()
        updated = ~self.frozen & ~self.row_done[:, None] & computed[:, None]
        self.active_position_loops += int(updated.sum())
        keep = self.frozen | self.row_done[:, None]
        x = torch.where(keep[..., None], previous, x)
        position_converged, row_converged = self._converged(i, x, previous, probe)
        policy = self.policy
        if i + 1 >= policy.min_loops and i > 0:
            if policy.per == "batch":
                self.done = bool(row_converged[~self.row_done].all())
            elif policy.per == "sample":
                self.row_done |= row_converged
            else:
                self.frozen |= position_converged
                region = self.valid if policy.stop == "state" else self.watched
                self.row_done |= (self.frozen | ~region).all(-1)
        if self.row_max_loops is not None:
            self.row_done |= self.row_loops >= self.row_max_loops
        self.done = self.done or bool(self.row_done.all())
        return x

    def _converged(self, i: int, x: Tensor, previous: Tensor, probe) -> Tuple[Tensor, Tensor]:
        """-> ([b, w] converged positions, [b] converged rows) after loop i."""
        policy = self.policy
        if policy.stop == "state":
            delta = (x.float() - previous.float()).pow(2).sum(-1)  # [b, w]
            norm = previous.float().pow(2).sum(-1)
            positions = delta.sqrt() < policy.threshold * norm.sqrt()
            valid = self.valid.float()
            change = ((delta * valid).sum(-1) / (norm * valid).sum(-1).clamp_min(1e-30)).sqrt()
            return positions & self.valid, change < policy.threshold
        b = x.size(0)
        rows = torch.arange(b, device=x.device)
        if self.skip_rows:  # else a cache needs every row's keys: probe all
            rows = rows[~self.row_done]
        logits = probe(x[rows], rows).float()
        self.probe_rows += len(rows)
        logp = torch.full((b, *logits.shape[1:]), -torch.inf, device=x.device)
        if self.previous_logp is not None:
            logp.copy_(self.previous_logp)
        logp[rows] = logits.log_softmax(-1)
        if policy.stop == "kl":
            positions = torch.zeros_like(self.watched)
            mean_kl = torch.full((b,), torch.inf, device=x.device)  # no previous loop yet
            if self.previous_logp is not None:
                p = logp.exp()
                kl = torch.where(p > 0, p * (logp - self.previous_logp), 0.0).sum(-1)  # [b, w]
                positions = kl < policy.threshold
                watched = self.watched.float()
                mean_kl = (kl * watched).sum(-1) / watched.sum(-1).clamp_min(1)
            self.previous_logp = logp
            return positions & self.watched, mean_kl < policy.threshold
        argmax = logp.argmax(-1)
        if self.trace is not None:
            self.trace.append(argmax)
        if self.previous_argmax is not None:
            same = argmax == self.previous_argmax
            self.stable = torch.where(same, self.stable + 1, torch.zeros_like(self.stable))
        self.previous_argmax, self.previous_logp = argmax, logp
        positions = self.stable >= policy.patience
        return positions & self.watched, (positions | ~self.watched).all(-1)
