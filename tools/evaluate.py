"""Evaluate a LoopMDM (Hugging Face directory or megatron checkpoint) across loop counts.

    python tools/evaluate.py nelbo --load DIR --data-path PREFIX --tokenizer-model TOKDIR \
        [--split 90,10,0] [--split-name valid] --num-loops 1 2 4 8 --num-samples 16 \
        --seq-length 128 --output-dir OUT
    python tools/evaluate.py mask-attention --load DIR --data-path PREFIX --tokenizer-model TOK \
        --num-loops 1 2 4 --num-samples 8 --seq-length 128 [--t 0.5] --output-dir OUT
    python tools/evaluate.py gsm8k --load DIR --data test.jsonl [--tokenizer TOK] \
        --num-loops 1 4 --gen-length 256 --steps 256 --block-length 32 --output-dir OUT
    python tools/evaluate.py lm-eval --load DIR --tasks TASKS [--num-loops 4] [--mc-samples 128]
    python tools/evaluate.py exact-match --load DIR --data test.jsonl [--tokenizer TOK] \
        --num-loops 1 2 4 [--gen-length N --steps N --block-length N] [--nelbo-samples 8] \
        [--threshold 0.9 | --factor 1.0] [--cache none|prefix|dual] [--cache-refresh block] \
        [--cache-refresh-every K] \
        [--loop-warm-start] --output-dir OUT

`nelbo` writes OUT/nelbo_vs_loops.{csv,md,png}: the validation NELBO per token on the trainer's
fixed t-grid (identical across runs) and its perplexity bound, per loop count.
`mask-attention` writes OUT/mask_attention.{csv,md,png} (share of masked queries' attention mass
on masked keys, per layer and loop). `gsm8k` writes OUT/gsm8k.{csv,md,png} (exact match of the
number after `####`). `exact-match` samples the answer to each `prompt` of a JSON-lines file
(e.g. tools/make_reasoning_tasks.py's test.jsonl) and compares it with `answer`, per loop
count, `task` and `difficulty`: OUT/exact_match.{csv,md,png,json} and
OUT/exact_match_predictions.jsonl (with --nelbo-samples K, also the answers' NELBO per loop
count in the JSON). With a loop-policy flag (`--adaptive-loops --loop-stop argmax --loop-per
sample`, `--loop-schedule 1,2`, `--loop-budget 2`, ...; see tools/generate.py) it also scores
that policy with its loop evaluations per sample: OUT/exact_match_policy.md and the JSON's
`policy`. Exit codes: 0 done, 1 bad input.
"""

import argparse
import json
import sys
from pathlib import Path

import megatron_loopmdm  # noqa: F401  (before torch/megatron imports)
from megatron_loopmdm.evaluation.report import format_table, write_table_and_plot
from megatron_loopmdm.inference.arguments import (
    add_loop_policy_arguments,
    add_speed_arguments,
    loop_policy_from_args,
)

import torch


def _common(parser, data: bool = True):
    parser.add_argument("--load", required=True, help="HF directory or megatron --save directory")
    parser.add_argument("--iteration", type=int)
    parser.add_argument("--num-loops", type=int, nargs="+", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=1234, help="the run's --seed (mask keys)")
    parser.add_argument("--output-dir", default="eval_out")
    if data:
        parser.add_argument("--data-path", nargs="+", required=True)
        parser.add_argument("--tokenizer-model", required=True)
        parser.add_argument("--tokenizer-type", default="HuggingFaceTokenizer")
        parser.add_argument("--split", default="969,30,1")
        parser.add_argument("--split-name", choices=["train", "valid", "test"], default="valid")
        parser.add_argument("--num-samples", type=int, default=16)
        parser.add_argument("--seq-length", type=int, default=128)
        parser.add_argument("--data-seed", type=int, default=None, help="default: --seed")
        parser.add_argument("--micro-batch-size", type=int, default=8)
        parser.add_argument("--time-eps", type=float, default=1e-3)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _common(commands.add_parser("nelbo", help="validation NELBO per loop count"))
    attention = commands.add_parser("mask-attention", help="mask-to-mask attention share")
    _common(attention)
    attention.add_argument("--t", type=float, default=0.5, help="masking time of the inputs")
    gsm8k = commands.add_parser("gsm8k", help="exact match on the number after ####")
    _common(gsm8k, data=False)
    gsm8k.add_argument("--data", required=True, help="JSON lines with question and answer")
    gsm8k.add_argument("--tokenizer", help="HF tokenizer directory (default: --load)")
    gsm8k.add_argument("--limit", type=int)
    gsm8k.add_argument("--gen-length", type=int, default=256)
    gsm8k.add_argument("--steps", type=int, default=256)
    gsm8k.add_argument("--block-length", type=int, default=32)
    gsm8k.add_argument("--batch-size", type=int, default=8)
    gsm8k.add_argument("--template", default="Question: {question}\nAnswer:")
    exact = commands.add_parser("exact-match", help="exact match of sampled answers")
    _common(exact, data=False)
    exact.add_argument("--data", required=True, help="JSON lines with prompt and answer")
    exact.add_argument("--tokenizer", help="HF tokenizer directory (default: --load)")
    exact.add_argument("--limit", type=int)
    exact.add_argument("--gen-length", type=int, help="default: longest answer of a group + 1")
    exact.add_argument("--steps", type=int, help="default: --gen-length")
    exact.add_argument("--block-length", type=int)
    exact.add_argument("--remasking", default="low_confidence")
    exact.add_argument("--batch-size", type=int, default=32)
    add_speed_arguments(exact)  # they need --gen-length
    exact.add_argument("--nelbo-samples", type=int, default=0,
                       help="also the answers' NELBO with K Monte Carlo draws (0: off)")
    add_loop_policy_arguments(exact, fixed=False)  # also this policy: OUT/exact_match_policy.*
    harness = commands.add_parser("lm-eval", help="lm-evaluation-harness tasks (needs lm_eval)")
    _common(harness, data=False)
    harness.add_argument("--tasks", nargs="+", required=True)
    harness.add_argument("--mc-samples", type=int, default=32)
    harness.add_argument("--limit", type=int)
    harness.add_argument("--tokenizer", help="HF tokenizer directory (default: --load)")
    return parser.parse_args(argv)


def _samples(args) -> list:
    """The first --num-samples samples of the chosen split, as the trainer builds them."""
    from megatron_loopmdm.data import DataConfig, build_train_valid_test_datasets
    from megatron_loopmdm.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    config = DataConfig(
        seq_length=args.seq_length, data_path=args.data_path, split=args.split,
        seed=args.seed if args.data_seed is None else args.data_seed,
    )  # fmt: skip
    which = ("train", "valid", "test").index(args.split_name)
    wanted = [None, None, None]
    wanted[which] = args.num_samples
    dataset = build_train_valid_test_datasets(config, tokenizer, wanted)[which]
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"the {args.split_name} split is empty: check --split {args.split}.")
    return [dataset[i] for i in range(min(args.num_samples, len(dataset)))]


def run_nelbo(args, model) -> list:
    from megatron_loopmdm.evaluation.nelbo import nelbo_per_loops

    rows = nelbo_per_loops(
        model, _samples(args), args.num_loops, seed=args.seed, eps=args.time_eps,
        batch_size=args.micro_batch_size,
    )  # fmt: skip
    columns = ["num_loops", "nelbo", "ppl_bound", "tokens"]
    write_table_and_plot(
        rows, args.output_dir, "nelbo_vs_loops", "num_loops", "nelbo", columns,
        title="validation NELBO per token vs loops",
    )  # fmt: skip
    print(format_table(rows, columns))
    return rows


def run_mask_attention(args, model) -> list:
    from megatron_loopmdm.evaluation.attention import mask_attention_share

    tokens = torch.stack([s["tokens"] for s in _samples(args)])
    rows = []
    for loops in args.num_loops:
        rows += mask_attention_share(model, tokens, loops, args.t, args.seed, args.time_eps)
    columns = ["num_loops", "layer", "part", "loop", "share", "mask_fraction"]
    loop_rows = [r for r in rows if r["part"] == "loop"]
    write_table_and_plot(rows, args.output_dir, "mask_attention", "loop", "share", columns)
    # The plot: the loop block's layers only, one line per S.
    write_table_and_plot(
        loop_rows, args.output_dir, "mask_attention_loop_block", "loop", "share", columns,
        series="num_loops", title="mask-to-mask attention in the loop block",
    )  # fmt: skip
    print(format_table(rows, columns))
    return rows


def _hf_tokenizer(args):
    from megatron_loopmdm.data.tokenizers import HuggingFaceTokenizer

    return HuggingFaceTokenizer(str(args.tokenizer or args.load))


def run_gsm8k(args, model) -> list:
    from megatron_loopmdm.evaluation.gsm8k import gsm8k_exact_match
    from megatron_loopmdm.inference import SamplerConfig

    with open(args.data, encoding="utf-8") as f:
        examples = [json.loads(line) for line in f if line.strip()][: args.limit]
    tokenizer = _hf_tokenizer(args)
    sampler = SamplerConfig(
        gen_length=args.gen_length, steps=args.steps, block_length=args.block_length
    )
    rows = gsm8k_exact_match(
        model, examples, tokenizer.tokenize, tokenizer.detokenize, sampler, args.num_loops,
        args.template, args.batch_size, args.seed,
    )  # fmt: skip
    columns = ["num_loops", "exact_match", "correct", "total"]
    write_table_and_plot(rows, args.output_dir, "gsm8k", "num_loops", "exact_match", columns)
    with open(Path(args.output_dir) / "gsm8k_predictions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            for example, text in zip(examples, row["predictions"]):
                record = {"num_loops": row["num_loops"], **example, "prediction": text}
                f.write(json.dumps(record) + "\n")
    print(format_table(rows, columns))
    return rows


def run_exact_match(args, model) -> list:
    from megatron_loopmdm.evaluation.exact_match import (
        answer_nelbo_per_loops,
        exact_match_per_loops,
    )
    from megatron_loopmdm.evaluation.reasoning import read_examples
    from megatron_loopmdm.inference import SamplerConfig

    examples = read_examples(args.data)[: args.limit]
    tokenizer = _hf_tokenizer(args)
    sampler = None
    speed = {"threshold": args.threshold, "factor": args.factor, "cache": args.cache,
             "cache_refresh": args.cache_refresh, "cache_refresh_every": args.cache_refresh_every,
             "loop_warm_start": args.loop_warm_start}  # fmt: skip
    fast = (args.threshold, args.factor, args.cache, args.loop_warm_start,
            args.cache_refresh_every) != (None, None, "none", False, None)  # fmt: skip
    if args.gen_length is None and fast:
        raise ValueError(
            "--threshold, --factor, --cache(-refresh-every) and --loop-warm-start need "
            "--gen-length (and --block-length)"
        )
    if args.gen_length is not None:
        sampler = SamplerConfig(
            gen_length=args.gen_length, steps=args.steps or args.gen_length,
            block_length=args.block_length, remasking=args.remasking, **speed,
        )  # fmt: skip
    stop = [i for i in (tokenizer.eod, tokenizer.pad) if i is not None]
    rows, predictions = exact_match_per_loops(
        model, examples, tokenizer.tokenize, tokenizer.detokenize, args.num_loops, stop,
        sampler, args.batch_size, args.seed,
    )  # fmt: skip
    columns = ["num_loops", "task", "difficulty", "exact_match", "correct", "total"]
    write_table_and_plot(rows, args.output_dir, "exact_match", "num_loops", "exact_match", columns)
    # The plot: every task together, one line per difficulty (and `all`).
    write_table_and_plot(
        [r for r in rows if r["task"] == "all"], args.output_dir, "exact_match_by_difficulty",
        "num_loops", "exact_match", columns, series="difficulty",
        title="exact match vs loops (all tasks)",
    )  # fmt: skip
    out = Path(args.output_dir)
    with open(out / "exact_match_predictions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in predictions)
    report = {"data": str(args.data), "load": str(args.load), "rows": rows,
              "sampler": {k: getattr(sampler, k) for k in ("gen_length", "steps", "block_length")}
              if sampler else None, **speed}  # fmt: skip
    report.update(_exact_match_policy(args, model, examples, tokenizer, stop, sampler))
    if args.nelbo_samples > 0:
        report["nelbo"] = answer_nelbo_per_loops(
            model, examples, tokenizer.tokenize, args.num_loops, tokenizer.eod,
            args.nelbo_samples, args.seed,
        )  # fmt: skip
        print(format_table(report["nelbo"], ["num_loops", "nelbo", "tokens"]))
    (out / "exact_match.json").write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(rows, columns))
    return rows


def _exact_match_policy(args, model, examples, tokenizer, stop, sampler) -> dict:
    """With a loop-policy flag: exact match and loop evaluations of that policy."""
    from megatron_loopmdm.evaluation.exact_match import exact_match_per_policy

    policy = loop_policy_from_args(args, fixed=False)
    if policy.unset:
        return {}
    name = policy.describe(model.config.max_loops)
    rows = exact_match_per_policy(
        model, examples, tokenizer.tokenize, tokenizer.detokenize, {name: policy}, stop,
        sampler, args.batch_size, args.seed,
    )  # fmt: skip
    columns = ["policy", "exact_match", "correct", "total", "loop_evaluations",
               "active_position_loops", "probe_evaluations"]  # fmt: skip
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exact_match_policy.md").write_text(format_table(rows, columns) + "\n")
    print(format_table(rows, columns))
    return {"policy": rows}


def run_lm_eval(args, model):
    try:
        import lm_eval
    except ImportError:
        raise ValueError("lm-eval needs the optional package 'lm_eval': pip install lm_eval")
    from megatron_loopmdm.evaluation.lm_eval_adapter import LoopMDMEvalLM

    rows = []
    for loops in args.num_loops:
        lm = LoopMDMEvalLM(
            model=model, tokenizer=_hf_tokenizer(args), num_loops=loops,
            mc_samples=args.mc_samples, seed=args.seed,
        )  # fmt: skip
        results = lm_eval.simple_evaluate(model=lm, tasks=args.tasks, limit=args.limit)
        rows.append({"num_loops": loops, "results": results["results"]})
        print(json.dumps(rows[-1], indent=1, default=str))
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "lm_eval.json").write_text(json.dumps(rows, indent=1, default=str))
    return rows


COMMANDS = {
    "nelbo": run_nelbo,
    "mask-attention": run_mask_attention,
    "gsm8k": run_gsm8k,
    "lm-eval": run_lm_eval,
    "exact-match": run_exact_match,
}


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_loopmdm.hf import load_for_inference

    try:
        model = load_for_inference(args.load, device=args.device, iteration=args.iteration)
        if getattr(args, "tokenizer_model", None):  # nelbo, mask-attention: the data's tokenizer
            from megatron_loopmdm.data.tokenizers import build_tokenizer
            from megatron_loopmdm.hf.input_checks import check_tokenizer_matches

            tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
            check_tokenizer_matches(model.config, tokenizer)
        if not args.num_loops:
            args.num_loops = [model.config.max_loops]
        if min(args.num_loops) < 1:
            raise ValueError(f"--num-loops {args.num_loops}: every loop count must be >= 1.")
        COMMANDS[args.command](args, model)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
