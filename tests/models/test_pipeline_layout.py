"""Pipeline layouts: the loop block stays inside one stage; balancing by expected compute."""

import itertools

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.distributed.parallel import ParallelConfig
from megatron_loopmdm.models.builder import transformer_config
from megatron_loopmdm.models.config import LoopConfig
from megatron_loopmdm.models.pipeline_layout import (
    balanced_layout,
    layout_string,
    stage_layer_ranges,
    validate_pipeline_layout,
)
from megatron_loopmdm.models.sizes import MODEL_SIZES, get_model_size

import pytest


def config_for(num_layers, pp, vpp=None, **overrides):
    size = get_model_size("debug")
    return transformer_config(
        size,
        ParallelConfig(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp),
        num_layers=num_layers,
        **overrides,
    )


def test_even_split_ranges():
    assert stage_layer_ranges(config_for(8, 2)) == [(0, 4), (4, 8)]
    assert stage_layer_ranges(config_for(8, 2, vpp=2)) == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_explicit_first_and_last_stage_counts():
    config = config_for(
        8, 3, num_layers_in_first_pipeline_stage=2, num_layers_in_last_pipeline_stage=2
    )
    assert stage_layer_ranges(config) == [(0, 2), (2, 6), (6, 8)]


def test_loop_cut_by_a_stage_boundary_fails_with_stages_and_a_proposal():
    config = config_for(8, 2)
    with pytest.raises(ValueError) as error:
        validate_pipeline_layout(config, LoopConfig(loop_layers=(3, 5), max_loops=4))
    message = str(error.value)
    assert "The loop block (layers 3-4) must lie inside one pipeline stage" in message
    assert "stage 0: layers 0-3, stage 1: layers 4-7" in message
    proposal = message.split('--pipeline-model-parallel-layout "')[1].split('"')[0]
    # The proposed layout is accepted by megatron and keeps the loop whole.
    fixed = config_for(8, 2, pipeline_model_parallel_layout=proposal)
    validate_pipeline_layout(fixed, LoopConfig(loop_layers=(3, 5), max_loops=4))
    assert sum(hi - lo for lo, hi in stage_layer_ranges(fixed)) == 8


def test_loop_inside_a_stage_passes():
    validate_pipeline_layout(config_for(8, 2), LoopConfig(loop_layers=(1, 3), max_loops=4))


def _brute_force_best(num_layers, stages, loop):
    e_s = (loop.max_loops + 1) / 2
    start, end = loop.loop_layers
    best = None
    for cuts in itertools.combinations(range(1, num_layers), stages - 1):
        bounds = (0, *cuts, num_layers)
        spans = list(zip(bounds[:-1], bounds[1:]))
        if any(lo < end and start < hi and not (lo <= start and end <= hi) for lo, hi in spans):
            continue
        cost = max(sum(e_s if start <= i < end else 1.0 for i in range(lo, hi)) for lo, hi in spans)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize(
    "num_layers,stages,span,s_max",
    [
        (12, 2, (3, 5), 4),
        (12, 4, (3, 5), 4),
        (18, 3, (4, 6), 8),
        (8, 4, (2, 3), 3),
    ],
)
def test_balanced_layout_is_optimal_and_keeps_loop_whole(num_layers, stages, span, s_max):
    loop = LoopConfig(loop_layers=span, max_loops=s_max)
    counts = balanced_layout(num_layers, stages, loop)
    assert sum(counts) == num_layers and len(counts) == stages and min(counts) > 0
    e_s = (s_max + 1) / 2
    bounds = [0, *itertools.accumulate(counts)]
    costs = [
        sum(e_s if span[0] <= i < span[1] else 1.0 for i in range(lo, hi))
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    assert max(costs) == pytest.approx(_brute_force_best(num_layers, stages, loop))
    # The stage that holds the loop gets fewer layers than an even split would give it.
    config = config_for(num_layers, stages, pipeline_model_parallel_layout=layout_string(counts))
    validate_pipeline_layout(config, loop)


def test_named_sizes_have_early_middle_loop_spans():
    for name, size in MODEL_SIZES.items():
        start, end = size.loop_layers
        assert 0 < start and end <= size.num_layers // 2 + 1, name


def test_intermediate_loop_loss_is_refused_under_pipeline_parallelism():
    loop = LoopConfig(loop_layers=(1, 3), max_loops=2, intermediate_loss_weight=0.5)
    with pytest.raises(ValueError, match="use --pipeline-model-parallel-size 1"):
        validate_pipeline_layout(config_for(4, 2), loop)
    validate_pipeline_layout(config_for(4, 1), loop)
