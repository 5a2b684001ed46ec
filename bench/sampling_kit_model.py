"""Trains the reasoning-kit model that `bench/sampling_speed.py --data` scores (a real task).

    python bench/sampling_kit_model.py [--work-dir runs/sampling-kit] [--steps 1500]
        [--seed 0] [--validation-per-level 100]

Addition level 1 of `tools/make_reasoning_tasks.py`'s suite (2-digit + 2-digit; the answer is
2-3 digit tokens, then EOS), which the paper kit's LoopMDM (4 layers, hidden 128, loop block =
layers 1-2, S_max 3; byte-level tokenizer) learns on this CPU in about 1,500 steps: a model
with real accuracy and multi-token answers, unlike a model at guess level. The training is the
kit's own (`examples/paper/kit.py`: data, tokenizer, SFT loop, cache by run name); this script
only names the task and the model. It prints the two paths the sampling bench needs:

    python bench/sampling_speed.py --load <hf> --data <validation.jsonl>

(the validation split only; the test split is never used here).
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "paper"))

import kit  # noqa: E402

TASK = kit.Scale(tasks=("addition",), levels=(1,), train_per_level=2000,
                 validation_per_level=100, test_per_level=100)  # fmt: skip
"""The kit's default sizes otherwise (hidden 128, 4 layers, loop layers 1-2, S_max 3, batch
64, lr 1e-3)."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/sampling-kit", help="data and run (cached)")
    parser.add_argument("--steps", type=int, default=TASK.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validation-per-level", type=int,
                        default=TASK.validation_per_level)  # fmt: skip
    args = parser.parse_args(argv)
    if args.steps < 1 or args.validation_per_level < 1:
        parser.error("--steps and --validation-per-level must be >= 1")
    return args


def scale_of(args) -> kit.Scale:
    """The kit scale of this model: TASK with the command line's steps and validation size."""
    return replace(TASK, steps=args.steps, seeds=(args.seed,),
                   validation_per_level=args.validation_per_level)  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    scale = scale_of(args)
    work = Path(args.work_dir)
    paths = kit.prepare_data(work, scale)
    spec = kit.ModelSpec("loopmdm", scale.num_layers, scale.loop_layers, scale.max_loops)
    run = kit.train(spec, scale, paths, work, args.seed, scale.steps)
    loss = run.get("final_loss")
    print(f"trained {run['steps']} steps in {run['seconds']:.0f} s"
          + ("" if loss is None else f", final loss {loss:.4f}"))  # fmt: skip
    print(f"model: {run['dir']}")
    print(f"validation: {paths['validation']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
