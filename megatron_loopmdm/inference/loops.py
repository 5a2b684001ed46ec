"""How many loops each denoising step runs: fixed S, a schedule, or adaptive by a stopping rule.

`LoopPolicy` lives in `megatron_loopmdm/hf/loop_policy_loopmdm.py`, which the exported model
carries; this module keeps its library import path (the command-line flags are in
`inference/arguments.py`).
"""

from megatron_loopmdm.hf.loop_policy_loopmdm import (
    GRANULARITIES,
    SCHEDULE_FILE,
    STOP_RULES,
    LoopController,
    LoopPolicy,
    read_loop_schedule,
    write_loop_schedule,
)

__all__ = [
    "GRANULARITIES",
    "LoopController",
    "LoopPolicy",
    "SCHEDULE_FILE",
    "STOP_RULES",
    "read_loop_schedule",
    "write_loop_schedule",
]
