"""Which span to loop (early / middle / late) and the loop options (input injection add and
concat, loop-index embedding), against the default LoopMDM, on the reasoning suite.

    python examples/paper/loop_span_and_options.py [--smoke] [--work-dir runs/paper] \
        [--only early late inject-add ...]

Every variant has the same layers and S_max and trains for the same steps; test exact match and
validation answer NELBO at S = S_max and at 2 S_max (do more loops than trained hurt?), and the
loop state's relative change at loop 2 S_max (does it converge? `kit.state_changes`). Writes
OUT/loop_span_and_options.{md,json,png}.
Truncated backprop (`--loop-backprop-depth`) is a trainer option of pretrain_loopmdm.py and is
in the GPU-scale commands (docs/paper_reproduction.md), not in this in-process CPU kit.
"""

import kit

VARIANTS = ("early", "middle", "late", "inject-add", "inject-concat", "loop-embedding")


def _arguments(parser):
    parser.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="train and score these variants beside the default LoopMDM (a "
                        "span equal to the default's is the default itself)")


def variants(scale, only=VARIANTS):
    layers, (start, end) = scale.num_layers, scale.loop_layers
    k = end - start
    # The last layer always stays in the coda (it feeds the output layer).
    spans = {"early": (0, k), "middle": ((layers - k) // 2, (layers - k) // 2 + k),
             "late": (layers - 1 - k, layers - 1)}  # fmt: skip
    out, seen = [kit.ModelSpec("loopmdm", layers, scale.loop_layers, scale.max_loops)], set()
    for name, span in spans.items():
        if name in only and tuple(span) != tuple(scale.loop_layers) and span not in seen:
            seen.add(span)
            out.append(kit.ModelSpec(f"span-{name}{span[0]}-{span[1]}", layers, span,
                                     scale.max_loops))  # fmt: skip
    options = {"inject-add": {"loop_input_injection": "add"},
               "inject-concat": {"loop_input_injection": "concat"},
               "loop-embedding": {"loop_embedding": True}}  # fmt: skip
    for name, extra in options.items():
        if name in only:
            out.append(kit.ModelSpec(name, layers, scale.loop_layers, scale.max_loops, extra))
    return out


def main(argv=None) -> int:
    args = kit.parse_args(__doc__.splitlines()[0], argv, _arguments)
    scale, work = args.scale, args.work_dir
    paths = kit.prepare_data(work, scale)
    rows = []
    for seed in scale.seeds:
        for spec in variants(scale, args.only):
            run = kit.train(spec, scale, paths, work, seed, scale.steps)
            out = work / "eval" / f"{spec.name}-seed{seed}-steps{scale.steps}"
            s, s2 = spec.max_loops, 2 * spec.max_loops
            accuracy = kit.exact_match(run, paths, [s, s2], out)
            nelbo = kit.validation_nelbo(run, paths, [s, s2], scale, out)
            change = kit.state_changes(run, paths, s2, out)[s2]
            rows.append({"variant": spec.name, "loop_layers": f"{spec.loop_layers}", "seed": seed,
                         "exact_match": accuracy[s], "val_nelbo": nelbo[s],
                         "exact_match_2smax": accuracy[s2], "val_nelbo_2smax": nelbo[s2],
                         "state_change_2smax": change})  # fmt: skip
    metrics = ["exact_match", "val_nelbo", "exact_match_2smax", "val_nelbo_2smax",
               "state_change_2smax"]  # fmt: skip
    summary = kit.summarize(rows, ["variant", "loop_layers"], metrics)
    columns = ["variant", "loop_layers", "seeds", "exact_match", "exact_match_std",
               "exact_match_min", "exact_match_max", "val_nelbo", "val_nelbo_std",
               "exact_match_2smax", "exact_match_2smax_std", "val_nelbo_2smax",
               "state_change_2smax", "state_change_2smax_std"]  # fmt: skip
    kit.report(rows, list(rows[0]), args.output_dir, "loop_span_and_options_per_seed")
    kit.report(summary, columns, args.output_dir, "loop_span_and_options")
    for r in summary + rows:
        r["all"] = "variants"
    kit.plot(summary, "variant", "exact_match", "all",
             args.output_dir / "loop_span_and_options.png", "test exact match at S = S_max",
             per_seed=rows)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
