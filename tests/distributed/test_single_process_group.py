"""`single_process_group`: a real one-process gloo group, set up and torn down."""

import os

import megatron_loopmdm  # noqa: F401  (megatron import shims)
from megatron_loopmdm.distributed.parallel import _free_port, single_process_group

import pytest
import torch
from megatron.core import parallel_state


def test_group_is_started_and_destroyed_and_environment_restored():
    before = dict(os.environ)
    with single_process_group():
        assert torch.distributed.is_initialized()
        assert torch.distributed.get_world_size() == 1
        assert parallel_state.get_tensor_model_parallel_world_size() == 1
        assert parallel_state.get_pipeline_model_parallel_world_size() == 1
        with single_process_group():  # an existing TP=1/PP=1 group is reused, not replaced
            assert torch.distributed.is_initialized()
        assert torch.distributed.is_initialized()
    assert not torch.distributed.is_initialized()
    assert dict(os.environ) == before


class _Refused(ValueError):
    pass


def test_group_without_megatron_groups_raises_the_callers_error():
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        with pytest.raises(_Refused, match="without megatron's process groups"):
            with single_process_group(_Refused):
                pass
    finally:
        torch.distributed.destroy_process_group()
