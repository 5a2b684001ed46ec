"""Tokens/s of the fast sampling paths against the plain sampler, same settings, one run.

    python bench/sampling_speed.py [--load HF_OR_MEGATRON_DIR] [--gen-lengths 64,256] \
        [--batch-sizes 1,8] [--block-length 32] [--threshold 0.9] [--max-loops 4] \
        [--loop-threshold 0.05] [--repeats 1]

Without --load it trains the tests' tiny model in-process (a synthetic language whose
continuation of a 2-token prompt is known, so exact match is measured too; with --load the
prompts are random token pairs and only agreement is measured). Paths: plain, threshold,
prefix cache, dual cache (the caches with threshold decoding), each with fixed and adaptive
loops, at gen length / batch size combinations; steps = gen length. Reported per row:
tokens/s, speedup over the plain sampler with the same loops/length/batch, token agreement
with it, and exact match. The last line is `sampling_speedup=<best speedup whose agreement is
>= 99%, or whose exact match is within 1 point of plain where plain's is >= 0.5>`.
"""

import argparse
import sys
import time
from pathlib import Path

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.inference import LoopPolicy, SamplerConfig, generate

import torch

PATHS = {
    "plain": {},
    "threshold": {"threshold": None},
    "prefix": {"threshold": None, "cache": "prefix"},
    "dual": {"threshold": None, "cache": "dual"},
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load")
    parser.add_argument("--gen-lengths", default="64,256")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--max-loops", type=int, default=4)
    parser.add_argument("--loop-threshold", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (best kept)")
    return parser.parse_args()


def load_model(args):
    if args.load:
        from megatron_loopmdm.hf import load_for_inference

        return load_for_inference(args.load), None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.inference.tiny_model import sample_sequences, train_tiny_model

    return train_tiny_model(), sample_sequences


def main() -> int:
    args = parse_args()
    model, language = load_model(args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loop_modes = {
        "fixed": LoopPolicy(num_loops=args.max_loops),
        "adaptive": LoopPolicy(threshold=args.loop_threshold, max_loops=args.max_loops),
    }
    best, rows = 0.0, []
    print("gen  batch loops    path       tok/s   speedup agree  exact  steps passes")
    for gen_length in map(int, args.gen_lengths.split(",")):
        for batch in map(int, args.batch_sizes.split(",")):
            generator = torch.Generator().manual_seed(gen_length + batch)
            if language is not None:
                truth = language(batch, generator, length=2 + gen_length)
            else:
                truth = torch.randint(0, model.config.vocab_size - 1, (batch, 2 + gen_length),
                                      generator=generator)  # fmt: skip
            prompts = truth[:, :2].tolist()
            block = min(args.block_length, gen_length)
            for loop_name, policy in loop_modes.items():
                plain = None
                for path, options in PATHS.items():
                    options = {k: (args.threshold if v is None else v) for k, v in options.items()}
                    config = SamplerConfig(gen_length=gen_length, steps=gen_length,
                                           block_length=block, loops=policy, **options)  # fmt: skip
                    seconds, result = float("inf"), None
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        result = generate(model, prompts, config)
                        seconds = min(seconds, time.perf_counter() - start)
                    rate = batch * gen_length / seconds
                    plain = plain or (result, rate)
                    agree = (result.generated == plain[0].generated).float().mean().item()
                    exact = float("nan")
                    if language is not None:
                        exact = (result.generated == truth[:, 2:]).float().mean().item()
                        plain_exact = (plain[0].generated == truth[:, 2:]).float().mean().item()
                    speedup = rate / plain[1]
                    # Exact match counts only where the plain sampler solves the task at all.
                    ok = agree >= 0.99 or (
                        language is not None and plain_exact >= 0.5 and exact >= plain_exact - 0.01
                    )
                    if path != "plain" and ok:
                        best = max(best, speedup)
                    print(f"{gen_length:<4} {batch:<5} {loop_name:<8} {path:<9} {rate:8.1f} "
                          f"{speedup:7.2f}x {agree:6.3f} {exact:6.3f} {result.steps_run:5d} "
                          f"{result.forward_passes:6d}", flush=True)  # fmt: skip
                    rows.append((gen_length, batch, loop_name, path, rate, speedup, agree))
    print(f"sampling_speedup={best:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
