"""Does the loop state converge? The relative change of the loop block's output per loop.

For a prompt with its whole answer masked (the first denoising step of sampling), the loop
block's output after loop i is h_i (h_0: its input, the prelude's output); its relative
change is ||h_i - h_{i-1}|| / ||h_{i-1}|| over the answer positions. A loop state that
converges has changes falling towards 0 with i; one that does not keeps moving (and adaptive
loops on the state never stop). Measured on the Hugging Face model from its hidden states, so
on any export.
"""

from typing import Callable, Dict, List, Optional, Sequence

import torch


@torch.no_grad()
def loop_state_changes(
    model,
    examples: Sequence[Dict],
    encode: Callable[[str], List[int]],
    num_loops: int,
    eos_id: Optional[int] = None,
) -> List[float]:
    """Mean relative change of the loop state at the answer positions, per loop 1 .. S.

    Args:
        model: a `LoopMDMForMaskedDiffusion` (eval mode).
        examples: dicts with `prompt` and `answer` (the answer only sets how many positions
            are masked: its tokens, + EOS when `eos_id` is given, as SFT trains).
        encode: text -> token ids.
        num_loops: S >= 1.

    Returns:
        S floats: entry i - 1 is the mean over examples of ||h_i - h_{i-1}|| / ||h_{i-1}||.
    """
    if num_loops < 1:
        raise ValueError(f"num_loops={num_loops}: run the loop block at least once.")
    config = model.config
    start, end = config.loop_layers
    width = end - start
    device = next(model.parameters()).device
    totals = torch.zeros(num_loops, dtype=torch.float64)
    for example in examples:
        prompt = encode(example["prompt"])
        answer = len(encode(str(example["answer"]))) + (eos_id is not None)
        ids = torch.tensor([prompt + [config.mask_token_id] * answer], device=device)
        hidden = model(ids, num_loops=num_loops, output_hidden_states=True).hidden_states
        # hidden: the embedding output, then each executed layer; loop i's output follows the
        # prelude's `start` layers and i loops of `width` layers.
        states = [hidden[start + i * width][0, len(prompt) :].double()
                  for i in range(num_loops + 1)]  # fmt: skip
        for i in range(1, num_loops + 1):
            change = (states[i] - states[i - 1]).norm() / states[i - 1].norm().clamp_min(1e-30)
            totals[i - 1] += float(change)
    return (totals / max(len(examples), 1)).tolist()
