"""A synthetic multi-step reasoning suite: tasks, difficulty levels and disjoint splits.

Each task maps a difficulty level (1 = easiest) to a random example `(prompt, answer)` whose
answer takes several dependent steps to compute (carries, partial products, a chain of lookups or
compositions). Examples are SFT records: `prompt` (ends with `=`), `response` (the answer), plus
`answer`, `task` and `difficulty` so that exact match can be reported per task and level.

Splits are disjoint by construction: the test split is drawn first, then validation avoiding
it, then train avoiding both; each (split, task, level) has its own random stream keyed by the
seed, so the test split depends only on the seed, tasks and test size (not on the train size).
"""

import json
import os
import random
import string
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

SPLITS = ("test", "validation", "train")
"""In drawing order: a later split never repeats an earlier split's prompt."""
NUM_LEVELS = 4

_LETTERS = string.ascii_lowercase


def _number(rng: random.Random, digits: int) -> int:
    """A uniform number with exactly `digits` digits (no leading zero)."""
    return rng.randrange(10 ** (digits - 1), 10**digits)


def addition(rng: random.Random, level: int) -> Tuple[str, str]:
    """`a+b=` with two (level + 1)-digit numbers: a chain of carries."""
    a, b = _number(rng, level + 1), _number(rng, level + 1)
    return f"{a}+{b}=", str(a + b)


_MULTIPLICATION_DIGITS = {1: (2, 2), 2: (3, 2), 3: (3, 3), 4: (4, 3)}


def multiplication(rng: random.Random, level: int) -> Tuple[str, str]:
    """`a*b=` with (2x2, 3x2, 3x3, 4x3)-digit factors by level: partial products, carries."""
    da, db = _MULTIPLICATION_DIGITS[level]
    a, b = _number(rng, da), _number(rng, db)
    return f"{a}*{b}=", str(a * b)


def permutation_composition(rng: random.Random, level: int) -> Tuple[str, str]:
    """Compose level + 1 permutations of 0..4 (each written as its images), first one first.

    `p:31420,02143=` -> the images of 0..4 under p2(p1(i)); each permutation is one step.
    """
    perms = [rng.sample(range(5), 5) for _ in range(level + 1)]
    images = list(range(5))
    for perm in perms:
        images = [perm[i] for i in images]
    text = ",".join("".join(map(str, p)) for p in perms)
    return f"p:{text}=", "".join(map(str, images))


def variable_lookup(rng: random.Random, level: int) -> Tuple[str, str]:
    """Multi-hop lookup: follow a chain of level + 1 assignments, with a distractor chain.

    `k=r,x=5,f=3,q=x,r=f,m=q;m=` -> 5 (m = q = x = 5); assignments are shuffled, so the chain
    must be followed hop by hop.
    """
    hops = level + 1
    names = rng.sample(_LETTERS, 2 * (hops + 1))
    value, distractor = rng.sample(range(10), 2)
    statements = []
    for chain, start in ((names[: hops + 1], value), (names[hops + 1 :], distractor)):
        statements.append(f"{chain[0]}={start}")
        statements += [f"{chain[i]}={chain[i - 1]}" for i in range(1, hops + 1)]
    rng.shuffle(statements)
    return f"{','.join(statements)};{names[hops]}=", str(value)


def running_sum(rng: random.Random, level: int) -> Tuple[str, str]:
    """The running sums mod 10 of 2 (level + 1) digits: each output digit needs the previous.

    `s:3517=` -> 3896.
    """
    digits = [rng.randrange(10) for _ in range(2 * (level + 1))]
    total, out = 0, []
    for d in digits:
        total = (total + d) % 10
        out.append(str(total))
    return f"s:{''.join(map(str, digits))}=", "".join(out)


TASKS: Dict[str, Callable[[random.Random, int], Tuple[str, str]]] = {
    "addition": addition,
    "multiplication": multiplication,
    "permutation": permutation_composition,
    "variable_lookup": variable_lookup,
    "running_sum": running_sum,
}


def check_tasks(tasks: Sequence[str], levels: Iterable[int]) -> None:
    """ValueError naming what to change if a task or level is unknown."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks {','.join(tasks)}: choose from {', '.join(TASKS)}.")
    bad = [level for level in levels if not 1 <= level <= NUM_LEVELS]
    if bad:
        raise ValueError(f"difficulty levels {bad}: each must be in 1..{NUM_LEVELS}.")


def _draw(task: str, level: int, count: int, rng: random.Random, seen: set) -> List[Dict]:
    """`count` examples of one task and level whose prompts are not in `seen` (updated)."""
    records, attempts = [], 0
    while len(records) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(
                f"task {task} level {level}: found only {len(records)} of {count} distinct "
                "examples not in an earlier split; ask for fewer examples per level."
            )
        prompt, answer = TASKS[task](rng, level)
        if (task, prompt) in seen:
            continue
        seen.add((task, prompt))
        records.append(
            {"prompt": prompt, "response": answer, "answer": answer, "task": task,
             "difficulty": level}
        )  # fmt: skip
    return records


def make_splits(
    tasks: Sequence[str],
    sizes: Dict[str, int],
    seed: int = 0,
    levels: Sequence[int] = tuple(range(1, NUM_LEVELS + 1)),
    train_levels: Sequence[int] = None,
) -> Dict[str, List[Dict]]:
    """The suite's splits, deterministic in the arguments and disjoint in (task, prompt).

    Args:
        tasks: task names (keys of `TASKS`).
        sizes: examples per task and level, per split: {"train": n, "validation": n, "test": n}.
        seed: the random seed.
        levels: difficulty levels of the validation and test splits.
        train_levels: levels of the train split (default `levels`; fewer levels test whether
            the model generalises to harder problems than it was trained on).

    Returns:
        {split: records}; test and validation in (task, level) order, train shuffled.
    """
    train_levels = list(levels if train_levels is None else train_levels)
    check_tasks(tasks, [*levels, *train_levels])
    for split in SPLITS:
        if sizes.get(split, 0) < 0:
            raise ValueError(f"--{split}-per-level {sizes[split]} must be >= 0.")
    seen, splits = set(), {}
    for split in SPLITS:
        records = []
        for task in tasks:
            for level in train_levels if split == "train" else levels:
                rng = random.Random(f"{seed}:{split}:{task}:{level}")
                records += _draw(task, level, sizes.get(split, 0), rng, seen)
        if split == "train":
            random.Random(f"{seed}:shuffle").shuffle(records)
        splits[split] = records
    return splits


def write_jsonl(records: Iterable[Dict], path) -> None:
    """Writes JSON lines atomically (a temporary file, then a rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def read_examples(path, required: Sequence[str] = ("prompt", "answer")) -> List[Dict]:
    """Reads JSON lines and checks every record has the `required` fields.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not JSON or lacks a field, naming the line.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg}).") from None
            missing = [k for k in required if not isinstance(record, dict) or k not in record]
            if missing:
                raise ValueError(f"{path}:{n}: missing field(s) {', '.join(missing)}.")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no examples.")
    return records
