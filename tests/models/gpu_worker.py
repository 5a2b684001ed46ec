"""GPU checks of the model (run by test_gpu.py under torchrun on a CUDA machine).

bf16 logits of the local (SDPA) spec agree with fp32, and, when Transformer Engine is
installed, the TE spec agrees with the local spec on the same weights.
"""

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.distributed.parallel import (
    ParallelConfig,
    destroy_distributed,
    initialize_distributed,
    set_seed,
)
from megatron_loopmdm.models.builder import build_model, loop_config_for, transformer_config
from megatron_loopmdm.models.config import LoopMDMModelConfig
from megatron_loopmdm.models.sizes import get_model_size
from megatron_loopmdm.models.specs import transformer_engine_available

import torch


def build(dtype, use_te):
    size = get_model_size("debug")
    config = transformer_config(size, ParallelConfig(), params_dtype=dtype)
    model = build_model(
        config, loop_config_for(size), LoopMDMModelConfig(256, 64, 255), init_seed=0, use_te=use_te
    )
    return model.cuda()


def main():
    assert initialize_distributed(ParallelConfig(), "cuda") == "cuda"
    set_seed(0)
    ids = torch.randint(0, 255, (4, 64), device="cuda")
    reference = build(torch.float32, use_te=False)
    bf16 = build(torch.bfloat16, use_te=False)
    bf16.load_state_dict(reference.state_dict())
    want = reference(ids, num_loops=3)[..., :255].float()
    got = bf16(ids, num_loops=3)[..., :255].float()
    assert (got - want).abs().max() < 0.05 * want.abs().max(), "bf16 drifts from fp32"
    bf16(ids, num_loops=3, labels=ids).mean().backward()
    if transformer_engine_available():
        te = build(torch.float32, use_te=True)
        te.load_state_dict(reference.state_dict(), strict=False)
        got_te = te(ids, num_loops=3)[..., :255].float()
        assert (got_te - want).abs().max() < 1e-3 * want.abs().max(), "TE spec differs"
    destroy_distributed()
    print("gpu checks passed")


if __name__ == "__main__":
    main()
