"""How many loops each denoising step runs: a fixed S, adaptive by convergence, or a schedule."""

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class LoopPolicy:
    """The loop count of each forward pass of a sampler.

    Exactly one mode applies: `schedule` if given, else adaptive if `threshold` is given, else
    the fixed `num_loops`.
    """

    num_loops: Optional[int] = None
    """Fixed S for every step (any S >= 1, S > S_max included); None: the model's S_max."""
    threshold: Optional[float] = None
    """Adaptive: stop looping once the loop block's output changes by less than this (relative
    L2 change between consecutive loops, every sample of the batch), within the bounds below."""
    min_loops: int = 1
    """Adaptive: loops always run (the convergence test needs two loops, so at least 2 run
    whenever max_loops >= 2)."""
    max_loops: Optional[int] = None
    """Adaptive: the most loops (default `num_loops`, else the model's S_max)."""
    schedule: Optional[Tuple[int, ...]] = None
    """S(step): entry k serves the k-th of len(schedule) equal parts of the steps."""

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
        return self.schedule is None and self.threshold is not None

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
            return f"adaptive (threshold {self.threshold}, {self.min_loops}..{most} loops)"
        return f"fixed S={self.num_loops or default}"
