"""Fixes for megatron-core 0.19.2's distributed optimizer on the torch-Adam path.

Without Transformer Engine or apex, megatron's `DistributedOptimizer` wraps `torch.optim.AdamW`,
whose per-parameter `step` is a tensor in the state, and three things go wrong (measured on CPU;
GPU users without TE/apex hit them too):

1. Saving or loading before the first step: `state_dict()` asserts that all parameters share one
   step, and there are none. `prepare_for_loading()` gives the optimizer state first, using
   megatron's own dummy-state helper; the load then overwrites it.
2. Loading a `fully_reshardable` or `dp_reshardable` checkpoint:
   `_set_main_param_and_optimizer_states` looks up a `step` entry the checkpoint does not hold
   (KeyError), and copies in place into views of leaf parameters that require grad. The
   replacement copies only the tensors the checkpoint holds, under `no_grad`.
3. Silent: `load_state_dict` gives every parameter's state the *same* `step` tensor, which
   torch's Adam then increments once per parameter per step, so bias correction is wrong after
   a resume. The replacement gives each parameter its own copy.
"""

from megatron_loopmdm._compat import check_megatron_core_version

import torch
from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

_APPLIED = False


def torch_adam_path() -> bool:
    """Whether megatron's optimizers run on torch's Adam (no Transformer Engine, no apex)."""
    return not distrib_optimizer.HAVE_APEX_OR_TE


def _set_main_param_and_optimizer_states(self, model_param, tensors):
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    destinations = {"param": main_param}
    for key, value in self.optimizer.state[main_param].items():
        if isinstance(value, torch.Tensor):
            destinations[key] = value
    with torch.no_grad():
        for key, destination in destinations.items():
            source = tensors.get(key)
            if isinstance(source, torch.Tensor):
                destination.copy_(source)


def _unshare_steps(optimizer) -> None:
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def _wrap_load_state_dict(original):
    def load_state_dict(self, state_dict):
        original(self, state_dict)
        _unshare_steps(self.optimizer)

    return load_state_dict


def prepare_for_loading(optimizer) -> None:
    """Gives every distributed optimizer in `optimizer` a state to load into (fix 1)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and len(inner.optimizer.state) == 0:
            inner._init_optimizer_states_with_dummy_values()


def apply_torch_adam_fixes() -> None:
    """Applies fixes 2 and 3 on the torch-Adam path; a no-op with TE/apex. Idempotent."""
    global _APPLIED
    if _APPLIED or not torch_adam_path():
        return
    check_megatron_core_version()
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    DistributedOptimizer.load_state_dict = _wrap_load_state_dict(
        DistributedOptimizer.load_state_dict
    )
    _APPLIED = True
