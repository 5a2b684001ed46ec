"""Which span to loop (early / middle / late) and the loop options (input injection add and
concat, loop-index embedding), against the default LoopMDM, on the reasoning suite.

    python examples/paper/loop_span_and_options.py [--smoke] [--work-dir runs/paper]

Every variant has the same layers and S_max and trains for the same steps; test exact match and
validation answer NELBO at S = S_max. Writes OUT/loop_span_and_options.{md,json,png}.
Truncated backprop (`--loop-backprop-depth`) is a trainer option of pretrain_loopmdm.py and is
in the GPU-scale commands (docs/paper_reproduction.md), not in this in-process CPU kit.
"""

import kit


def variants(scale):
    layers, (start, end) = scale.num_layers, scale.loop_layers
    k = end - start
    # The last layer always stays in the coda (it feeds the output layer).
    spans = {"early": (0, k), "middle": ((layers - k) // 2, (layers - k) // 2 + k),
             "late": (layers - 1 - k, layers - 1)}  # fmt: skip
    out, seen = [kit.ModelSpec("loopmdm", layers, scale.loop_layers, scale.max_loops)], set()
    for name, span in spans.items():
        if tuple(span) != tuple(scale.loop_layers) and span not in seen:
            seen.add(span)
            out.append(kit.ModelSpec(f"span-{name}{span[0]}-{span[1]}", layers, span,
                                     scale.max_loops))  # fmt: skip
    options = {"inject-add": {"loop_input_injection": "add"},
               "inject-concat": {"loop_input_injection": "concat"},
               "loop-embedding": {"loop_embedding": True}}  # fmt: skip
    for name, extra in options.items():
        out.append(kit.ModelSpec(name, layers, scale.loop_layers, scale.max_loops, extra))
    return out


def main(argv=None) -> int:
    args = kit.parse_args(__doc__.splitlines()[0], argv)
    scale, work = args.scale, args.work_dir
    paths = kit.prepare_data(work, scale)
    rows = []
    for seed in scale.seeds:
        for spec in variants(scale):
            run = kit.train(spec, scale, paths, work, seed, scale.steps)
            out = work / "eval" / f"{spec.name}-seed{seed}-steps{scale.steps}"
            s = spec.max_loops
            accuracy = kit.exact_match(run, paths, [s], out)[s]
            nelbo = kit.validation_nelbo(run, paths, [s], scale, out)[s]
            rows.append({"variant": spec.name, "loop_layers": f"{spec.loop_layers}", "seed": seed,
                         "exact_match": accuracy, "val_nelbo": nelbo})  # fmt: skip
    summary = kit.summarize(rows, ["variant", "loop_layers"], ["exact_match", "val_nelbo"])
    columns = ["variant", "loop_layers", "seeds", "exact_match", "exact_match_std",
               "exact_match_min", "exact_match_max", "val_nelbo", "val_nelbo_std"]  # fmt: skip
    kit.report(summary, columns, args.output_dir, "loop_span_and_options")
    for r in summary:
        r["all"] = "variants"
    kit.plot(summary, "variant", "exact_match", "all",
             args.output_dir / "loop_span_and_options.png", "test exact match at S = S_max")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
