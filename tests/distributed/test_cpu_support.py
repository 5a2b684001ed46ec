"""CPU support: what `enable_cpu_support` changes, checked on the live process."""

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm import _compat
from megatron_loopmdm.distributed import cpu
from megatron_loopmdm.distributed.parallel import ParallelConfig, resolve_device

import pytest
import torch

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def test_cuda_devices_are_redirected_to_cpu():
    assert cpu.cpu_support_enabled()
    assert not torch.cuda.is_available()
    assert torch.empty(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.ones(3)
    assert x.cuda() is x and x.to("cuda:0").device.type == "cpu"
    assert x.type() == "torch.cuda.FloatTensor"  # what megatron's optimizers check
    assert x.to(torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert x.type(torch.float64).dtype == torch.float64  # typed conversions still work


def test_streams_and_events_are_complete_at_once():
    stream = torch.cuda.current_stream()
    event = torch.cuda.Event()
    event.record(stream)
    stream.wait_event(event)
    assert event.query() and stream.query()
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() == 0


def test_model_parallel_rng_tracker_keeps_independent_cpu_streams():
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.rand(4)
    default_after_fork = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(default_after_fork, torch.rand(4)), "fork must not consume the default"
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b), "the tracked stream advances between forks"
    states = tracker.get_states()
    with tracker.fork():
        c = torch.rand(4)
    tracker.set_states(states)
    with tracker.fork():
        assert torch.equal(torch.rand(4), c), "saved states restore the stream exactly"


def test_wrong_megatron_core_version_is_refused(monkeypatch):
    monkeypatch.setattr(_compat, "MEGATRON_CORE_VERSION", "0.0.1")
    with pytest.raises(RuntimeError, match="written for megatron-core 0.0.1"):
        _compat.check_megatron_core_version()


def test_device_and_layout_errors_say_what_to_change():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device(None) == "cpu"
    with pytest.raises(ValueError, match="multiple of 4"):
        ParallelConfig(
            tensor_model_parallel_size=2, pipeline_model_parallel_size=2
        ).data_parallel_size(6)
    with pytest.raises(ValueError, match="--sequence-parallel needs"):
        ParallelConfig(sequence_parallel=True)
