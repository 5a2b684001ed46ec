"""Masked-diffusion loss of a LoopMDM checkpoint per loop count S, on --mock-data samples.

    python examples/from_pretrained/loss_vs_loops.py CKPT_OR_HF_DIR [--num-loops 1 2 3 4]

Every S sees the same samples and masks (t on a fixed grid), so the numbers compare.
"""

import argparse

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.data.mock import MockDiffusionDataset
from megatron_loopmdm.hf import load_for_inference

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("load")
    parser.add_argument("--num-loops", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--vocab-size", type=int, default=128, help="as in the training run")
    parser.add_argument("--num-samples", type=int, default=64)
    args = parser.parse_args()
    model = load_for_inference(args.load)
    seq = 64
    data = MockDiffusionDataset(args.num_samples, seq, args.vocab_size, seed=999)
    tokens = torch.stack([data[i]["tokens"] for i in range(len(data))])  # [n, s]
    generator = torch.Generator().manual_seed(0)
    t = (torch.arange(len(data)) + 0.5) / len(data)  # a fixed grid of t in (0, 1)
    masked = torch.rand(tokens.shape, generator=generator) < t[:, None]
    noisy = tokens.masked_fill(masked, model.config.mask_token_id)
    for num_loops in args.num_loops:
        with torch.no_grad():
            logits = model(noisy, num_loops=num_loops).logits.float()
        ce = torch.nn.functional.cross_entropy(logits[masked], tokens[masked])
        print(f"S={num_loops}: cross entropy on masked tokens {ce.item():.4f}")


if __name__ == "__main__":
    main()
