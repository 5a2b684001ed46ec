"""Running megatron-core on CPU with the gloo backend.

megatron-core 0.19.2 assumes CUDA throughout: it asks `torch.cuda.current_device()` for the device
of new buffers (RoPE frequencies, pipeline p2p buffers, DDP grad buffers), syncs streams and
events, creates `device="cuda"` tensors (the schedules' token counter, the optimizer's `found_inf`,
grad clipping), checks `param.type() == "torch.cuda.FloatTensor"` in its optimizers, and keeps its
model-parallel RNG streams as CUDA generator states.

`enable_cpu_support()` makes all of that run on the CPU, which is how this project runs for real on
a laptop and how CI tests the distributed code. It is applied only when CUDA is absent or
`--device cpu` is asked for, and it changes exactly these things:

1. `torch.cuda` stream, event, synchronize and memory-statistics functions become no-ops,
   `torch.cuda.is_available()` reports False, and `torch.cuda.current_device()` returns the CPU
   device. (It must be a CPU device, not an index that 2. maps: backward passes run inside
   `torch.autograd.backward`, where a function mode does not reach, and megatron's
   tensor-parallel backward functions allocate on `torch.cuda.current_device()`.)
2. A `TorchFunctionMode` is entered for the whole process: it rewrites every CUDA device argument
   (`device="cuda"`, `device=0`, `.cuda()`, `.to("cuda")`) to the CPU, and answers the untyped
   `tensor.type()` query with the CUDA type name that megatron's optimizers expect.
3. Megatron's model-parallel RNG tracker is replaced by one with the same interface that keeps
   CPU generator states, so `get_cuda_rng_tracker().fork()` (dropout in TP regions, weight
   init) works and checkpoints can save and restore RNG states.

One setting also depends on gloo: `models.builder.transformer_config` turns off batched
pipeline p2p (`batch_p2p_comm`, unless `ParallelConfig` sets it), because gloo mismatches batched
isend/irecv messages under the interleaved schedule.

The fixes for megatron-core's distributed-optimizer bugs on the torch-Adam path (always the path
on CPU) are not applied here: `training.setup.build_optimizer` applies them wherever an
optimizer is built, since GPU users without Transformer Engine or apex need them too.
"""

import contextlib

from megatron_loopmdm._compat import check_megatron_core_version

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE = None

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal (torch's own convention).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU and reports CUDA type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args))
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """A stand-in for `torch.cuda.Stream`: every operation is already complete on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent:
    """A stand-in for `torch.cuda.Event`."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.is_available = lambda: False
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_device = lambda device: None
    for name in (
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
    ):
        setattr(cuda, name, lambda device=None: 0)
    cuda.reset_peak_memory_stats = lambda device=None: None


def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's RNG tracker interface over CPU generator states.

        Megatron's tracker forks named CUDA generator states; on the CPU the default CPU
        generator plays that role, so tracked streams stay independent of the default stream.
        """

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def cpu_support_enabled() -> bool:
    """Whether `enable_cpu_support` has been applied in this process."""
    return _ENABLED


def enable_cpu_support() -> None:
    """Makes megatron-core run on the CPU with gloo (see the module docstring). Idempotent.

    On a machine with CUDA (`--device cpu` asked for), `torch.cuda.is_available()` reports
    False afterwards, so that megatron-core takes its non-CUDA paths.

    Raises:
        RuntimeError: if the installed megatron-core is not the release this module was
            written for.
    """
    global _ENABLED, _MODE
    if _ENABLED:
        return
    check_megatron_core_version()
    _patch_torch_cuda()
    _install_cpu_rng_tracker()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
