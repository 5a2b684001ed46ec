"""Masking keyed by sample index, the NELBO, and the FLOPs accounting."""

import math

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.diffusion.loss import masked_diffusion_loss_sum
from megatron_loopmdm.diffusion.noise import mask_tokens
from megatron_loopmdm.distributed.parallel import ParallelConfig
from megatron_loopmdm.models.builder import loop_config_for, transformer_config
from megatron_loopmdm.models.config import LoopConfig
from megatron_loopmdm.models.flops import flops_per_token
from megatron_loopmdm.models.sizes import get_model_size

import pytest
import torch


def test_noise_depends_on_sample_index_not_on_batch_position():
    tokens = torch.randint(0, 50, (6, 40), generator=torch.Generator().manual_seed(0))
    index = torch.arange(100, 106)
    noisy, mask, p = mask_tokens(tokens, index, seed=3, mask_token_id=99)
    # The same samples in another order, split across two "replicas".
    order = torch.tensor([4, 1, 5, 0, 3, 2])
    a = mask_tokens(tokens[order[:3]], index[order[:3]], seed=3, mask_token_id=99)
    b = mask_tokens(tokens[order[3:]], index[order[3:]], seed=3, mask_token_id=99)
    assert torch.equal(torch.cat([a[1], b[1]]), mask[order])
    assert torch.equal(torch.cat([a[2], b[2]]), p[order])
    assert torch.equal(noisy[mask], torch.full_like(noisy[mask], 99))
    assert torch.equal(noisy[~mask], tokens[~mask])
    other_seed = mask_tokens(tokens, index, seed=4, mask_token_id=99)
    assert not torch.equal(other_seed[1], mask)


def test_mask_rate_follows_p_and_p_covers_eps_to_1():
    tokens = torch.zeros(400, 512, dtype=torch.long)
    _, mask, p = mask_tokens(tokens, torch.arange(400), seed=0, mask_token_id=1, eps=1e-3)
    assert p.min() >= 1e-3 and p.max() <= 1.0
    rate = mask.float().mean(1)
    assert (rate - p).abs().max() < 0.08  # binomial noise over 512 tokens
    assert abs(p.mean().item() - 0.5) < 0.05  # t ~ U(0, 1)


def test_nelbo_sum_is_ce_over_p_on_masked_positions():
    ce = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    p = torch.tensor([0.5, 0.25])
    expected = (1.0 + 3.0) / 0.5 + 6.0 / 0.25
    assert masked_diffusion_loss_sum(ce, mask, p).item() == pytest.approx(expected)


def test_flops_count_effective_depth():
    size = get_model_size("debug")
    config = transformer_config(size, ParallelConfig())
    loop = loop_config_for(size)  # one looped layer, S_max 3
    h, f, s, v = 64, 128, 64, 96
    kv = 2 * 16  # 2 query groups of 16 channels
    layer = 2 * h * (h + 2 * kv) + 4 * s * h + 2 * h * h + 2 * h * f * 2 + 2 * f * h
    for num_loops in (1, 3, 7):
        effective = 4 + (num_loops - 1) * 1
        expected = 3 * (effective * layer + 2 * h * v)
        assert flops_per_token(config, loop, v, s, num_loops) == expected
    # Default: E[S] = (S_max + 1) / 2 for uniform draws.
    assert flops_per_token(config, loop, v, s) == flops_per_token(config, loop, v, s, 2.0)
    assert flops_per_token(config, loop, v, s, 1, training=False) * 3 == flops_per_token(
        config, loop, v, s, 1
    )
    wider = LoopConfig(loop_layers=(1, 3), max_loops=3)
    assert flops_per_token(config, wider, v, s, 3) - flops_per_token(config, loop, v, s, 3) == (
        3 * 2 * layer
    )
    assert math.isfinite(flops_per_token(config, loop, v, s))
