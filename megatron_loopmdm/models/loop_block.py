"""The transformer block of one pipeline stage: prelude layers, the loop block, coda layers.

A stage builds the layers megatron assigns to it (even split, explicit first/last-stage counts,
or a `pipeline_model_parallel_layout`). The looped span must lie inside one stage; the stage
that holds it runs those same layer modules `num_loops` times.
"""

from typing import Optional

from megatron_loopmdm.models.config import LoopConfig
from megatron_loopmdm.models.init import LOOP_MODULES_KEY, seeded_init
from megatron_loopmdm.models.specs import TorchNorm

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.utils import make_viewless_tensor
from torch import Tensor
from torch.utils.checkpoint import checkpoint


class LoopInputInjection(torch.nn.Module):
    """Mixes the prelude output `e` back into the loop state `h` before loops 2..S.

    `add` computes h + e; `concat` computes W [h; e] with W initialised to [I, 0], so training
    starts from the plain residual carry. Parameters are replicated across tensor-parallel ranks
    and tagged for megatron's sequence-parallel grad all-reduce.
    """

    def __init__(self, config: TransformerConfig, mode: str):
        super().__init__()
        self.mode = mode
        if mode == "concat":
            h = config.hidden_size
            self.adapter = torch.nn.Linear(2 * h, h, bias=False, dtype=config.params_dtype)
            with torch.no_grad():
                self.adapter.weight.zero_()
                self.adapter.weight[:, :h].copy_(torch.eye(h))
            self.adapter.weight.sequence_parallel = config.sequence_parallel

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        if self.mode == "add":
            return h + e
        return self.adapter(torch.cat([h, e], dim=-1))


class LoopMDMBlock(MegatronModule):
    """The layers of one pipeline stage, with the loop block run `num_loops` times."""

    def __init__(
        self,
        config: TransformerConfig,
        loop_config: LoopConfig,
        spec: ModuleSpec,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        pp_rank: Optional[int] = None,
        init_seed: Optional[int] = None,
    ):
        super().__init__(config=config)
        self.loop_config = loop_config
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        self.layer_offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
        # TransformerLayer adds the stage offset to layer_number itself.
        self.layers = torch.nn.ModuleList()
        for i in range(num_layers):
            with seeded_init(init_seed, self.layer_offset + i):
                self.layers.append(
                    build_module(spec, config=config, layer_number=i + 1, vp_stage=vp_stage)
                )
        start, end = loop_config.loop_layers
        first, last = self.layer_offset, self.layer_offset + num_layers
        self.holds_loop = first <= start and end <= last
        assert self.holds_loop or end <= first or start >= last, (
            f"loop span {loop_config.loop_layers} cuts this stage's layers [{first}, {last}); "
            "the layout should have been rejected by validate_pipeline_layout"
        )
        # Local indices of the prelude part, loop block and coda part of this stage.
        if self.holds_loop:
            self.loop_slice = (start - first, end - first)
        else:
            self.loop_slice = (num_layers, num_layers)
        with seeded_init(init_seed, LOOP_MODULES_KEY):
            if self.holds_loop and loop_config.input_injection != "none":
                self.input_injection = LoopInputInjection(config, loop_config.input_injection)
            if self.holds_loop and loop_config.loop_embedding:
                self.loop_embedding = torch.nn.Embedding(
                    loop_config.max_loops, config.hidden_size, dtype=config.params_dtype
                )
                torch.nn.init.zeros_(self.loop_embedding.weight)
                self.loop_embedding.weight.sequence_parallel = config.sequence_parallel
        if post_process:
            self.final_layernorm = TorchNorm(config, config.hidden_size, config.layernorm_epsilon)
        self.input_tensor = None

    def set_input_tensor(self, input_tensor: Tensor) -> None:
        """The hidden states a non-first pipeline stage receives (set by the schedules)."""
        self.input_tensor = input_tensor

    def _run_layer(self, layer, hidden_states: Tensor, **kwargs) -> Tensor:
        if self.config.recompute_granularity == "full" and self.training:
            # Any recompute_method: every layer call is checkpointed, non-reentrantly, so each
            # call of a reused layer keeps its own saved inputs, the gradients of all loop
            # iterations sum in one backward pass, and megatron DDP's overlapped grad reduce
            # sees each parameter's gradient become ready once per step.
            return checkpoint(lambda h: layer(h, **kwargs)[0], hidden_states, use_reentrant=False)
        return layer(hidden_states, **kwargs)[0]

    def _run_layers(self, layers, hidden_states: Tensor, **kwargs) -> Tensor:
        for layer in layers:
            hidden_states = self._run_layer(layer, hidden_states, **kwargs)
        return hidden_states

    def run_loops(
        self, hidden_states: Tensor, num_loops: int, keep_intermediate: bool = False, **kwargs
    ) -> tuple[Tensor, list[Tensor]]:
        """Runs the loop block `num_loops` times on [s, b, h] hidden states.

        Returns:
            The state after the last loop [s, b, h], and with `keep_intermediate` the states
            after loops 1..num_loops-1 (each [s, b, h]; else an empty list).
        """
        start, end = self.loop_slice
        loop_layers = self.layers[start:end]
        prelude_output = hidden_states
        depth = self.loop_config.backprop_depth
        first_tracked = 0 if depth is None else max(0, num_loops - depth)
        sigma = self.loop_config.state_noise
        if self.training and sigma > 0.0:
            hidden_states = hidden_states + sigma * torch.randn_like(hidden_states)
        intermediate = []
        for i in range(num_loops):
            if i == first_tracked and i > 0:
                # Cut the graph explicitly: megatron's layer can return a grad-requiring
                # tensor even under no_grad.
                hidden_states = hidden_states.detach()
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first_tracked):
                if i > 0 and hasattr(self, "input_injection"):
                    hidden_states = self.input_injection(hidden_states, prelude_output)
                if hasattr(self, "loop_embedding"):
                    index = min(i, self.loop_config.max_loops - 1)
                    hidden_states = hidden_states + self.loop_embedding.weight[index]
                hidden_states = self._run_layers(loop_layers, hidden_states, **kwargs)
            if keep_intermediate and i < num_loops - 1:
                # A state from a loop run without autograd gets no gradient (see above).
                tracked = i >= first_tracked
                intermediate.append(hidden_states if tracked else hidden_states.detach())
        return hidden_states, intermediate

    def _head_input(self, hidden_states: Tensor, **kwargs) -> Tensor:
        """The coda layers of this stage and, on the last stage, the final norm."""
        _, end = self.loop_slice
        hidden_states = self._run_layers(self.layers[end:], hidden_states, **kwargs)
        if self.post_process:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states

    def forward(
        self,
        hidden_states: Optional[Tensor],
        attention_mask: Optional[Tensor] = None,
        rotary_pos_emb: Optional[Tensor] = None,
        num_loops: int = 1,
        with_intermediate: bool = False,
    ):
        """[s, b, h] -> [s, b, h] (s is the local slice under sequence parallelism).

        With `with_intermediate` (the intermediate-loop loss; the stage must hold both the loop
        block and the final norm), returns `(output, intermediate)`: `intermediate` holds, for
        each of loops 1..num_loops-1, the loop state after that loop passed through the coda
        layers and the final norm like the final output ([s, b, h] each; empty when S = 1).
        """
        if num_loops < 1:
            raise ValueError(f"num_loops={num_loops}: run the loop block at least once.")
        assert not with_intermediate or (self.holds_loop and self.post_process), (
            "intermediate loop outputs need the loop block and the final norm on one stage; "
            "LoopConfig.validate_for refuses the option under pipeline parallelism"
        )
        if not self.pre_process:
            hidden_states = self.input_tensor
        kwargs = dict(attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
        start, _ = self.loop_slice
        hidden_states = self._run_layers(self.layers[:start], hidden_states, **kwargs)
        intermediate = []
        if self.holds_loop:
            hidden_states, intermediate = self.run_loops(
                hidden_states, num_loops, keep_intermediate=with_intermediate, **kwargs
            )
        hidden_states = self._head_input(hidden_states, **kwargs)
        # Pipeline p2p sends need a tensor that does not view another's storage.
        hidden_states = make_viewless_tensor(hidden_states, requires_grad=True, keep_graph=True)
        if not with_intermediate:
            return hidden_states
        return hidden_states, [self._head_input(h, **kwargs) for h in intermediate]

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> ShardedStateDict:
        """Checkpoint keys by *global* layer index, so any pipeline layout can load them.

        Layer i of this stage is saved as `layers.{layer_offset + i}`; the other modules
        (final norm, input injection, loop embedding) under their own names.
        """
        assert not sharded_offsets, "LoopMDMBlock is the top of its sharding hierarchy"
        sharded = {}
        for i, layer in enumerate(self.layers):
            local_prefix = f"{prefix}layers.{i}."
            global_prefix = f"{prefix}layers.{self.layer_offset + i}."
            layer_sharded = layer.sharded_state_dict(local_prefix, (), metadata)
            replace_prefix_for_sharding(layer_sharded, local_prefix, global_prefix)
            sharded.update(layer_sharded)
        # Replicated modules need the TP group, else every TP rank claims the main replica:
        # the groups the layers were built with (the model's), globals only for an empty stage.
        tp_group = (
            self.layers[0].pg_collection.tp
            if len(self.layers)
            else parallel_state.get_tensor_model_parallel_group()
        )
        for name, module in self.named_children():
            if module is not self.layers:
                sharded.update(
                    sharded_state_dict_default(
                        module, f"{prefix}{name}.", (), metadata, tp_group=tp_group
                    )
                )
        return sharded
