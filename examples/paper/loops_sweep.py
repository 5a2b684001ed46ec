"""Accuracy and NELBO of a LoopMDM against inference loops S = 1 .. 2 S_max (compute scaling).

    python examples/paper/loops_sweep.py [--smoke] [--work-dir runs/paper] [--seeds 0 1]

Trains (or reuses, from compare_models.py) the LoopMDM of each seed, then scores, at every S,
test exact match, validation answer NELBO and the loop state's relative change at loop S
(||h_S - h_{S-1}|| / ||h_{S-1}||, h_0 the loop's input; validation prompts with the answer
masked: does the state converge?); S > S_max is beyond what training saw. Writes
OUT/loops_sweep.{md,json} and OUT/loops_sweep_{exact_match,val_nelbo,state_change}.png.
"""

import kit


def main(argv=None) -> int:
    args = kit.parse_args(__doc__.splitlines()[0], argv)
    scale, work = args.scale, args.work_dir
    paths = kit.prepare_data(work, scale)
    spec = kit.ModelSpec("loopmdm", scale.num_layers, scale.loop_layers, scale.max_loops)
    loops = list(range(1, 2 * scale.max_loops + 1))
    rows = []
    for seed in scale.seeds:
        run = kit.train(spec, scale, paths, work, seed, scale.steps)
        out = work / "eval" / f"sweep-seed{seed}-steps{scale.steps}"
        accuracy = kit.exact_match(run, paths, loops, out)
        nelbo = kit.validation_nelbo(run, paths, loops, scale, out)
        change = kit.state_changes(run, paths, loops[-1], out)
        rows += [{"model": "loopmdm", "seed": seed, "num_loops": s, "exact_match": accuracy[s],
                  "val_nelbo": nelbo[s], "state_change": change[s]} for s in loops]  # fmt: skip
    summary = kit.summarize(rows, ["model", "num_loops"],
                            ["exact_match", "val_nelbo", "state_change"])  # fmt: skip
    columns = ["num_loops", "seeds", "exact_match", "exact_match_std", "exact_match_min",
               "exact_match_max", "val_nelbo", "val_nelbo_std", "state_change",
               "state_change_std"]  # fmt: skip
    kit.report(summary, columns, args.output_dir, "loops_sweep")
    kit.plot_against_loops(summary, rows, ["exact_match", "val_nelbo", "state_change"], "model",
                           args.output_dir, "loops_sweep", scale.max_loops)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
