"""A few real training steps of the debug model on the DeepSpeed backend (run by torchrun).

The same model, initial weights, data, diffusion noise and loop counts as
`tests/distributed/parallel_worker.py` (the megatron backend). One launch trains several cases
one after another, each from fresh weights; a case is `<zero stage>[+flag...]`: `+sp` megatron
sequence parallelism (needs --tp 2); `+injection` concat input injection and a loop embedding
(parameters tagged `sequence_parallel`; the adapter is unused when S=1); `+recompute` full
(non-reentrant) activation recompute; `+bf16` bf16 parameters and DeepSpeed's bf16 mode;
`+padded` a `loss_mask` that pads each sample differently (micro-batches count different
tokens); `+mb2` micro-batches of 2 samples instead of 1; `+nan` NaN gradients at step 1;
`+loopterm` the intermediate-loop loss at weight `LOOP_TERM_WEIGHT`.
It writes per case and step: S, the global per-token loss, the gradient norm and the
intermediate-loop term (None without `+loopterm`). With
`--save DIR --save-at N` the first case saves a DeepSpeed checkpoint before step N and carries
on; `--load DIR` resumes.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import megatron_loopmdm  # noqa: F401  (registers the triton stand-in before megatron)
from megatron_loopmdm.distributed.parallel import (
    ParallelConfig,
    destroy_distributed,
    initialize_distributed,
    set_seed,
)
from megatron_loopmdm.models.builder import loop_config_for, transformer_config
from megatron_loopmdm.models.config import LoopMDMModelConfig
from megatron_loopmdm.models.loop_sampling import draw_num_loops
from megatron_loopmdm.models.sizes import get_model_size
from megatron_loopmdm.training.deepspeed_backend import AdamWConfig, DeepSpeedTrainer
from megatron_loopmdm.training.deepspeed_config import (
    load_deepspeed_config,
    prepare_deepspeed_config,
)
from megatron_loopmdm.training.setup import build_model_chunks, default_optimizer_config
from megatron_loopmdm.training.step import DiffusionConfig, make_forward_step

import torch
from megatron.core import parallel_state

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # torchrun puts only this script's folder on the path

from tests.distributed.parallel_worker import MASK_ID, SEQ, VOCAB, global_batch  # noqa: E402

SEED = 1234
INIT_SEED = 7
LR = 1e-2
LOOP_TERM_WEIGHT = 0.5


def example_config(stage: int, bf16: bool) -> dict:
    """examples/deepspeed/zero<stage>.json, with every parameter partitioned."""
    config = load_deepspeed_config(REPO / "examples" / "deepspeed" / f"zero{stage}.json")
    config["bf16"] = {"enabled": bf16}
    if stage == 3:
        # The debug model's parameters are all below the example's persistence threshold;
        # partition every one of them so the test exercises ZeRO-3's gathers.
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def build_trainer(args, stage: int, flags: list):
    parallel = ParallelConfig(args.tp, 1, None, "sp" in flags)
    injection = "injection" in flags
    dtype = torch.bfloat16 if "bf16" in flags else torch.float32
    size = get_model_size("debug")
    recompute = (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if "recompute" in flags
        else {}
    )
    config = transformer_config(
        size,
        parallel,
        params_dtype=dtype,
        num_layers=args.num_layers,
        calculate_per_token_loss=True,
        **recompute,
    )
    loop_config = loop_config_for(
        size,
        loop_layers=(1, 2),
        max_loops=3,
        input_injection="concat" if injection else "none",
        loop_embedding=injection,
        intermediate_loss_weight=LOOP_TERM_WEIGHT if "loopterm" in flags else 0.0,
    )
    set_seed(SEED)
    model = build_model_chunks(
        config, loop_config, LoopMDMModelConfig(VOCAB, SEQ, MASK_ID), init_seed=INIT_SEED
    )[0]
    optimizer_config = default_optimizer_config(lr=LR, params_dtype=dtype)
    ds_config = prepare_deepspeed_config(
        example_config(stage, "bf16" in flags),
        parallel,
        micro_batch_size=2 if "mb2" in flags else 1,
        global_batch_size=args.global_batch,
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        params_dtype=dtype,
        clip_grad=optimizer_config.clip_grad,
    )
    # parallel_worker steps megatron's optimizer without OptimizerParamScheduler, the only
    # place megatron applies its groups' wd_mult=0 to norms: the reference decays every weight.
    adamw = AdamWConfig.from_optimizer_config(optimizer_config, decay_biases_and_norms=True)
    return DeepSpeedTrainer(model, ds_config, adamw, parallel), loop_config


def padding_mask(sample_index: torch.Tensor) -> torch.Tensor:
    """[b, SEQ] loss mask: sample k keeps its first SEQ - 5 * (k % 4) positions."""
    lengths = SEQ - 5 * (sample_index % 4)
    return (torch.arange(SEQ)[None, :] < lengths[:, None]).long()


def count_loss_tokens(batch: dict) -> int:
    return int(batch["loss_mask"].sum())


def with_nan_gradients(forward_step):
    """`forward_step` whose backward gives NaN gradients (the reported loss stays finite)."""

    def forward(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)

        def nan_loss_func(output_tensor):
            loss_sum, num_tokens, report = loss_func(output_tensor)
            return loss_sum * float("nan"), num_tokens, report

        return output, nan_loss_func

    return forward


def train(args, case: str, save: bool) -> list:
    stage, *flags = case.split("+")
    trainer, loop_config = build_trainer(args, int(stage), flags)
    dp_rank = parallel_state.get_data_parallel_rank()
    local = args.global_batch // parallel_state.get_data_parallel_world_size()
    micro_batch = 2 if "mb2" in flags else 1
    diffusion = DiffusionConfig(mask_token_id=MASK_ID)
    first_step, records = 0, []
    if args.load:
        first_step, client_state = trainer.load_checkpoint(args.load)
        assert client_state == {"note": "saved by deepspeed_worker"}, client_state
    for step in range(first_step, args.steps):
        if save and step == args.save_at:
            trainer.save_checkpoint(args.save, step, {"note": "saved by deepspeed_worker"})
        num_loops = draw_num_loops(loop_config, seed=SEED, iteration=step)
        tokens, index = global_batch(step, args.global_batch)
        mine = slice(dp_rank * local, (dp_rank + 1) * local)
        micro = [
            {"tokens": t, "sample_index": i}
            for t, i in zip(tokens[mine].split(micro_batch), index[mine].split(micro_batch))
        ]
        num_tokens_func = None
        if "padded" in flags:
            for batch in micro:
                batch["loss_mask"] = padding_mask(batch["sample_index"])
            num_tokens_func = count_loss_tokens
        forward_step = make_forward_step(diffusion, seed=SEED, num_loops=num_loops)
        if "nan" in flags and step == 1:
            forward_step = with_nan_gradients(forward_step)
        trainer.set_lr(LR)
        result = trainer.train_step(
            forward_step,
            iter(micro),
            num_microbatches=len(micro),
            num_tokens_func=num_tokens_func,
        )
        assert result.update_successful == ("nan" not in flags or step != 1), result
        records.append(
            dict(
                step=step,
                num_loops=num_loops,
                loss=result.loss,
                grad_norm=result.grad_norm,
                intermediate_loss=result.intermediate_loss,
            )
        )
    trainer.engine.destroy()
    return records


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["1"], help="<stage>[+flag...]")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--save", help="checkpoint directory (first case)")
    parser.add_argument("--save-at", type=int, help="save before this step, then carry on")
    parser.add_argument("--load", help="resume from the latest checkpoint here")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    # Sequence parallelism changes only the model config, not megatron's process groups.
    initialize_distributed(ParallelConfig(args.tp), "cpu")
    runs = {
        case: train(args, case, save=bool(args.save) and i == 0)
        for i, case in enumerate(args.cases)
    }
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(args.out, "w") as f:
            json.dump({"runs": runs, "world_size": int(os.environ["WORLD_SIZE"])}, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
