"""GPU-only checks, run in their own process (the rest of the suite runs in CPU mode)."""

import pytest
import torch

from tests.utils import REPO, run_torchrun

# Read at collection, before any fixture switches this process to CPU mode.
HAS_CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_bf16_and_transformer_engine_spec_on_gpu():
    result = run_torchrun(REPO / "tests" / "models" / "gpu_worker.py", 1)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "gpu checks passed" in result.stdout
