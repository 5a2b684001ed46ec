"""Training options that should make loops converge and extrapolate (issue #12, Build 2): the
default LoopMDM against loop-state noise, an intermediate-loop loss and heavy-tailed S, each
trained with the product's command (`pretrain_loopmdm.py --sft`: the in-process trainer has
none of these training-only options), at equal steps.

    python examples/paper/loop_convergence.py [--smoke] [--work-dir runs/paper] [--seeds 0 1] \
        [--variants loopmdm state-noise intermediate-loss ...]

Every variant is scored at S = 1 .. 2 S_max: validation and test exact match, validation answer
NELBO, and the loop state's relative change at each loop (`kit.state_changes`). Two questions,
answered on the validation split only (the test split is reported, never used to choose):
(a) does more looping not hurt: `val_exact_drop` = exact match at S_max minus the worst at
S_max < S <= 2 S_max (<= 0.01, one prompt in 100, counts as "holds"), and `nelbo_rise` = the
worst NELBO beyond S_max minus the NELBO at S_max; (b) does the state converge: its relative
change at loop 2 S_max, and that over the change at loop 2. The option values are fixed before
any run (no tuning): noise sigma 0.1 (the trained loop input's RMS is about 0.9 on cpu-add5),
weight 0.5. Writes OUT/loop_convergence.{md,json} (per variant, mean over seeds),
OUT/loop_convergence_per_seed.{md,json} and OUT/loop_convergence_{val_exact_match,val_nelbo,
state_change}.png (against S, one line per variant).
"""

import kit

VARIANTS = {
    "loopmdm": (),
    "state-noise": ("--loop-state-noise", 0.1),
    "intermediate-loss": ("--intermediate-loop-loss-weight", 0.5),
    "heavy-tailed": ("--loop-sampling", "poisson-lognormal"),
    "noise+intermediate": ("--loop-state-noise", 0.1, "--intermediate-loop-loss-weight", 0.5),
}
DEFAULT_VARIANTS = ("loopmdm", "state-noise", "intermediate-loss", "heavy-tailed")
HOLDS = 0.01
"""The largest exact-match drop beyond S_max that still counts as "more loops do not hurt"."""


def _arguments(parser):
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        default=list(DEFAULT_VARIANTS), help="the options compared")


def specs(scale, names):
    return [kit.ModelSpec(name, scale.num_layers, scale.loop_layers, scale.max_loops,
                          trainer_flags=VARIANTS[name]) for name in names]  # fmt: skip


def measures(val_exact, nelbo, change, s_max):
    """The per-seed answers to (a) and (b) from {S: value} scores."""
    beyond = range(s_max + 1, 2 * s_max + 1)
    return {
        "val_exact_drop": val_exact[s_max] - min(val_exact[s] for s in beyond),
        "nelbo_rise": max(nelbo[s] for s in beyond) - nelbo[s_max],
        "state_change_2smax": change[2 * s_max],
        "change_ratio": change[2 * s_max] / change[2] if change[2] > 0 else float("nan"),
    }


def main(argv=None) -> int:
    args = kit.parse_args(__doc__.splitlines()[0], argv, _arguments, trainer="pretrain_loopmdm")
    scale, work = args.scale, args.work_dir
    paths = kit.prepare_data(work, scale)
    s_max = scale.max_loops
    loops = list(range(1, 2 * s_max + 1))
    rows, curves = [], []
    for seed in scale.seeds:
        for spec in specs(scale, args.variants):
            run = kit.train(spec, scale, paths, work, seed, scale.steps)
            out = work / "eval" / f"{spec.name}-{scale.trainer}-seed{seed}-steps{scale.steps}"
            val_exact = kit.exact_match(run, paths, loops, out, split="validation")
            test_exact = kit.exact_match(run, paths, loops, out)
            nelbo = kit.validation_nelbo(run, paths, loops, scale, out)
            change = kit.state_changes(run, paths, loops[-1], out)
            curves += [{"variant": spec.name, "seed": seed, "num_loops": s,
                        "val_exact_match": val_exact[s], "test_exact_match": test_exact[s],
                        "val_nelbo": nelbo[s], "state_change": change[s]}
                       for s in loops]  # fmt: skip
            rows.append({"variant": spec.name, "seed": seed,
                         "val_exact_smax": val_exact[s_max], "test_exact_smax": test_exact[s_max],
                         "test_exact_2smax": test_exact[2 * s_max], "val_nelbo_smax": nelbo[s_max],
                         **measures(val_exact, nelbo, change, s_max)})  # fmt: skip
    metrics = ["val_exact_smax", "val_exact_drop", "nelbo_rise", "state_change_2smax",
               "change_ratio", "test_exact_smax", "test_exact_2smax", "val_nelbo_smax"]
    summary = kit.summarize(rows, ["variant"], metrics)
    for r in summary:
        drops = [x["val_exact_drop"] for x in rows if x["variant"] == r["variant"]]
        r["holds"] = f"{sum(d <= HOLDS for d in drops)}/{len(drops)}"
    columns = ["variant", "seeds", "val_exact_smax", "val_exact_smax_std", "val_exact_drop",
               "val_exact_drop_max", "holds", "nelbo_rise", "nelbo_rise_max",
               "state_change_2smax", "change_ratio", "test_exact_smax", "test_exact_smax_std",
               "test_exact_2smax", "val_nelbo_smax"]  # fmt: skip
    kit.report(rows, list(rows[0]), args.output_dir, "loop_convergence_per_seed")
    kit.report(summary, columns, args.output_dir, "loop_convergence")
    by_s = kit.summarize(curves, ["variant", "num_loops"],
                         ["val_exact_match", "test_exact_match", "val_nelbo", "state_change"])
    kit.report(by_s, ["variant", "num_loops", "seeds", "val_exact_match", "val_exact_match_std",
                      "test_exact_match", "val_nelbo", "state_change"],
               args.output_dir, "loop_convergence_by_loops")  # fmt: skip
    kit.plot_against_loops(by_s, curves, ["val_exact_match", "val_nelbo", "state_change"],
                           "variant", args.output_dir, "loop_convergence", s_max)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
