"""Loop warm start: each step's loop block starts from the previous step's state where unchanged.

`contraction_model` makes the loop map known: the prelude is position-local (its attention
output zeroed) and the loop layer the identity, so with `concat` injection W = [0.5 I, I] a
loop is x_i = 0.5 x_(i-1) + e (e the prelude output), x_0 = e: the state converges to 2e with
relative changes 1/2, 1/6, 1/14, 1/30, ..., and a cold start at threshold 0.05 stops after 5
loops in every pass.
"""

from megatron_loopmdm.hf import LoopMDMConfig, LoopMDMForMaskedDiffusion
from megatron_loopmdm.hf.cache_loopmdm import LoopWarmStart
from megatron_loopmdm.inference import LoopPolicy, SamplerConfig, generate

import pytest
import torch

from tests.inference.sampler_cases import PROMPTS, run_export_alone

HIDDEN, MASK = 32, 31
BASE = dict(gen_length=8, steps=8, block_length=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LoopMDMConfig(vocab_size=32, hidden_size=HIDDEN, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=4, mask_token_id=MASK,
                           loop_layers=(1, 2), max_loops=8, loop_input_injection="concat",
                           eos_token_id=30)  # fmt: skip
    model = LoopMDMForMaskedDiffusion(config).eval()
    eye = torch.eye(HIDDEN)
    with torch.no_grad():
        for layer in model.model.layers[:2]:  # a position-local prelude, an identity loop layer
            layer.self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
        model.model.input_injection.weight.copy_(torch.cat([0.5 * eye, eye], dim=1))
    return model


def test_off_by_default_and_a_first_pass_is_a_cold_pass(model):
    assert SamplerConfig().loop_warm_start is False
    ids = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    warm = model(ids, num_loops=3, loop_warm_start=model.make_loop_warm_start())
    assert torch.equal(warm.logits, model(ids, num_loops=3).logits)


def test_unchanged_positions_continue_from_the_previous_state(model):
    ids = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    changed_ids = ids.clone()
    changed_ids[:, 2] = (ids[:, 2] + 1) % 30
    changed = changed_ids != ids
    warm = model.make_loop_warm_start()
    model(ids, num_loops=2, loop_warm_start=warm)
    model(changed_ids, num_loops=1, loop_warm_start=warm)
    cold = {}
    for loops in (1, 3):
        cold[loops] = LoopWarmStart()
        model(changed_ids, num_loops=loops, loop_warm_start=cold[loops])
    # 2 loops, then 1 warm loop = 3 cold loops where the token stayed; 1 loop where it changed.
    assert torch.allclose(warm.state[~changed], cold[3].state[~changed], atol=1e-6)
    assert torch.equal(warm.state[changed], cold[1].state[changed])
    assert torch.equal(warm.tokens, changed_ids)


@pytest.mark.parametrize("per", ["batch", "sample"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_adaptive_loops_stop_earlier_from_a_warm_start(model, per, cache):
    policy = LoopPolicy(threshold=0.05, max_loops=8, per=per)
    cold = generate(model, PROMPTS, SamplerConfig(**BASE, cache=cache, loops=policy))
    warm = generate(model, PROMPTS, SamplerConfig(**BASE, cache=cache, loops=policy,
                                                  loop_warm_start=True))  # fmt: skip
    assert cold.loops_per_step == [5] * 8
    # The first pass has no state yet; every later one starts most positions near 2e.
    assert warm.loops_per_step[0] == 5 and max(warm.loops_per_step[1:]) < 5
    assert warm.loop_evaluations < cold.loop_evaluations
    assert (warm.generated != MASK).all()


def test_bad_warm_start_settings_fail_clearly(model):
    with pytest.raises(ValueError, match="True or False"):
        SamplerConfig(loop_warm_start="yes")

    def plain_callable(ids, **_):
        return torch.zeros(*ids.shape, 32)

    with pytest.raises(ValueError, match="drop --loop-warm-start"):
        config = SamplerConfig(gen_length=4, steps=4, loop_warm_start=True)
        generate(plain_callable, [[1]], config, mask_token_id=31)
    warm = model.make_loop_warm_start()
    model(torch.zeros(2, 6, dtype=torch.long), num_loops=1, loop_warm_start=warm)
    with pytest.raises(ValueError, match="make a new one"):
        model(torch.zeros(3, 6, dtype=torch.long), num_loops=1, loop_warm_start=warm)


EXPORT_ONLY = """
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
prompts, mask = torch.load(sys.argv[2])
out = {}
for warm in (False, True):
    result = model.diffusion_generate(prompts, gen_length=8, steps=8, block_length=4,
                                      attention_mask=mask, loop_threshold=0.05, max_loops=8,
                                      loop_warm_start=warm, return_dict_in_generate=True)
    out[warm] = (result.tokens, result.loops_per_step)
torch.save(out, sys.argv[3])
"""


def test_exported_model_alone_runs_the_warm_start(model, tmp_path):
    got = run_export_alone(model, EXPORT_ONLY, tmp_path)
    policy = LoopPolicy(threshold=0.05, max_loops=8)
    for warm in (False, True):
        want = generate(model, [[1, 2, 3], [4, 5, 6, 7]],
                        SamplerConfig(**BASE, loops=policy, loop_warm_start=warm))  # fmt: skip
        tokens, loops_per_step = got[warm]
        assert torch.equal(tokens[:, 4:], want.generated) and loops_per_step == want.loops_per_step
    assert sum(got[True][1]) < sum(got[False][1])
