"""Trains the reasoning-kit model that `bench/sampling_speed.py --data` scores (a real task).

    python bench/sampling_kit_model.py [--work-dir runs/sampling-kit] [--steps 1500]
        [--seed 0] [--validation-per-level 100] [--pad-lengths 70,262 --long-steps 300]

Addition level 1 of `tools/make_reasoning_tasks.py`'s suite (2-digit + 2-digit; the answer is
2-3 digit tokens, then EOS), which the paper kit's LoopMDM (4 layers, hidden 128, loop block =
layers 1-2, S_max 3; byte-level tokenizer) learns on this CPU in about 1,500 steps: a model
with real accuracy and multi-token answers, unlike a model at guess level. The training is the
kit's own (`examples/paper/kit.py`: data, tokenizer, SFT loop, cache by run name); this script
only names the task and the model.

The kit pads each example with EOS only to the longest example (about 10 tokens here), and such
a model does not answer at the bench's gen lengths: with 64 or 256 masked positions after the
prompt it got 0% of 50 validation answers (right on those tried at gen length 4).
`--pad-lengths` then continues the
same SFT objective (response = answer + EOS padding, all in the loss; each response token
masked with p = (1 - eps) t + eps; S ~ U{1..S_max}) for `--long-steps` steps from the kit's
weights with the EOS padding out to each of these total lengths in turn (prompt + gen length:
70 and 262 for gen 64 and 256), into RUN/hf-long-<lengths>-steps<N> (300 steps: 48% of 50
validation answers at gen 64, 6 of 8 at gen 256). It prints the two paths the sampling bench
needs:

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
    parser.add_argument("--pad-lengths", default="",
                        help="continue training with EOS padding to these total lengths")
    parser.add_argument("--long-steps", type=int, default=300)
    parser.add_argument("--long-batch-tokens", type=int, default=1536,
                        help="examples per long step: this many tokens over the length")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.validation_per_level < 1 or args.long_steps < 1:
        parser.error("--steps, --long-steps and --validation-per-level must be >= 1")
    try:
        args.pad_lengths = [int(v) for v in args.pad_lengths.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--pad-lengths takes integers like 70,262 (got {args.pad_lengths!r})")
    return args


def scale_of(args) -> kit.Scale:
    """The kit scale of this model: TASK with the command line's steps and validation size."""
    return replace(TASK, steps=args.steps, seeds=(args.seed,),
                   validation_per_level=args.validation_per_level)  # fmt: skip


def train_long(run, paths, lengths, steps: int, batch_tokens: int, seed: int) -> Path:
    """Continues the kit's SFT objective from RUN's weights with EOS padding to `lengths`.

    Step k pads to `lengths[k % len(lengths)]` with `batch_tokens // length` examples (at
    least 1); AdamW at lr 3e-4 (warm-up over the first 5% of the steps), gradient clip 1.0.

    Returns:
        The Hugging Face directory written, RUN/hf-long-<lengths>-steps<N> (reused if it is
        there: the name holds every argument that changes it, except `batch_tokens` and `seed`,
        which a cached run keeps from its first call).
    """
    from megatron_loopmdm.hf import load_for_inference
    from megatron_loopmdm.hf.checkpoint import write_hf_directory

    import torch

    out = Path(run["dir"]).parent / f"hf-long-{'-'.join(map(str, lengths))}-steps{steps}"
    if (out / "config.json").is_file():
        return out
    tokenizer = kit._tokenizer(paths)
    records = kit.read_examples(paths["train"])
    longest = kit.sequence_length(paths)
    if min(lengths) < longest:
        raise SystemExit(f"--pad-lengths must be >= {longest}, the longest example + EOS")
    data = {n: kit._encode_split(records, tokenizer, n) for n in lengths}
    model = load_for_inference(run["dir"]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95),
                                  weight_decay=0.0)  # fmt: skip
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup))
    generator = torch.Generator().manual_seed(seed)
    for k in range(steps):
        length = lengths[k % len(lengths)]
        tokens, response = data[length]
        rows = torch.randint(0, len(tokens), (max(1, batch_tokens // length),),
                             generator=generator)  # fmt: skip
        loss = kit.sft_step(model, optimizer, schedule, tokens[rows], response[rows], generator)
        if (k + 1) % max(1, steps // 10) == 0:
            print(f"long step {k + 1}/{steps} (length {length}): loss {loss.item():.4f}",
                  flush=True)  # fmt: skip
    write_hf_directory(model.eval(), out, paths["tokenizer"])
    return out


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
    model_dir = run["dir"]
    if args.pad_lengths:
        model_dir = train_long(run, paths, args.pad_lengths, args.long_steps,
                               args.long_batch_tokens, args.seed)  # fmt: skip
    print(f"model: {model_dir}")
    print(f"validation: {paths['validation']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
