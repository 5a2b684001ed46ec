"""Converts a Hugging Face directory into a LoopMDM megatron dist checkpoint.

    python tools/convert_hf_to_checkpoint.py --load hf_model --save ckpt [--iteration 0]
    python tools/convert_hf_to_checkpoint.py --from-ar Qwen2.5-0.5B --save ckpt \
        --loop-layers 4 8 --max-loops 3 [--retrofit] [--shift-logits] [--mask-token TOKEN]

`--load` reads a LoopMDM directory (our own export). `--from-ar` imports a pretrained
autoregressive Llama, Qwen2, Qwen3 or Mistral model: its layers START..END-1 become the loop
block (`--retrofit` drops the (max_loops - 1) x (END - START) layers after it, keeping the
effective depth at S = max_loops), a [MASK] token is added when the tokenizer has none, and
SAVE/tokenizer and SAVE/pretrain_flags.txt (the model flags for `pretrain_loopmdm.py`) are
written next to the checkpoint.

Runs in one CPU process. The checkpoint holds the weights (no optimizer state) and the model
description, so any TP/PP layout continues from it:
`pretrain_loopmdm.py --load ckpt --finetune ...` (or `--no-load-optim`).
Exit codes: 0 done, 1 the directory cannot be converted, 2 bad arguments.
"""

import argparse
import os
import sys
import warnings

import megatron_loopmdm  # noqa: F401

# torch's checkpoint reader warns about single-process use, which is what this tool does.
warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed.checkpoint")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="a LoopMDM Hugging Face directory")
    source.add_argument("--from-ar", help="a Llama/Qwen2/Qwen3/Mistral Hugging Face directory")
    parser.add_argument("--save", required=True, help="the checkpoint root to write")
    parser.add_argument("--iteration", type=int, default=0, help="default: 0")
    group = parser.add_argument_group("--from-ar")
    group.add_argument(
        "--loop-layers", type=int, nargs=2, metavar=("START", "END"), default=(1, 2),
        help="pretrained layers forming the loop block, 0-based, end exclusive (default 1 2)",
    )  # fmt: skip
    group.add_argument("--max-loops", type=int, default=2, help="S_max (default 2)")
    group.add_argument("--retrofit", action="store_true", help="drop layers to keep the depth")
    group.add_argument("--shift-logits", action="store_true", help="position i predicts i + 1")
    group.add_argument("--mask-token", help="an existing token to use as [MASK]")
    group.add_argument("--seq-length", type=int, help="default: max_position_embeddings")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.iteration < 0:
        parser.error(f"--iteration {args.iteration} must be >= 0.")
    if args.max_loops < 1:
        parser.error(f"--max-loops {args.max_loops} must be >= 1.")
    source = args.load or args.from_ar
    if not os.path.isdir(source):
        flag = "--load" if args.load else "--from-ar"
        print(f"error: {flag} {source}: no such directory.", file=sys.stderr)
        return 1
    try:
        if args.from_ar:
            from megatron_loopmdm.hf.from_ar import FLAGS_FILE, import_ar_model

            saved = import_ar_model(
                args.from_ar, args.save, args.loop_layers, args.max_loops, args.retrofit,
                args.shift_logits, args.mask_token, args.seq_length,
                args.make_vocab_size_divisible_by, args.iteration,
            )  # fmt: skip
            print(f"model flags for pretrain_loopmdm.py: {os.path.join(args.save, FLAGS_FILE)}")
        else:
            from megatron_loopmdm.hf.checkpoint import convert_hf_to_checkpoint

            saved = convert_hf_to_checkpoint(args.load, args.save, args.iteration)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote megatron checkpoint to {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
