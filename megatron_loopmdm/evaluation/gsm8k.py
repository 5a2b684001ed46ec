"""GSM8K-style exact match: sample an answer, compare the number after `####`."""

import re
from typing import Callable, Dict, List, Optional, Sequence

from megatron_loopmdm.inference import LoopPolicy, SamplerConfig, generate

import torch

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")
DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"


def extract_answer(text: str) -> Optional[str]:
    """The number after the first `####`, normalised (no commas, no trailing `.0`), or None."""
    if "####" not in text:
        return None
    match = _NUMBER.search(text.split("####", 1)[1])
    if match is None:
        return None
    number = match.group(0).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


@torch.no_grad()
def gsm8k_exact_match(
    model,
    examples: Sequence[Dict[str, str]],
    encode: Callable[[str], List[int]],
    decode: Callable[[List[int]], str],
    sampler: SamplerConfig,
    num_loops: Sequence[int],
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 8,
    seed: int = 0,
) -> List[Dict]:
    """Exact match of the `####` number per loop count.

    Args:
        examples: dicts with `question` and `answer` (the reference, containing `#### N`).
        encode, decode: the tokenizer (text -> ids, ids -> text).
        sampler: sampler settings; its loop policy is replaced by each fixed S of `num_loops`.
        template: the prompt, with `{question}`.

    Returns:
        One dict per loop count: `num_loops`, `exact_match`, `correct`, `total`, and
        `predictions` (the generated texts, in order).
    """
    prompts = [encode(template.format(question=e["question"])) for e in examples]
    references = [extract_answer(e["answer"]) for e in examples]
    rows = []
    for loops in num_loops:
        config = SamplerConfig(**{**sampler.__dict__, "loops": LoopPolicy(num_loops=loops)})
        generator = torch.Generator().manual_seed(seed)
        texts = []
        for first in range(0, len(prompts), batch_size):
            result = generate(
                model, prompts[first : first + batch_size], config, generator=generator
            )
            texts += [decode(row) for row in result.generated.tolist()]
        correct = sum(
            ref is not None and extract_answer(text) == ref for text, ref in zip(texts, references)
        )
        rows.append(
            {"num_loops": loops, "exact_match": correct / max(len(examples), 1),
             "correct": correct, "total": len(examples), "predictions": texts}
        )  # fmt: skip
    return rows
