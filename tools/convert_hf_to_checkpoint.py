"""Converts a LoopMDM Hugging Face directory into a megatron dist checkpoint.

    python tools/convert_hf_to_checkpoint.py --load hf_model --save ckpt [--iteration 0]

Runs in one CPU process. The checkpoint holds the weights (no optimizer state) and the run's
model description, so any TP/PP layout continues from it:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="the Hugging Face directory")
    parser.add_argument("--save", required=True, help="the checkpoint root to write")
    parser.add_argument("--iteration", type=int, default=0, help="default: 0")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.load):
        print(f"error: --load {args.load}: no such directory.", file=sys.stderr)
        return 1
    if args.iteration < 0:
        parser.error(f"--iteration {args.iteration} must be >= 0.")

    from megatron_loopmdm.hf.checkpoint import convert_hf_to_checkpoint

    try:
        saved = convert_hf_to_checkpoint(args.load, args.save, args.iteration)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote megatron checkpoint to {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
