"""Adaptive loops at equal quality: exact match and loop evaluations per policy vs fixed S_max.

    python bench/adaptive_loops.py --load HF_DIR --data test.jsonl --calibration validation.jsonl \
        [--max-loops S] [--limit N] [--batch-size 32] [--seed 0] [--tokenizer DIR]

Every policy samples the answers of the same test prompts in the same batches with the same
seeds (`evaluation.exact_match.sample_answers`); `loop evaluations` are loop-block runs computed
per sample (a sample frozen by a per-sample rule is not computed further), `pass loops` count
each forward pass at its deepest row, `probes` are the coda + output-layer read-outs that the
`kl` / `argmax` rules add (in the FLOPs ratio). The calibrated schedule is measured on
--calibration (a validation split; a file named test* is refused). Fixed S < S_max rows are
printed for reference and do not count as adaptive. The last line is
`adaptive_loop_savings=<fixed S_max / adaptive loop evaluations of the cheapest adaptive policy
whose exact match is at most 0.5 points below fixed S_max>` (1.000 if none is).

Without --load it trains the tests' tiny model in-process and uses its own digit language
(prompt: two digits, answer: the next ten of the sequence), validation and test drawn apart.
"""

import argparse
import sys
from pathlib import Path

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.evaluation.exact_match import exact_match_per_policy
from megatron_loopmdm.evaluation.report import format_table
from megatron_loopmdm.inference import LoopPolicy, SamplerConfig
from megatron_loopmdm.inference.calibration import calibrate_loop_schedule

import torch

WITHIN_POINTS = 0.5


def _tiny_setup(args):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.inference.tiny_model import EOS, sample_sequences, train_tiny_model

    def split(seed, n):
        rows = sample_sequences(n, torch.Generator().manual_seed(seed), length=12).tolist()
        return [{"prompt": "".join(map(str, r[:2])), "answer": "".join(map(str, r[2:]))}
                for r in rows]  # fmt: skip

    def encode(text):
        return [int(c) for c in text]

    def decode(ids):
        return "".join(str(i) for i in ids if 0 <= i < 10)

    # The tiny language has no EOS: answers are exactly gen_length tokens.
    return train_tiny_model(), split(101, 64), split(202, 128), encode, decode, [EOS], 0


def _load_setup(args):
    from megatron_loopmdm.data.tokenizers import HuggingFaceTokenizer
    from megatron_loopmdm.evaluation.reasoning import read_examples
    from megatron_loopmdm.hf import load_for_inference

    if not args.data or not args.calibration:
        raise ValueError("--load needs --data TEST.jsonl and --calibration VALIDATION.jsonl.")
    if Path(args.calibration).stem.lower().startswith("test"):
        raise ValueError(f"--calibration {args.calibration}: use the validation split.")
    model = load_for_inference(args.load)
    tokenizer = HuggingFaceTokenizer(str(args.tokenizer or args.load))
    stop = [i for i in (tokenizer.eod, tokenizer.pad) if i is not None]
    test = read_examples(args.data)[: args.limit]
    valid = read_examples(args.calibration)[: args.limit]
    return model, valid, test, tokenizer.tokenize, tokenizer.detokenize, stop, 1  # + EOS


def policies(most: int, schedule) -> dict:
    """name -> LoopPolicy; every adaptive one runs at most S_max loops."""
    named = {f"fixed S={s}": LoopPolicy(num_loops=s) for s in range(most, 0, -1)}
    for threshold in (0.01, 0.05, 0.1):
        named[f"state batch {threshold}"] = LoopPolicy(threshold=threshold, max_loops=most)
        named[f"state sample {threshold}"] = LoopPolicy(
            threshold=threshold, per="sample", max_loops=most
        )
    named["state position 0.05"] = LoopPolicy(threshold=0.05, per="position", max_loops=most)
    for threshold in (1e-3, 1e-2):
        named[f"kl sample {threshold}"] = LoopPolicy(
            stop="kl", threshold=threshold, per="sample", max_loops=most
        )
    for patience in (1, 2):
        named[f"argmax sample k={patience}"] = LoopPolicy(
            stop="argmax", patience=patience, per="sample", max_loops=most
        )
    named["argmax position k=1"] = LoopPolicy(stop="argmax", per="position", max_loops=most)
    named["calibrated schedule"] = LoopPolicy(schedule=tuple(schedule))
    budget = max(1.0, (most + 1) / 2)
    named[f"budget {budget:g}/token, argmax k=1"] = LoopPolicy(
        stop="argmax", per="sample", max_loops=most, budget=budget
    )
    return named


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load")
    parser.add_argument("--tokenizer", help="default: --load")
    parser.add_argument("--data", help="test split (JSON lines with prompt and answer)")
    parser.add_argument("--calibration", help="validation split, for the calibrated schedule")
    parser.add_argument("--max-loops", type=int, help="S_max (default the model's)")
    parser.add_argument("--calibration-target", type=float, default=0.99)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        setup = _load_setup(args) if args.load else _tiny_setup(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, valid, test, encode, decode, stop, eos = setup
    most = args.max_loops or model.config.max_loops
    length = max(len(encode(str(e["answer"]))) for e in valid + test) + eos
    sampler = SamplerConfig(gen_length=length, steps=length)
    record = calibrate_loop_schedule(
        model, [encode(e["prompt"]) for e in valid], sampler, num_parts=min(4, length),
        target=args.calibration_target, max_loops=most, batch_size=args.batch_size,
        seed=args.seed,
    )  # fmt: skip
    print(f"calibrated schedule {record['schedule']} on {len(valid)} validation prompts "
          f"(agreement per part and S: {record['agreement']})")  # fmt: skip
    rows = exact_match_per_policy(
        model, test, encode, decode, policies(most, record["schedule"]), stop, sampler,
        args.batch_size, args.seed,
    )  # fmt: skip
    fixed = rows[0]
    for row in rows:
        row["exact_match_points"] = 100 * row["exact_match"]
        row["savings"] = fixed["loop_evaluations"] / max(row["loop_evaluations"], 1e-9)
        row["flops_ratio"] = fixed["model_flops"] / max(row["model_flops"], 1e-9)
    columns = ["policy", "exact_match_points", "correct", "total", "loop_evaluations",
               "pass_loop_evaluations", "active_position_loops", "probe_evaluations",
               "savings", "flops_ratio"]  # fmt: skip
    print(f"{len(test)} test prompts, gen length {length}, S_max {most}, seed {args.seed}")
    print(format_table(rows, columns))
    adaptive = [r for r in rows if not r["policy"].startswith("fixed")]
    keep = [r for r in adaptive
            if r["exact_match_points"] >= fixed["exact_match_points"] - WITHIN_POINTS]  # fmt: skip
    best = max(keep, key=lambda r: r["savings"], default=None)
    if best is None:
        print("no adaptive policy kept exact match within 0.5 points of fixed S_max")
    else:
        print(f"cheapest within {WITHIN_POINTS} points: {best['policy']} "
              f"({best['exact_match_points']:.1f} vs {fixed['exact_match_points']:.1f})")
    print(f"adaptive_loop_savings={best['savings'] if best else 1.0:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
