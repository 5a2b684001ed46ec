"""Loop evaluations and wall time of adaptive loops against the fixed maximum, same settings.

    python bench/adaptive_loops.py [--load HF_OR_MEGATRON_DIR] [--max-loops 8] \
        [--loop-threshold 0.05] [--gen-length 32] [--steps 32] [--batch-size 8]

Without --load it trains the tests' tiny model in-process. The last line is
`adaptive_loop_savings=<fixed loop evaluations / adaptive loop evaluations>`.
"""

import argparse
import sys
from pathlib import Path

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.inference import LoopPolicy, SamplerConfig, generate

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load")
    parser.add_argument("--max-loops", type=int, default=8)
    parser.add_argument("--min-loops", type=int, default=1)
    parser.add_argument("--loop-threshold", type=float, default=0.05)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if args.load:
        from megatron_loopmdm.hf import load_for_inference

        model = load_for_inference(args.load)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.inference.tiny_model import train_tiny_model

        model = train_tiny_model()
    vocab = model.config.vocab_size
    prompts = torch.randint(
        0, min(vocab, 10), (args.batch_size, 2), generator=torch.Generator().manual_seed(0)
    )
    results = {}
    for name, policy in (
        ("fixed", LoopPolicy(num_loops=args.max_loops)),
        ("adaptive", LoopPolicy(threshold=args.loop_threshold, min_loops=args.min_loops,
                                max_loops=args.max_loops)),
    ):  # fmt: skip
        config = SamplerConfig(
            gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
            loops=policy,
        )  # fmt: skip
        result = generate(model, prompts, config)
        results[name] = result
        print(f"{name}: loop evaluations {result.loop_evaluations}, "
              f"time {result.seconds:.3f} s, model FLOPs {result.model_flops:.4g}")  # fmt: skip
    fixed, adaptive = results["fixed"], results["adaptive"]
    print(f"time ratio (fixed / adaptive): {fixed.seconds / adaptive.seconds:.2f}")
    print(f"adaptive_loop_savings={fixed.loop_evaluations / adaptive.loop_evaluations:.3f}")


if __name__ == "__main__":
    main()
