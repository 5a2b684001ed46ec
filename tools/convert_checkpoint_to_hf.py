"""Converts a LoopMDM megatron checkpoint (any TP/PP layout) into a Hugging Face directory.

    python tools/convert_checkpoint_to_hf.py --load ckpt --save hf_model [--iteration 2000] \
        [--dtype bf16] [--tokenizer tok]

Runs in one CPU process. The directory holds config.json, generation_config.json, safetensors
weights, the model code (load with `AutoModel.from_pretrained(dir, trust_remote_code=True)`) and
the tokenizer files (from --tokenizer, else from the run's --tokenizer-model directory).
Exit codes: 0 done, 1 the checkpoint cannot be converted, 2 bad arguments.
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
    parser.add_argument("--load", required=True, help="the checkpoint root (the run's --save)")
    parser.add_argument("--iteration", type=int, help="default: the latest checkpoint")
    parser.add_argument("--save", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--tokenizer", help="a Hugging Face tokenizer directory to include")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.load):
        print(f"error: --load {args.load}: no such directory.", file=sys.stderr)
        return 1

    from megatron_loopmdm.hf.checkpoint import convert_checkpoint_to_hf

    try:
        saved = convert_checkpoint_to_hf(
            args.load, args.save, args.iteration, args.dtype, args.tokenizer
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote Hugging Face model to {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
