"""Same-size MDM vs LoopMDM vs a deeper MDM with the LoopMDM's per-step compute, at equal
training steps and at equal training FLOPs, on the reasoning suite (CPU scale).

    python examples/paper/compare_models.py [--smoke] [--work-dir runs/paper] [--seeds 0 1] \
        [--models mdm loopmdm deeper] [--regimes "equal steps" "equal FLOPs"]

Models: `mdm` (L layers, no loop), `loopmdm` (the same L layers, the size's span looped,
S ~ U{1..S_max}), `deeper` (prelude + S_max x loop + coda layers, no loop: the LoopMDM's
compute at S = S_max). Equal FLOPs: every model gets the LoopMDM's training FLOPs at --steps
(at E[S]), so `mdm` trains for more steps and `deeper` for fewer. Test exact match: the LoopMDM
at S = S_max, the others at S = 1. Writes OUT/compare_models.{md,json,png}.
"""

import kit


def specs(scale):
    start, end = scale.loop_layers
    k = end - start
    return [
        kit.ModelSpec("mdm", scale.num_layers, scale.loop_layers, 1),
        kit.ModelSpec("loopmdm", scale.num_layers, scale.loop_layers, scale.max_loops),
        kit.ModelSpec("deeper", scale.num_layers + (scale.max_loops - 1) * k, scale.loop_layers, 1),
    ]


MODELS = ("mdm", "loopmdm", "deeper")
REGIMES = ("equal steps", "equal FLOPs")


def _arguments(parser):
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="a subset of the models (the LoopMDM is trained in any case)")
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))


def main(argv=None) -> int:
    args = kit.parse_args(__doc__.splitlines()[0], argv, _arguments)
    scale, work = args.scale, args.work_dir
    paths = kit.prepare_data(work, scale)
    rows = []
    for seed in scale.seeds:
        loop = kit.train(specs(scale)[1], scale, paths, work, seed, scale.steps)
        for spec in specs(scale):
            if spec.name not in args.models:
                continue
            for regime in args.regimes:
                steps = scale.steps
                if regime == "equal FLOPs" and spec.name != "loopmdm":
                    per_step = kit.step_flops(spec, scale, paths)
                    steps = max(1, round(loop["train_flops"] / per_step))
                run = kit.train(spec, scale, paths, work, seed, steps)
                loops = spec.max_loops
                out = work / "eval" / f"{spec.name}-seed{seed}-steps{steps}"
                accuracy = kit.exact_match(run, paths, [loops], out)[loops]
                nelbo = kit.validation_nelbo(run, paths, [loops], scale, out)[loops]
                rows.append({"model": spec.name, "regime": regime, "seed": seed, "steps": steps,
                             "train_flops": run["train_flops"], "exact_match": accuracy,
                             "val_nelbo": nelbo, "num_loops": loops})  # fmt: skip
    summary = kit.summarize(rows, ["regime", "model", "steps", "num_loops"],
                            ["exact_match", "val_nelbo", "train_flops"])  # fmt: skip
    columns = ["regime", "model", "steps", "num_loops", "seeds", "train_flops", "exact_match",
               "exact_match_std", "exact_match_min", "exact_match_max", "val_nelbo",
               "val_nelbo_std"]  # fmt: skip
    kit.report(rows, list(rows[0]), args.output_dir, "compare_models_per_seed")
    kit.report(summary, columns, args.output_dir, "compare_models")
    kit.plot(summary, "model", "exact_match", "regime", args.output_dir / "compare_models.png",
             "test exact match (all tasks)", per_seed=rows)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
