"""One pilot run scored on the validation split only: how a scale is chosen without the test split.

    python examples/paper/validation_pilot.py --work-dir runs/pilot --task addition --level 4 \
        --train-per-level 200000 --batch-size 128 --steps 2400 --model loopmdm [--seed 0] \
        [--num-loops 1 3] [--lr 1e-3]

Trains one model of `compare_models.py`'s three (`mdm`, `loopmdm`, `deeper`) on one task and
level with the kit's SFT trainer (other sizes from `--scale`, default `cpu`), then prints one
JSON line `VAL {...}`: validation exact match and answer NELBO per S, the final training loss,
the loss curve and seconds per step. Runs are cached in the work directory like the kit's
(a work directory holds one data set: use one per task, level and training-set size).
"""

import json
from dataclasses import replace

import kit
from compare_models import MODELS, specs


def _arguments(parser):
    parser.add_argument("--task", default="addition")
    parser.add_argument("--level", type=int, default=4)
    parser.add_argument("--train-per-level", type=int, default=None)
    parser.add_argument("--validation-per-level", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--model", choices=MODELS, default="loopmdm")
    parser.add_argument("--num-loops", type=int, nargs="+", default=None,
                        help="S to score the LoopMDM at (default 1 and S_max)")  # fmt: skip


def main(argv=None) -> int:
    args = kit.parse_args(__doc__.splitlines()[0], argv, _arguments)
    scale = args.scale
    changes = {"tasks": (args.task,), "levels": (args.level,)}
    for name in ("train_per_level", "validation_per_level", "batch_size", "lr"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    scale = replace(scale, **changes)
    paths = kit.prepare_data(args.work_dir, scale)
    spec = next(s for s in specs(scale) if s.name == args.model)
    seed = scale.seeds[0]
    run = kit.train(spec, scale, paths, args.work_dir, seed, scale.steps)
    loops = args.num_loops or sorted({1, spec.max_loops})
    out = args.work_dir / "validation" / f"{spec.name}-seed{seed}-steps{scale.steps}"
    validation = {"test": paths["validation"]}  # exact_match scores its "test" file
    accuracy = kit.exact_match(run, validation, loops, out)
    nelbo = kit.validation_nelbo(run, paths, loops, scale, out)
    result = {
        "model": spec.name, "task": args.task, "level": args.level, "seed": seed,
        "train_per_level": scale.train_per_level, "batch_size": scale.batch_size,
        "steps": scale.steps, "lr": scale.lr, "final_loss": run.get("final_loss"),
        "s_per_step": run["seconds"] / scale.steps, "val_exact_match": accuracy,
        "val_nelbo": nelbo, "loss_curve": run.get("loss_curve"),
    }  # fmt: skip
    print("VAL " + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
