"""`single_process_group`: a real one-process gloo group, set up and torn down.

Each test runs in a fresh interpreter: the suite's session fixture (`megatron_single_process`)
may already hold a process group in this one.
"""

import os
import subprocess
import sys

import megatron_loopmdm  # noqa: F401  (megatron import shims)
from megatron_loopmdm.distributed.parallel import _free_port, single_process_group

import pytest
import torch
from megatron.core import parallel_state

from tests.utils import REPO


@pytest.mark.parametrize("case", ["started_and_destroyed", "refused_without_megatron_groups"])
def test_single_process_group(case):
    code = f"from tests.distributed.test_single_process_group import {case}; {case}()"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]


def started_and_destroyed():
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


def refused_without_megatron_groups():
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        with pytest.raises(_Refused, match="without megatron's process groups"):
            with single_process_group(_Refused):
                pass
    finally:
        torch.distributed.destroy_process_group()
