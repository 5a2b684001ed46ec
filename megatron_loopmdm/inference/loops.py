"""How many loops each denoising step runs: a fixed S, adaptive by convergence, or a schedule.

`LoopPolicy` lives in `megatron_loopmdm/hf/generation_loopmdm.py`, the sampler that the exported
model carries; this module keeps its library import path.
"""

from megatron_loopmdm.hf.generation_loopmdm import LoopPolicy

__all__ = ["LoopPolicy"]
