"""What a sampler carries from one forward pass to the next: key/value caches, loop states.

This file is copied into every converted model directory next to `modeling_loopmdm.py`, so it
imports only torch. `LoopMDMForMaskedDiffusion.make_kv_cache()` and `make_loop_warm_start()`
make them; `forward(..., kv_cache=, loop_warm_start=)` reads and writes them.
"""

from typing import Optional, Tuple

from torch import Tensor


class LoopKVCache:
    """Keys and values of every executed attention layer, for cached sampling.

    One entry per layer execution: each prelude and coda layer once, each loop-block layer once
    per loop (key `(layer index, loop index)`), each [b, kv_heads, s, head_dim] after RoPE. A
    pass over the whole sequence into an empty cache fills it; a later pass over a window
    [window_start, window_start + w) writes the window's keys and values in place and attends
    to all s positions, the others as cached.
    """

    def __init__(self):
        self.keys: dict = {}
        self.values: dict = {}
        self.length = 0
        """s, the cached sequence length (0: empty)."""
        self.num_loops = 0
        """The loop count of the pass that filled the cache."""

    def reset(self) -> None:
        self.keys, self.values, self.length, self.num_loops = {}, {}, 0, 0

    def update(self, slot: tuple, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Stores (filling pass) or writes in place (window pass); -> all keys and values."""
        if slot not in self.keys:
            assert start == 0, "a cache is filled by a pass over the whole sequence"
            self.keys[slot], self.values[slot] = k, v
            return k, v
        keys, values = self.keys[slot], self.values[slot]
        keys[:, :, start : start + k.size(2)] = k
        values[:, :, start : start + v.size(2)] = v
        return keys, values

    def nbytes(self) -> int:
        tensors = (*self.keys.values(), *self.values.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def bytes_per_token_per_layer(self) -> int:
        """Keys plus values of one position in one layer execution (one layer, one loop)."""
        if not self.keys:
            return 0
        k = next(iter(self.keys.values()))
        return 2 * k.size(1) * k.size(3) * k.element_size()


class LoopWarmStart:
    """The loop block's last output at every position, to warm-start the next pass's loop block.

    A pass given this object starts its loop block, at each position whose input token equals
    the one the previous pass saw there, from that pass's final loop state (with the prelude
    output injected, as before any loop after the first); every other position starts as
    usual from the prelude output. The pass then records its own inputs and final loop state.
    With a window (a key/value cache), only the window's positions are read and written.
    """

    def __init__(self):
        self.tokens: Optional[Tensor] = None
        """[b, s] int64, each position's input token at the pass that wrote its state."""
        self.state: Optional[Tensor] = None
        """[b, s, h], each position's final loop-block output at that pass."""

    def initial(self, input_ids: Tensor, start: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """input_ids [b, w] at [start, start + w) -> (states [b, w, h], warm [b, w] bool), or
        (None, None) before the first pass."""
        if self.state is None:
            return None, None
        positions = slice(start, start + input_ids.size(1))
        if self.tokens[:, positions].shape != input_ids.shape:
            raise ValueError(
                "loop_warm_start holds another batch or sequence length: make a new one "
                "(make_loop_warm_start()) for each generation."
            )
        return self.state[:, positions], self.tokens[:, positions] == input_ids

    def record(self, input_ids: Tensor, start: int, state: Tensor) -> None:
        """Keeps the inputs [b, w] and final loop states [b, w, h] of a pass at `start`."""
        if self.state is None:
            assert start == 0, "the first pass of a warm start covers the whole sequence"
            self.tokens, self.state = input_ids.clone(), state.detach().clone()
            return
        positions = slice(start, start + input_ids.size(1))
        self.tokens[:, positions] = input_ids
        self.state[:, positions] = state
