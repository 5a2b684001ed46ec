"""Import-time compatibility for megatron-core 0.19.2.

`megatron.core.pipeline_parallel.schedules` imports the MoE paged-stash module, whose Triton
kernels import `triton` unconditionally. Triton is absent on CPU machines (and on some GPU
images); we use no MoE, so a stand-in for that one module lets megatron-core import. Faking the
whole `triton` package instead would break `torch._inductor`, so only the leaf module is replaced.
"""

import importlib.util
import sys
import types

MEGATRON_CORE_VERSION = "0.19.2"
_PAGED_STASH_OPS = "megatron.core.transformer.moe.ops.paged_stash"


def _paged_stash_unavailable(*args, **kwargs):
    raise RuntimeError("MoE paged stash needs Triton, which is not installed.")


def prepare_megatron_import() -> None:
    """Registers the paged-stash stand-in when Triton is missing; a no-op otherwise."""
    if importlib.util.find_spec("triton") is not None or _PAGED_STASH_OPS in sys.modules:
        return
    stub = types.ModuleType(_PAGED_STASH_OPS)
    stub.GLOBAL_BLOCK_SIZE = 1024
    stub.paged_stash_copy_kernel = _paged_stash_unavailable
    stub.paged_stash_pop_kernel = _paged_stash_unavailable
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[_PAGED_STASH_OPS] = stub


def check_megatron_core_version() -> None:
    """Raises a clear error when the installed megatron-core is not the pinned release."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("megatron-core")
    except PackageNotFoundError as e:
        raise RuntimeError(
            f"megatron-core is not installed; run `make install` (pins {MEGATRON_CORE_VERSION})."
        ) from e
    if found != MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"megatron-loopmdm is written for megatron-core {MEGATRON_CORE_VERSION}, found "
            f"{found}. Run `make install` to get the pinned release."
        )
