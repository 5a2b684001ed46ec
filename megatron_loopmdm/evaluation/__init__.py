"""Evaluation of LoopMDMs: validation NELBO per loop count, mask-to-mask attention, GSM8K exact
match, and an lm-evaluation-harness adapter (`lm_eval_adapter`, needs the optional `lm_eval`).

Everything runs on a Hugging Face `LoopMDMForMaskedDiffusion` (see `megatron_loopmdm.hf`).
"""

from megatron_loopmdm.evaluation.attention import mask_attention_share
from megatron_loopmdm.evaluation.gsm8k import extract_answer, gsm8k_exact_match
from megatron_loopmdm.evaluation.nelbo import EVAL_T_GRID, nelbo_per_loops, sequence_nelbo
from megatron_loopmdm.evaluation.report import write_table_and_plot

__all__ = [
    "EVAL_T_GRID",
    "extract_answer",
    "gsm8k_exact_match",
    "mask_attention_share",
    "nelbo_per_loops",
    "sequence_nelbo",
    "write_table_and_plot",
]
