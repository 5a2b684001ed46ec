"""Tokens/s of the fast sampling paths against the plain sampler, same settings, one run.

    python bench/sampling_speed.py [--load HF_OR_MEGATRON_DIR [--data VALIDATION.jsonl]
        [--tokenizer DIR] [--limit N]] [--gen-lengths 64,256] [--batch-sizes 1,8]
        [--block-length 32] [--thresholds 0.9,0.95,0.99] [--max-loops 4]
        [--loop-threshold 0.05] [--loop-modes fixed,adaptive] [--cache-refresh-every 2]
        [--repeats 1] [--json OUT.json]

Paths: plain, threshold (parallel decoding), prefix and dual key/value caches (with threshold
decoding, block refresh), at each threshold of the sweep, with fixed and adaptive loops, at
each gen length / batch size (`--loop-modes fixed` alone halves a run whose plain rows are
slow); steps = gen length, blocks of --block-length. With --cache-refresh-every K, also the
prefix and dual caches refilled at every K-th step of a block (`prefix/rK`, `dual/rK`). With
--loop-warm-start, every adaptive path is also run with the loop warm start (`+warm`), against
the same cold plain sampler.

Workloads:
- `--load MODEL --data FILE.jsonl` (SFT JSON lines with `prompt` and `answer`, e.g. the
  validation split of tools/make_reasoning_tasks.py; never tune on test): exact match of the
  answers, extracted and compared as `tools/evaluate.py exact-match` does (its
  `sample_answers`); the answer is short, so most of the generated block is EOS (Fast-dLLM's
  setting). `agree` is the share of predictions equal to the plain sampler's.
- `--load MODEL` alone: random 2-token prompts; only token agreement with the plain sampler.
- neither: the tests' tiny model, trained in-process on a synthetic language; `exact` is its
  token accuracy against the language (information only: at these lengths it does not solve
  the language, so it is not a task), and rows qualify by token agreement.

`flops-x` is plain's model FLOPs over the row's (the compute saved, which machine load does
not blur; a busy machine blurs tokens/s). A row's speedup is only ever against the plain
sampler at the same gen length, batch size and loop setting, on the same prompts and seeds.
The last line is `sampling_speedup=<best tokens/s speedup of a row whose exact match is within
1 point of plain's (plain's >= 0.5), or, without a task, whose token agreement is >= 99%>`,
or `sampling_speedup=none` after a line saying why. Before it: that row's flops-x and the best
flops-x of a qualifying row, to read the tokens/s figure against (on a busy machine a plain
row timed in a heavy-load window inflates every ratio against it).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.inference import LoopPolicy, SamplerConfig, generate

import torch

PATHS = {"plain": {}, "threshold": {}, "prefix": {"cache": "prefix"}, "dual": {"cache": "dual"}}
LOOP_MODES = ("fixed", "adaptive")
MIN_AGREEMENT = 0.99
"""Without a task: the token agreement with the plain sampler a row needs."""
MAX_EXACT_DROP = 0.01
"""With a task: how far below plain's exact match a row may fall (1 point)."""
MIN_PLAIN_EXACT = 0.5
"""With a task: plain's exact match must reach this, or the task says nothing."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load", help="HF or megatron directory (default: the tiny model)")
    parser.add_argument("--data", help="JSON lines with prompt and answer (needs --load)")
    parser.add_argument("--tokenizer", help="HF tokenizer directory (default: --load)")
    parser.add_argument("--limit", type=int, help="the first N examples of --data")
    parser.add_argument("--seed", type=int, default=1234, help="sampler noise seed (per group)")
    parser.add_argument("--gen-lengths", default="64,256")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--thresholds", default="0.9", help="the sweep, e.g. 0.9,0.95,0.99")
    parser.add_argument("--max-loops", type=int, default=4)
    parser.add_argument("--loop-threshold", type=float, default=0.05)
    parser.add_argument("--loop-modes", default="fixed,adaptive",
                        help="loop settings to run: fixed, adaptive or both")
    parser.add_argument("--cache-refresh-every", type=int, default=None, metavar="K",
                        help="also the caches refilled at every K-th step of a block")
    parser.add_argument("--loop-warm-start", action="store_true",
                        help="also every adaptive path with the loop warm start")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (best kept)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.data and not args.load:
        parser.error("--data needs --load (the model whose answers are scored)")
    try:
        args.gen_lengths = [int(v) for v in args.gen_lengths.split(",")]
        args.batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
        args.thresholds = [float(v) for v in args.thresholds.split(",")]
    except ValueError as e:
        parser.error(f"--gen-lengths/--batch-sizes/--thresholds take comma lists ({e})")
    given = args.loop_modes
    args.loop_modes = [v.strip() for v in given.split(",") if v.strip()]
    if not args.loop_modes or not set(args.loop_modes) <= set(LOOP_MODES):
        parser.error(f"--loop-modes takes fixed and/or adaptive, comma-separated (got {given!r})")
    return args


def qualifying_speedup(rows, task: bool, measure: str = "tokens"):
    """-> (best speedup, its row) among rows that meet the bar, or (None, why not).

    Rows are dicts with `gen_length`, `batch`, `loops`, `path`, `tokens_per_second`,
    `agreement`, `exact` (None without a task) and, for `measure="flops"`, `model_flops`. A
    row's speedup is its tokens/s over the plain row's of the same gen length, batch and loops
    (never another baseline), or with `measure="flops"` plain's model FLOPs over the row's (the
    compute saved, which machine load does not blur); a row without such a plain row does not
    count. With a task, a row qualifies when plain's exact match there is >= 0.5 and the row's
    is at most 1 point below; without one, when its token agreement with plain is >= 99%.
    """
    plain = {_setting(r): r for r in rows if r["path"] == "plain"}
    best, best_row, reasons = None, None, set()
    for row in rows:
        base = plain.get(_setting(row))
        if row["path"] == "plain" or base is None:
            continue
        if task:
            if base["exact"] < MIN_PLAIN_EXACT:
                reasons.add(f"plain's exact match is below {MIN_PLAIN_EXACT} at {_setting(row)}")
                continue
            ok = row["exact"] >= base["exact"] - MAX_EXACT_DROP
        else:
            ok = row["agreement"] >= MIN_AGREEMENT
        if not ok:
            reasons.add("exact match > 1 point below plain's" if task else "agreement < 99%")
            continue
        if measure == "flops":
            if not row.get("model_flops") or not base.get("model_flops"):
                continue
            speedup = base["model_flops"] / row["model_flops"]
        else:
            speedup = row["tokens_per_second"] / base["tokens_per_second"]
        if best is None or speedup > best:
            best, best_row = speedup, row
    if best is None:
        return None, "; ".join(sorted(reasons)) or "no fast-path row with a plain row to compare"
    return best, best_row


def _setting(row) -> tuple:
    return row["gen_length"], row["batch"], row["loops"]


def _flops_ratio(rows, row) -> float:
    """Plain's model FLOPs over `row`'s, plain at the row's gen length, batch and loops."""
    plain = next(r for r in rows if r["path"] == "plain" and _setting(r) == _setting(row))
    return plain["model_flops"] / row["model_flops"]


def load_workload(args):
    """-> (model, make_run): `make_run(gen_length, batch)` gives `run(config) -> measured`."""
    if not args.load:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.inference.tiny_model import sample_sequences, train_tiny_model

        model = train_tiny_model()
        return model, lambda g, b: _token_run(model, g, b, sample_sequences)
    from megatron_loopmdm.hf import load_for_inference

    model = load_for_inference(args.load)
    if not args.data:
        return model, lambda g, b: _token_run(model, g, b, None)
    from megatron_loopmdm.data.tokenizers import HuggingFaceTokenizer
    from megatron_loopmdm.evaluation.reasoning import read_examples

    examples = read_examples(args.data)[: args.limit]
    tokenizer = HuggingFaceTokenizer(str(args.tokenizer or args.load))
    return model, lambda g, b: _answer_run(model, examples, tokenizer, b, args.seed)


def _token_run(model, gen_length: int, batch: int, language):
    """Generated tokens of `batch` 2-token prompts; `exact`: accuracy against the language."""
    generator = torch.Generator().manual_seed(gen_length + batch)
    if language is not None:
        truth = language(batch, generator, length=2 + gen_length)
    else:
        vocab = model.config.vocab_size
        truth = torch.randint(0, vocab - 1, (batch, 2 + gen_length), generator=generator)
    prompts = truth[:, :2].tolist()

    def run(config):
        result = generate(model, prompts, config)
        exact = None
        if language is not None:
            exact = (result.generated == truth[:, 2:]).float().mean().item()
        return {"outputs": result.generated, "exact": exact,
                "loop_evaluations": result.loop_evaluations_per_sample,
                "model_flops": result.model_flops,
                "steps": result.steps_run, "tokens": batch * gen_length}  # fmt: skip

    return run


def _answer_run(model, examples, tokenizer, batch: int, seed: int):
    """Exact match of the answers, scored by `tools/evaluate.py exact-match`'s own function."""
    from megatron_loopmdm.evaluation.exact_match import sample_answers

    stop = [i for i in (tokenizer.eod, tokenizer.pad) if i is not None]

    def run(config):
        texts, correct, costs = sample_answers(
            model, examples, tokenizer.tokenize, tokenizer.detokenize, config.loops, stop,
            config, batch, seed,
        )  # fmt: skip
        return {"outputs": texts, "exact": sum(correct) / len(correct),
                "loop_evaluations": costs["loop_evaluations"], "steps": None,
                "model_flops": costs["model_flops"],
                "tokens": len(examples) * config.gen_length}  # fmt: skip

    return run


def _agreement(outputs, plain) -> float:
    if isinstance(outputs, torch.Tensor):
        return (outputs == plain).float().mean().item()
    return sum(a == b for a, b in zip(outputs, plain)) / len(plain)


def _configs(args, gen_length: int):
    """-> [(loops name, path, threshold, SamplerConfig)], plain first in each loop setting."""
    loop_modes = {
        "fixed": LoopPolicy(num_loops=args.max_loops),
        "adaptive": LoopPolicy(threshold=args.loop_threshold, max_loops=args.max_loops),
    }
    block = min(args.block_length, gen_length)
    configs = []
    for loops in args.loop_modes:
        policy = loop_modes[loops]
        base = dict(gen_length=gen_length, steps=gen_length, block_length=block, loops=policy)
        paths = [("plain", None, {})] + [
            (path, threshold, {"threshold": threshold, **options})
            for threshold in args.thresholds
            for path, options in _paths(args.cache_refresh_every).items()
            if path != "plain"
        ]
        for path, threshold, options in paths:
            configs.append((loops, path, threshold, SamplerConfig(**base, **options)))
        if loops == "adaptive" and args.loop_warm_start:
            for path, threshold, options in paths:
                config = SamplerConfig(**base, **options, loop_warm_start=True)
                configs.append((loops, f"{path}+warm", threshold, config))
    return configs


def _paths(refresh_every) -> dict:
    """PATHS, plus the caches refilled at every k-th step of a block when k is given."""
    if refresh_every is None:
        return PATHS
    extra = {f"{path}/r{refresh_every}": {**PATHS[path], "cache_refresh_every": refresh_every}
             for path in ("prefix", "dual")}  # fmt: skip
    return {**PATHS, **extra}


def measure(args, make_run, task: bool) -> list:
    rows = []
    print("gen  batch loops    path           thr     tok/s  speedup agree  exact  loops/sample "
          "steps flops-x")
    for gen_length in args.gen_lengths:
        for batch in args.batch_sizes:
            run, plain = make_run(gen_length, batch), None
            for loops, path, threshold, config in _configs(args, gen_length):
                seconds, measured = float("inf"), None
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    measured = run(config)
                    seconds = min(seconds, time.perf_counter() - start)
                if path == "plain":
                    plain = {"outputs": measured["outputs"], "rate": measured["tokens"] / seconds,
                             "flops": measured["model_flops"]}  # fmt: skip
                row = {"gen_length": gen_length, "batch": batch, "loops": loops, "path": path,
                       "threshold": threshold, "tokens_per_second": measured["tokens"] / seconds,
                       "agreement": _agreement(measured["outputs"], plain["outputs"]),
                       "exact": measured["exact"], "steps": measured["steps"],
                       "loop_evaluations": measured["loop_evaluations"],
                       "model_flops": measured["model_flops"]}  # fmt: skip
                rows.append(row)
                flops_ratio = None
                if plain["flops"] and row["model_flops"]:
                    flops_ratio = plain["flops"] / row["model_flops"]
                _print_row(row, row["tokens_per_second"] / plain["rate"], flops_ratio)
    return rows


def _print_row(row, speedup: float, flops_ratio) -> None:
    exact = "   -  " if row["exact"] is None else f"{row['exact']:6.3f}"
    threshold = "  -  " if row["threshold"] is None else f"{row['threshold']:.3f}"
    steps = "-" if row["steps"] is None else row["steps"]
    flops = "    -  " if flops_ratio is None else f"{flops_ratio:6.2f}x"
    print(f"{row['gen_length']:<4} {row['batch']:<5} {row['loops']:<8} {row['path']:<14} "
          f"{threshold} {row['tokens_per_second']:9.1f} {speedup:7.2f}x {row['agreement']:6.3f} "
          f"{exact} {row['loop_evaluations']:12.1f} {steps:>5} {flops}", flush=True)  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, make_run = load_workload(args)
        for gen_length in args.gen_lengths:
            _configs(args, gen_length)  # every setting checked before the first timing
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    task = bool(args.data)
    print(f"model: {args.load or 'tiny (in-process)'}; workload: "
          f"{args.data or 'random prompts' if args.load else 'synthetic language'}; "
          f"torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip
    rows = measure(args, make_run, task)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    best, row = qualifying_speedup(rows, task)
    if best is None:
        print(f"no row qualifies: {row}")
        print("sampling_speedup=none")
        return 0
    print(f"best qualifying row: {json.dumps(row)}")
    # On a busy machine tokens/s ratios swing with the load; the FLOPs ratio does not.
    flops, flops_row = qualifying_speedup(rows, task, measure="flops")
    if flops is not None:
        print(f"flops-x of that row: {_flops_ratio(rows, row):.2f}; best qualifying flops-x: "
              f"{flops:.2f} ({flops_row['path']}, threshold {flops_row['threshold']}, gen "
              f"{flops_row['gen_length']}, batch {flops_row['batch']}, {flops_row['loops']})")
    print(f"sampling_speedup={best:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
