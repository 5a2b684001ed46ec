"""Pipeline layouts that keep the loop block inside one stage, balanced by expected compute.

Megatron splits layers across stages evenly, by explicit first/last-stage layer counts, or by a
`pipeline_model_parallel_layout` string such as "Et*3|t*5|t*4L" (E: embedding, t: transformer
layer, L: loss, |: next stage). A looped layer runs E[S] times per step, so an even split by
layer count leaves the stage with the loop block the slowest; `balanced_layout` evens out the
expected compute instead.
"""

from megatron_loopmdm.models.config import LoopConfig
from megatron_loopmdm.models.loop_sampling import expected_num_loops

from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset


def stage_layer_ranges(config: TransformerConfig) -> list[tuple[int, int]]:
    """Global layer ranges [start, end) of every model chunk, in layer order.

    With virtual pipelining the chunks of one rank are not contiguous; the list is in the
    order the layers run (chunk v of every rank, then chunk v + 1).
    """
    pp = config.pipeline_model_parallel_size
    vpp = config.virtual_pipeline_model_parallel_size or 1
    layout = config.pipeline_model_parallel_layout
    ranges = []
    if layout is not None:
        start = 0
        for v in range(layout.virtual_pipeline_model_parallel_size):
            for rank in range(pp):
                count = layout.layout[rank][v].count(LayerType.decoder)
                ranges.append((start, start + count))
                start += count
        return ranges
    for v in range(vpp):
        for rank in range(pp):
            vp_stage = v if config.virtual_pipeline_model_parallel_size else None
            count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=rank)
            offset = get_transformer_layer_offset(config, vp_stage, rank) if pp > 1 else 0
            ranges.append((offset, offset + count))
    return ranges


def balanced_layout(num_layers: int, num_stages: int, loop_config: LoopConfig) -> list[int]:
    """Layers per stage that minimise the largest stage's expected compute.

    A prelude or coda layer costs 1 and the loop block costs E[S] per looped layer; the loop
    block is never split. Stages may not be empty.

    Returns:
        The number of layers of each stage, in order.
    """
    start, end = loop_config.loop_layers
    e_s = expected_num_loops(loop_config)
    # Indivisible units: (number of layers, cost).
    units = (
        [(1, 1.0)] * start + [(end - start, (end - start) * e_s)] + [(1, 1.0)] * (num_layers - end)
    )
    if len(units) < num_stages:
        raise ValueError(
            f"{num_layers} layers with the loop block {loop_config.loop_layers} kept whole "
            f"cannot fill {num_stages} pipeline stages."
        )
    n = len(units)
    prefix = [0.0]
    for _, cost in units:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    # best[k][i]: the smallest max-stage cost of the first i units in k stages.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = value, j
    bounds, i = [], n
    for k in range(num_stages, 0, -1):
        bounds.append((cut[k][i], i))
        i = cut[k][i]
    return [sum(units[u][0] for u in range(a, b)) for a, b in reversed(bounds)]


def layout_string(layers_per_stage: list[int]) -> str:
    """Megatron's `--pipeline-model-parallel-layout` string for per-stage layer counts."""
    stages = [f"t*{count}" if count else "" for count in layers_per_stage]
    stages[0] = "E" + stages[0]
    stages[-1] = stages[-1] + "L"
    return "|".join(stages)


def validate_pipeline_layout(config: TransformerConfig, loop_config: LoopConfig) -> None:
    """Raises a ValueError when a pipeline stage boundary cuts the loop block (or the loop
    options need one stage: `LoopConfig.validate_for`).

    The message names each stage's layers and proposes a layout that works.
    """
    loop_config.validate_for(config.num_layers, config.pipeline_model_parallel_size)
    if config.pipeline_model_parallel_size == 1:
        return
    start, end = loop_config.loop_layers
    ranges = stage_layer_ranges(config)
    if any(lo < end and start < hi and not (lo <= start and end <= hi) for lo, hi in ranges):
        described = ", ".join(
            f"stage {i}: layers {lo}-{hi - 1}" if hi > lo else f"stage {i}: no layers"
            for i, (lo, hi) in enumerate(ranges)
        )
        proposal = balanced_layout(config.num_layers, len(ranges), loop_config)
        raise ValueError(
            f"The loop block (layers {start}-{end - 1}) must lie inside one pipeline stage, but "
            f"this layout splits it: {described}. A layout that keeps it whole and balances "
            f'expected compute: --pipeline-model-parallel-layout "{layout_string(proposal)}" '
            f"(layers per stage {proposal}), or use --pipeline-model-parallel-layout auto."
        )


def resolve_pipeline_layout(layout, num_layers: int, num_stages: int, loop_config: LoopConfig):
    """`auto` becomes the balanced layout string; any other value passes through unchanged."""
    if layout != "auto":
        return layout
    return layout_string(balanced_layout(num_layers, num_stages, loop_config))
