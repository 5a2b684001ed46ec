"""Shared test fixtures.

`megatron_single_process` starts a real one-process gloo group with megatron's process groups,
for tests of the model itself; multi-process tests launch scripts under torchrun instead
(`run_torchrun`).
"""

import os
import warnings

import pytest

from tests.utils import free_port

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")


def pytest_configure(config):
    """One intra-op thread in the test process: the tests' models are tiny, and while the
    subprocesses the tests start run alongside, more threads than cores only contend (a tiny
    training step measured 3 s with the default threads on a loaded 2-core machine, 0.15 s with
    one). Subprocesses get OMP_NUM_THREADS=1 from their launchers."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def megatron_single_process():
    """torch.distributed (gloo, world size 1) and megatron's groups, with CPU support."""
    import megatron_loopmdm  # noqa: F401
    from megatron_loopmdm.distributed.parallel import (
        ParallelConfig,
        initialize_distributed,
        set_seed,
    )

    import torch

    saved = dict(os.environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
    )
    try:
        initialize_distributed(ParallelConfig(), "cpu")
        set_seed(0)
    finally:
        # Keep torchrun-style variables out of the environment of later subprocesses.
        os.environ.clear()
        os.environ.update(saved)
    yield
    # Left initialised for the rest of the session: megatron's groups are process-global.
    assert torch.distributed.is_initialized()
