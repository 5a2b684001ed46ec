"""Writes the synthetic multi-step reasoning suite as SFT JSON lines, in three disjoint splits.

    python tools/make_reasoning_tasks.py --output-dir data/reasoning \
        [--tasks addition,multiplication,permutation,variable_lookup,running_sum] \
        [--levels 1,2,3,4] [--train-levels 1,2,3] [--train-per-level 2000] \
        [--validation-per-level 50] [--test-per-level 100] [--seed 0]

Writes OUT/train.jsonl, OUT/validation.jsonl, OUT/test.jsonl (records: prompt, response,
answer, task, difficulty) and OUT/manifest.json (the arguments and counts). The same arguments
give the same files; no prompt appears in two splits. Exit codes: 0 done, 2 bad arguments.
"""

import argparse
import json
import sys
from pathlib import Path

from megatron_loopmdm.evaluation.reasoning import NUM_LEVELS, TASKS, make_splits, write_jsonl


def _int_list(text: str) -> list:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 1,2,3") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--levels", type=_int_list, default=list(range(1, NUM_LEVELS + 1)),
                        help="difficulty levels of validation and test")  # fmt: skip
    parser.add_argument("--train-levels", type=_int_list, default=None,
                        help="difficulty levels of train (default: --levels)")  # fmt: skip
    parser.add_argument("--train-per-level", type=int, default=2000)
    parser.add_argument("--validation-per-level", type=int, default=50)
    parser.add_argument("--test-per-level", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    sizes = {
        "train": args.train_per_level,
        "validation": args.validation_per_level,
        "test": args.test_per_level,
    }
    try:
        splits = make_splits(tasks, sizes, args.seed, args.levels, args.train_levels)
    except ValueError as e:
        print(f"make_reasoning_tasks.py: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        write_jsonl(records, out / f"{name}.jsonl")
    manifest = {
        "tasks": tasks, "levels": args.levels, "train_levels": args.train_levels or args.levels,
        "seed": args.seed, "per_level": sizes,
        "counts": {name: len(records) for name, records in splits.items()},
    }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    counts = ", ".join(f"{name} {len(r)}" for name, r in splits.items())
    print(f"wrote {counts} examples of {', '.join(tasks)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
