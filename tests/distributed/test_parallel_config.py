"""Every rule of `ParallelConfig`, the one validated parallel layout (no processes started)."""

import dataclasses

from megatron_loopmdm.distributed.parallel import ParallelConfig, virtual_pipeline_size
from megatron_loopmdm.training import arguments

import pytest

REFUSED = [
    (dict(tensor_model_parallel_size=0), "--tensor-model-parallel-size 0 must be an integer"),
    (dict(pipeline_model_parallel_size=-1), "--pipeline-model-parallel-size -1 must be"),
    (dict(tensor_model_parallel_size=1.5), "must be an integer >= 1"),
    (dict(context_parallel_size=2), "--context-parallel-size 2 is not supported yet"),
    (dict(expert_model_parallel_size=2), "--expert-model-parallel-size 2 is not supported"),
    (dict(sequence_parallel=True), "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=1), "at least 2"),
    (dict(virtual_pipeline_model_parallel_size=2), "needs --pipeline-model-parallel-size >= 2"),
    (
        dict(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=0),
        "--decoder-first-pipeline-num-layers 0 must be at least 1",
    ),
    (
        dict(pipeline_model_parallel_size=2, num_layers_in_last_pipeline_stage=0),
        "--decoder-last-pipeline-num-layers 0",
    ),
    (
        dict(
            pipeline_model_parallel_size=2,
            num_layers_in_first_pipeline_stage=1,
            pipeline_model_parallel_layout="Et|tL",
        ),
        "both set the stage layout",
    ),
    (dict(tensor_model_parallel_size=2, world_size=3), "multiple of 2"),
    (dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, world_size=6), "of 4"),
    (dict(world_size=0), "cannot be split"),
]


@pytest.mark.parametrize("fields,message", REFUSED)
def test_each_rule_refuses_with_what_to_change(fields, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**fields)


def test_sizes_of_a_valid_layout():
    parallel = ParallelConfig(2, 2, 2, True, world_size=8)
    assert parallel.model_parallel_size == 4
    assert parallel.data_parallel_size() == 2
    assert parallel.data_parallel_size(12) == 3
    assert parallel.num_pipeline_chunks == 4
    assert ParallelConfig(pipeline_model_parallel_size=3).num_pipeline_chunks == 3


def test_world_size_is_a_field_validated_on_every_copy():
    model_only = ParallelConfig(tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="needs the world size"):
        model_only.data_parallel_size()
    assert model_only.with_world_size(6).data_parallel_size() == 3
    with pytest.raises(ValueError, match="multiple of 2"):
        model_only.with_world_size(5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model_only.virtual_pipeline_model_parallel_size = 2  # given at construction only


def test_virtual_pipeline_size_from_layers_per_virtual_stage():
    assert virtual_pipeline_size(8, 2, None) is None
    assert virtual_pipeline_size(8, 2, 2) == 2
    assert virtual_pipeline_size(12, 2, 2) == 3
    with pytest.raises(ValueError, match="must divide the 4 layers"):
        virtual_pipeline_size(8, 2, 3)
    with pytest.raises(ValueError, match="at least 2"):
        ParallelConfig(2, 2, virtual_pipeline_size(8, 2, 4))  # one chunk per stage


def _args(*flags):
    return arguments.build_parser().parse_args(
        ["--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data", *flags]
    )


def test_the_command_line_builds_the_config_and_reports_each_rule_once():
    args = _args("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                 "--num-layers-per-virtual-pipeline-stage", "1", "--sequence-parallel")  # fmt: skip
    parallel = arguments.parallel_config(args, world_size=8)
    assert parallel == ParallelConfig(2, 2, 2, True, world_size=8)  # debug: 4 layers
    errors = arguments.validate_args(_args("--sequence-parallel"), world_size=1)
    assert len([e for e in errors if "--sequence-parallel" in e]) == 1
    errors = arguments.validate_args(_args("--tensor-model-parallel-size", "2"), world_size=3)
    assert len([e for e in errors if "cannot be split" in e]) == 1


def test_deepspeed_refuses_pipeline_parallel_at_parse_time():
    args = _args("--pipeline-model-parallel-size", "2", "--deepspeed", "--deepspeed-config", "x")
    errors = arguments.validate_args(args, world_size=2)
    assert [e for e in errors if "with --deepspeed is not supported" in e]
