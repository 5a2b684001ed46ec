"""Mask-to-mask attention against S: the share of attention mass that masked queries put on
masked keys, in the loop block, per loop, for S = 1 .. 2 S_max.

    python examples/paper/mask_attention.py [--smoke] [--work-dir runs/paper] [--t 0.5]

Uses the trained LoopMDM of each seed (shared with compare_models.py) and the validation split
(prompt + answer + EOS padding, the training layout), masked at time t. Writes
OUT/mask_attention.{md,json,png}: per S and loop, the mean share over the loop block's layers
and the masked fraction of keys (what uniform attention would give).
"""

import sys

from megatron_loopmdm.evaluation.attention import mask_attention_share
from megatron_loopmdm.evaluation.reasoning import read_examples
from megatron_loopmdm.hf import load_for_inference

import kit
import torch


def main(argv=None) -> int:
    t = 0.5
    if argv is None:
        argv = sys.argv[1:]
    if "--t" in argv:
        at = argv.index("--t")
        t, argv = float(argv[at + 1]), argv[:at] + argv[at + 2 :]
    args = kit.parse_args(__doc__.splitlines()[0], argv)
    scale, work = args.scale, args.work_dir
    paths = kit.prepare_data(work, scale)
    spec = kit.ModelSpec("loopmdm", scale.num_layers, scale.loop_layers, scale.max_loops)
    tokenizer = kit._tokenizer(paths)
    tokens, _ = kit._encode_split(read_examples(paths["validation"]), tokenizer,
                                  kit.sequence_length(paths))  # fmt: skip
    rows = []
    for seed in scale.seeds:
        model = load_for_inference(kit.train(spec, scale, paths, work, seed, scale.steps)["dir"])
        for s in range(1, 2 * scale.max_loops + 1):
            calls = [c for c in mask_attention_share(model, tokens, s, t, seed=seed)
                     if c["part"] == "loop"]  # fmt: skip
            for loop in range(1, s + 1):
                shares = [c["share"] for c in calls if c["loop"] == loop]
                rows.append({"num_loops": s, "loop": loop, "seed": seed,
                             "share": sum(shares) / len(shares),
                             "mask_fraction": calls[0]["mask_fraction"]})  # fmt: skip
    summary = kit.summarize(rows, ["num_loops", "loop"], ["share", "mask_fraction"])
    columns = ["num_loops", "loop", "seeds", "share", "share_std", "mask_fraction"]
    kit.report(summary, columns, args.output_dir, "mask_attention")
    last = [dict(r, which="last loop") for r in summary if r["loop"] == r["num_loops"]]
    seeds = [dict(r, which="last loop") for r in rows if r["loop"] == r["num_loops"]]
    kit.plot(last, "num_loops", "share", "which", args.output_dir / "mask_attention.png",
             f"mask-to-mask attention share, loop block, t={t}", per_seed=seeds)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    raise SystemExit(main())
