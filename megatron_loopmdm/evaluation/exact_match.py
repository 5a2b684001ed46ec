"""Exact match of sampled answers, per loop count, task and difficulty; answer NELBO per loop count.

A prediction is the generated text up to the first EOS (or pad) token, cut at the first newline
and stripped; it is correct when it equals the stripped reference `answer`. Examples are
sampled in groups of one (task, difficulty), so each group gets a generation length that fits
its longest answer (plus one token for the EOS) unless a length is given.
"""

from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megatron_loopmdm.evaluation.nelbo import sequence_nelbo
from megatron_loopmdm.inference import LoopPolicy, SamplerConfig, generate

import torch

ALL = "all"
"""The `task` / `difficulty` value of aggregate rows."""


def normalize_answer(text: str) -> str:
    """The first line of `text`, stripped."""
    return text.strip().split("\n", 1)[0].strip()


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> List[int]:
    """`ids` up to (not including) the first id in `stop_ids`."""
    for n, token in enumerate(ids):
        if token in stop_ids:
            return list(ids[:n])
    return list(ids)


def _groups(examples: Sequence[Dict]) -> Dict[Tuple[str, str], List[int]]:
    """(task, difficulty) -> example indices, in first-seen order."""
    groups = defaultdict(list)
    for n, example in enumerate(examples):
        groups[(str(example.get("task", ALL)), str(example.get("difficulty", ALL)))].append(n)
    return dict(groups)


def _score_rows(loops: int, examples, correct: List[bool]) -> List[Dict]:
    """Rows per (task, difficulty), per task, per difficulty over tasks, and over everything."""
    keys = [(str(e.get("task", ALL)), str(e.get("difficulty", ALL))) for e in examples]
    buckets = defaultdict(list)
    for key, ok in zip(keys, correct):
        buckets[key].append(ok)
        if key[1] != ALL:
            buckets[(key[0], ALL)].append(ok)
        if key[0] != ALL:
            buckets[(ALL, key[1])].append(ok)
            if key[1] != ALL:
                buckets[(ALL, ALL)].append(ok)
    rows = []
    for (task, difficulty), oks in sorted(buckets.items(), key=lambda kv: (kv[0][0] == ALL, kv[0])):
        rows.append(
            {"num_loops": loops, "task": task, "difficulty": difficulty,
             "exact_match": sum(oks) / len(oks), "correct": sum(oks), "total": len(oks)}
        )  # fmt: skip
    return rows


@torch.no_grad()
def sample_answers(
    model,
    examples: Sequence[Dict],
    encode: Callable[[str], List[int]],
    decode: Callable[[List[int]], str],
    policy: LoopPolicy,
    stop_ids: Sequence[int],
    sampler: Optional[SamplerConfig] = None,
    batch_size: int = 32,
    seed: int = 0,
) -> Tuple[List[str], List[bool], Dict]:
    """Samples an answer to every prompt with one loop policy; -> (texts, correct, costs).

    The noise is seeded per (task, difficulty) group, so every policy sees the same prompts
    in the same batches with the same seeds. `costs`: `loop_evaluations` (mean loop-block runs
    computed per sample, the cost that per-sample stopping really saves), `pass_loop_evaluations`
    (summed over passes, the deepest row of each), `active_position_loops`,
    `probe_evaluations`, `model_flops` (summed over calls), `samples`.
    """
    groups = _groups(examples)
    prompts = [encode(e["prompt"]) for e in examples]
    texts = [""] * len(examples)
    costs = {"loop_evaluations": 0.0, "pass_loop_evaluations": 0, "active_position_loops": 0,
             "probe_evaluations": 0, "model_flops": 0.0, "samples": len(examples)}  # fmt: skip
    for g, indices in enumerate(groups.values()):
        config = _group_sampler(sampler, [examples[i] for i in indices], encode, policy)
        generator = torch.Generator().manual_seed(seed * 1000 + g)
        for first in range(0, len(indices), batch_size):
            chunk = indices[first : first + batch_size]
            result = generate(model, [prompts[i] for i in chunk], config, generator=generator)
            for i, ids in zip(chunk, result.generated.tolist()):
                texts[i] = decode(cut_at_stop(ids, stop_ids))
            costs["loop_evaluations"] += float(result.loops_per_row.sum())
            costs["pass_loop_evaluations"] += result.loop_evaluations
            costs["active_position_loops"] += result.active_position_loops
            costs["probe_evaluations"] += result.probe_evaluations
            costs["model_flops"] += result.model_flops or 0.0
    costs["loop_evaluations"] /= max(len(examples), 1)
    correct = [
        normalize_answer(text) == normalize_answer(str(e["answer"]))
        for text, e in zip(texts, examples)
    ]
    return texts, correct, costs


@torch.no_grad()
def exact_match_per_loops(
    model,
    examples: Sequence[Dict],
    encode: Callable[[str], List[int]],
    decode: Callable[[List[int]], str],
    num_loops: Sequence[int],
    stop_ids: Sequence[int],
    sampler: Optional[SamplerConfig] = None,
    batch_size: int = 32,
    seed: int = 0,
) -> Tuple[List[Dict], List[Dict]]:
    """Samples an answer to every prompt at each loop count and scores exact match.

    Args:
        model: a `LoopMDMForMaskedDiffusion` (eval mode) or any model `generate` accepts.
        examples: dicts with `prompt` and `answer`, optionally `task` and `difficulty`.
        encode, decode: the tokenizer (text -> ids, ids -> text).
        num_loops: the fixed loop counts S to evaluate.
        stop_ids: token ids that end an answer (EOS, pad).
        sampler: sampler settings (its loop policy is replaced by each S); None: one token per
            step, low-confidence remasking, one block of the group's longest answer + 1 tokens.
        batch_size: prompts per `generate` call (does not change the result: noise-free
            argmax sampling by default; with a temperature the per-group seed keeps it fixed).
        seed: seeds the sampler's noise, per group.

    Returns:
        (rows, predictions): rows of `num_loops`, `task`, `difficulty` (`all` for aggregates),
        `exact_match`, `correct`, `total`; one prediction dict per example and loop count
        (the example's fields plus `num_loops`, `prediction`, `correct`).
    """
    rows, predictions = [], []
    for loops in num_loops:
        texts, correct, _ = sample_answers(
            model, examples, encode, decode, LoopPolicy(num_loops=loops), stop_ids, sampler,
            batch_size, seed,
        )  # fmt: skip
        rows += _score_rows(loops, examples, correct)
        predictions += [
            {**e, "num_loops": loops, "prediction": text, "correct": ok}
            for e, text, ok in zip(examples, texts, correct)
        ]
    return rows, predictions


@torch.no_grad()
def exact_match_per_policy(
    model,
    examples: Sequence[Dict],
    encode: Callable[[str], List[int]],
    decode: Callable[[List[int]], str],
    policies: Dict[str, LoopPolicy],
    stop_ids: Sequence[int],
    sampler: Optional[SamplerConfig] = None,
    batch_size: int = 32,
    seed: int = 0,
) -> List[Dict]:
    """Exact match and cost of each named loop policy on the same prompts and seeds.

    Returns:
        One row per policy: `policy`, `exact_match`, `correct`, `total`, and the costs of
        `sample_answers` (`loop_evaluations` per sample first).
    """
    rows = []
    for name, policy in policies.items():
        _, correct, costs = sample_answers(
            model, examples, encode, decode, policy, stop_ids, sampler, batch_size, seed
        )
        rows.append({"policy": name, "exact_match": sum(correct) / max(len(correct), 1),
                     "correct": sum(correct), "total": len(correct), **costs})  # fmt: skip
    return rows


def _group_sampler(sampler, group, encode, policy: LoopPolicy) -> SamplerConfig:
    if sampler is None:
        length = max(len(encode(str(e["answer"]))) for e in group) + 1
        sampler = SamplerConfig(gen_length=length, steps=length)
    return SamplerConfig(**{**sampler.__dict__, "loops": policy})


@torch.no_grad()
def answer_nelbo_per_loops(
    model,
    examples: Sequence[Dict],
    encode: Callable[[str], List[int]],
    num_loops: Sequence[int],
    eos_id: Optional[int] = None,
    num_samples: int = 8,
    seed: int = 0,
) -> List[Dict]:
    """NELBO of the answers given the prompts (prompt never masked), in nats per answer token.

    Each example is prompt + answer (+ EOS when `eos_id` is given, as SFT trains); the
    estimate is `sequence_nelbo`'s stratified Monte Carlo bound with `num_samples` draws,
    seeded per example, so every loop count sees the same masks.

    Returns:
        One dict per loop count: `num_loops`, `nelbo` (nats per answer token), `tokens`.
    """
    device = next(model.parameters()).device
    rows = []
    for loops in num_loops:
        total, count = 0.0, 0
        for n, example in enumerate(examples):
            prompt = encode(example["prompt"])
            answer = encode(str(example["answer"])) + ([] if eos_id is None else [eos_id])
            tokens = torch.tensor([prompt + answer], dtype=torch.long, device=device)
            generator = torch.Generator().manual_seed(seed * 100003 + n)
            total += float(
                sequence_nelbo(model, tokens, loops, num_samples, len(prompt), generator=generator)
            )
            count += len(answer)
        rows.append({"num_loops": loops, "nelbo": total / max(count, 1), "tokens": count})
    return rows
