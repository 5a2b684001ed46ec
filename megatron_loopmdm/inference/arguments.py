"""The sampling tools' command-line flags, and the configs they build.

The one place in `inference/` that reads an `argparse` namespace: `tools/generate.py`,
`tools/evaluate.py exact-match` and the benches add these flags and turn the parsed namespace
into a `LoopPolicy` here; the sampler itself takes only `SamplerConfig` and `LoopPolicy`.
"""

import argparse

from megatron_loopmdm.hf.generation_loopmdm import CACHE_REFRESHES, CACHES
from megatron_loopmdm.hf.loop_policy_loopmdm import (
    GRANULARITIES,
    SCHEDULE_FILE,
    STOP_RULES,
    LoopPolicy,
)


def add_loop_policy_arguments(parser: argparse.ArgumentParser, fixed: bool = True) -> None:
    """The loop-policy flags (`fixed`: also `--num-loops S`)."""
    group = parser.add_argument_group("loop policy")
    modes = group.add_mutually_exclusive_group()
    if fixed:
        modes.add_argument("--num-loops", type=int, help="fixed S (default the model's S_max)")
    modes.add_argument("--adaptive-loops", action="store_true",
                       help="stop looping by --loop-stop (default: relative state change)")
    modes.add_argument("--loop-schedule", help="S per part of the steps, e.g. 1,2,4,2")
    modes.add_argument("--loop-budget", type=float, default=None,
                       help="at most this many loop evaluations per generated token and sample")
    group.add_argument("--loop-stop", choices=STOP_RULES, default="state",
                       help="adaptive rule: state change, KL of predictions, argmax unchanged")
    group.add_argument("--loop-per", choices=GRANULARITIES, default="batch",
                       help="adaptive granularity: freeze converged samples or positions")
    group.add_argument("--loop-threshold", type=float, default=0.01,
                       help="state: relative change; kl: nats")
    group.add_argument("--loop-patience", type=int, default=1,
                       help="argmax: loops the prediction stays unchanged")
    group.add_argument("--min-loops", type=int, default=1)
    group.add_argument("--max-loops", type=int, default=None)
    group.add_argument("--no-loop-schedule", action="store_true",
                       help=f"ignore the model's calibrated {SCHEDULE_FILE}")  # fmt: skip


def loop_policy_from_args(args, fixed: bool = True) -> LoopPolicy:
    """The `LoopPolicy` of parsed `add_loop_policy_arguments` flags (ValueError if invalid).

    `fixed`: the flags include `--num-loops S` (False where `--num-loops` is a list of S).
    """
    calibrated = not args.no_loop_schedule
    if args.loop_schedule:
        return LoopPolicy(schedule=LoopPolicy.parse_schedule(args.loop_schedule).schedule)
    if args.adaptive_loops or args.loop_budget is not None:
        threshold = None if args.loop_stop == "argmax" else args.loop_threshold
        return LoopPolicy(
            threshold=threshold, min_loops=args.min_loops, max_loops=args.max_loops,
            stop=args.loop_stop, per=args.loop_per, patience=args.loop_patience,
            budget=args.loop_budget,
        )  # fmt: skip
    return LoopPolicy(num_loops=args.num_loops if fixed else None, calibrated=calibrated)


def add_speed_arguments(parser) -> None:
    """The sampler's speed flags (parallel decoding, key/value caches, loop warm start) that
    tools/generate.py and tools/evaluate.py exact-match share."""
    parallel = parser.add_mutually_exclusive_group()
    parallel.add_argument("--threshold", type=float, default=None,
                          help="parallel decoding: commit every token with confidence >= this")
    parallel.add_argument("--factor", type=float, default=None,
                          help="parallel decoding by Fast-dLLM's factor rule")
    parser.add_argument("--cache", choices=CACHES, default="none",
                        help="key/value cache of every layer and loop")
    parser.add_argument("--cache-refresh", choices=CACHE_REFRESHES, default="block")
    parser.add_argument("--cache-refresh-every", type=int, default=None, metavar="K",
                        help="with --cache-refresh block: also refill the cache at every K-th "
                        "step of a block (keys at most K - 1 steps stale)")
    parser.add_argument("--loop-warm-start", action="store_true",
                        help="start each step's loop block from the previous step's loop state "
                        "where the token did not change (adaptive loops stop earlier)")
