"""A training step through pretrain_loopmdm.py's path against a plain-PyTorch loop (CPU).

The same model (4 layers, hidden 128, loop span 1..2, S = 2 every step) and the same tokens:
  plain:  `LoopMDMForMaskedDiffusion` (plain PyTorch), torch AdamW, 128 x 19 tokens;
  run:    `training.run.Run` (megatron DDP, optimizer, schedules, the diffusion step) on
          128 x 19 tokens, and on the same tokens packed as 32 x 76 with per-document
          attention (four 19-token documents per sample).
The models alternate step by step so that drifts of a shared machine cancel.

    python bench/cpu_step_overhead.py [--iters 20]

Prints the median step time of each and the ratios; the last line is
`cpu_step_overhead_ratio=<worst ratio>` (target <= 1.3).
"""

import argparse
import os
import statistics
import time

import megatron_loopmdm  # noqa: F401  (before megatron)
from megatron_loopmdm.distributed.parallel import destroy_distributed
from megatron_loopmdm.hf import LoopMDMConfig, LoopMDMForMaskedDiffusion
from megatron_loopmdm.training.arguments import parse_args, run_config_from_args
from megatron_loopmdm.training.run import Run

import torch

LAYERS, HIDDEN, HEADS, VOCAB, DOC, NUM_DOCS = 4, 128, 4, 1024, 19, 128
NUM_LOOPS = 2


def run_config(seq_length, batch):
    return run_config_from_args(parse_args([str(a) for a in (
        "--num-layers", LAYERS, "--hidden-size", HIDDEN, "--num-attention-heads", HEADS,
        "--num-query-groups", HEADS, "--seq-length", seq_length, "--loop-layers", 1, 2,
        "--max-loops", NUM_LOOPS, "--mock-data", "--vocab-size", VOCAB, "--micro-batch-size",
        batch, "--global-batch-size", batch, "--train-iters", 1000, "--lr", 1e-4,
        "--lr-decay-style", "constant", "--device", "cpu",
    )], world_size=1), world_size=1)  # fmt: skip


def batches(packed: bool, generator):
    """The same 128 documents of 19 tokens, either one per row or four per row."""
    tokens = torch.randint(0, VOCAB - 1, (NUM_DOCS, DOC), generator=generator)
    index = torch.arange(NUM_DOCS // 4 if packed else NUM_DOCS)
    if not packed:
        return {"tokens": tokens, "sample_index": index}
    rows = NUM_DOCS // 4
    document_ids = torch.arange(4).repeat_interleave(DOC).expand(rows, -1).contiguous()
    return {
        "tokens": tokens.reshape(rows, 4 * DOC),
        "sample_index": index,
        "document_ids": document_ids,
        "position_ids": torch.arange(DOC).repeat(4).expand(rows, -1).contiguous(),
        "loss_mask": torch.ones(rows, 4 * DOC),
    }


class Plain:
    """The plain-PyTorch reference loop."""

    def __init__(self):
        config = LoopMDMConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, mask_token_id=VOCAB - 1,
            loop_layers=(1, 2), max_loops=NUM_LOOPS, max_position_embeddings=128,
        )  # fmt: skip
        self.model = LoopMDMForMaskedDiffusion(config)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def step(self, batch):
        tokens = batch["tokens"]
        t = torch.rand(tokens.size(0), 1)
        p = (1 - 1e-3) * t + 1e-3
        mask = torch.rand(tokens.shape) < p
        noisy = torch.where(mask, VOCAB - 1, tokens)
        logits = self.model(noisy, num_loops=NUM_LOOPS).logits.float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
        loss = ((ce * mask) / p).sum() / tokens.numel()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    cli = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1")
    generator = torch.Generator().manual_seed(0)
    plain_batch, packed_batch = batches(False, generator), batches(True, generator)
    run = Run(run_config(DOC, NUM_DOCS))
    # A second Run would re-initialise the process groups; the packed steps reuse this model
    # with 76-token samples (RoPE and the step take the sequence length from the batch).
    run.size = run.size.__class__(**{**run.size.__dict__, "seq_length": 4 * DOC})
    run_packed_seq = 4 * DOC
    plain = Plain()
    times = {"plain": [], "run": [], "run_packed": []}
    for i in range(cli.warmup + cli.iters):
        step_times = {
            "plain": timed(plain.step, plain_batch),
            "run": timed(_run_step, run, plain_batch, DOC),
            "run_packed": timed(_run_step, run, packed_batch, run_packed_seq),
        }
        if i >= cli.warmup:
            for name, value in step_times.items():
                times[name].append(value)
    median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    for name, value in median.items():
        print(f"{name:>11}: {value:7.1f} ms/step")
    ratios = {name: median[name] / median["plain"] for name in ("run", "run_packed")}
    for name, value in ratios.items():
        print(f"{name} / plain: {value:.2f}")
    print(f"cpu_step_overhead_ratio={max(ratios.values()):.2f}")
    destroy_distributed()


def _run_step(run, batch, seq_length):
    run.size = run.size.__class__(**{**run.size.__dict__, "seq_length": seq_length})
    for chunk in run.chunks:
        chunk.train()
    result = run.step(NUM_LOOPS, [batch])
    run.scheduler.step(increment=1)
    return result


if __name__ == "__main__":
    main()
