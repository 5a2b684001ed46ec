"""Hugging Face interoperability: the LoopMDM HF model, conversion, and loading for inference.

`configuration_loopmdm.py` and `modeling_loopmdm.py` depend only on torch and transformers (they
are copied into every converted directory); the conversion code in `checkpoint.py` needs
megatron-core and is imported only when used.
"""

from typing import Optional

from megatron_loopmdm.hf.configuration_loopmdm import LoopMDMConfig
from megatron_loopmdm.hf.modeling_loopmdm import LoopMDMForMaskedDiffusion

import torch


def load_for_inference(
    path,
    device: str = "cpu",
    dtype: Optional[torch.dtype] = None,
    iteration: Optional[int] = None,
) -> LoopMDMForMaskedDiffusion:
    """A LoopMDM as a Hugging Face model, in eval mode, from either kind of directory.

    Args:
        path: a Hugging Face directory (with config.json) or a megatron checkpoint directory
            (the `--save` directory of `pretrain_loopmdm.py`, any TP/PP layout).
        device: where the model goes.
        dtype: the parameter dtype; default: as saved (HF directory) or fp32 (megatron).
        iteration: for a megatron checkpoint, which iteration (default: the latest).

    Returns:
        `LoopMDMForMaskedDiffusion`; `model(ids, num_loops=S).logits` is [b, s, vocab].

    A megatron checkpoint is loaded in this process through a one-process gloo group that is
    torn down afterwards (or in the existing group, if that one is TP=1/PP=1).
    """
    from megatron_loopmdm.hf import checkpoint

    return checkpoint.load_for_inference(path, device=device, dtype=dtype, iteration=iteration)


__all__ = ["LoopMDMConfig", "LoopMDMForMaskedDiffusion", "load_for_inference"]
