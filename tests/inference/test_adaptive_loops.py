"""Adaptive loops: each stopping rule stops where it should, freezing keeps states, budgets hold.

Models with known convergence: `fixed_point_model` zeroes the loop layer's residual branches
(attention output and MLP down projection), so the loop block is the identity and the state is
a fixed point after loop 1; hand-made state and prediction sequences drive `LoopController`
directly for rules whose stopping loop is computed by hand.
"""

from megatron_loopmdm.hf import LoopMDMConfig, LoopMDMForMaskedDiffusion
from megatron_loopmdm.hf.loop_policy_loopmdm import LoopController
from megatron_loopmdm.inference import LoopPolicy, SamplerConfig, generate

import pytest
import torch

from tests.inference.tiny_model import MASK, sample_sequences, train_tiny_model

VOCAB = 32


@pytest.fixture(scope="module")
def fixed_point_model():
    torch.manual_seed(0)
    config = LoopMDMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, mask_token_id=VOCAB - 1, loop_layers=(1, 2),
                           max_loops=4)  # fmt: skip
    model = LoopMDMForMaskedDiffusion(config).eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    return model


def _ids(b=3, s=10, mask_id=VOCAB - 1):
    ids = torch.randint(0, VOCAB - 1, (b, s), generator=torch.Generator().manual_seed(1))
    ids[:, s // 2 :] = mask_id
    return ids


@pytest.mark.parametrize("per", ["batch", "sample", "position"])
@pytest.mark.parametrize("stop,threshold,patience,expected", [
    ("state", 1e-6, 1, 2), ("kl", 1e-9, 1, 2), ("argmax", None, 1, 2), ("argmax", None, 3, 4),
])  # fmt: skip
def test_every_rule_stops_at_the_fixed_point(fixed_point_model, per, stop, threshold,
                                             patience, expected):  # fmt: skip
    model, ids = fixed_point_model, _ids()
    policy = LoopPolicy(threshold=threshold, stop=stop, per=per, patience=patience, max_loops=8)
    controller = policy.controller(model.config.mask_token_id)
    out = model(ids, num_loops=8, loop_controller=controller)
    assert out.num_loops == expected
    assert controller.row_loops.tolist() == [expected] * 3
    # The identity loop block: the logits of any S are those of S = 1, exactly.
    assert torch.equal(out.logits, model(ids, num_loops=1).logits)
    assert controller.probe_rows == (0 if stop == "state" else 3 * expected)


def _drive(policy, states, logits=None, b=2, w=4):
    """Runs a controller over given loop states [L][b, w, h] (and probe logits); -> controller."""
    controller = LoopController(policy, mask_token_id=99)
    controller.begin(torch.full((b, w), 99), None, skip_rows=True)
    x = states[0]
    for i in range(1, len(states)):
        previous, x = x, states[i]

        def probe(state, rows, i=i):
            return logits[i][rows]

        x = controller.after_loop(i - 1, x, previous, probe)
        if controller.done:
            break
    return controller


def test_state_rule_per_sample_stops_each_sample_at_its_own_loop():
    # Row 0 is constant; row 1 halves its distance to the fixed point 1 at every loop:
    # relative change 0.5^i / (1 + 0.5^(i-1)) < 0.01 first at i = 7.
    h = 3
    states = [torch.stack([torch.ones(4, h), torch.full((4, h), 1 + 0.5**i)]) for i in range(12)]
    sample = _drive(LoopPolicy(threshold=0.01, per="sample"), states)
    assert sample.row_loops.tolist() == [2, 7]
    batch = _drive(LoopPolicy(threshold=0.01, per="batch", stop="state"), states)
    assert batch.row_loops.tolist() == [7, 7]
    floor = _drive(LoopPolicy(threshold=0.01, per="sample", min_loops=4), states)
    assert floor.row_loops.tolist() == [4, 7]


def test_argmax_and_kl_rules_on_known_prediction_sequences():
    # Loop i's logits: row 0 predicts token 0 at every loop, row 1 predicts token i until it
    # settles on 3 at loop 3; with patience 2 they stop at loops 3 and 5.
    def logits_at(i):
        out = torch.zeros(2, 4, 5)
        out[0, :, 0] = 5.0
        out[1, :, min(i, 3)] = 5.0
        return out

    logits = [logits_at(i) for i in range(10)]
    states = [torch.randn(2, 4, 3) for _ in range(10)]
    argmax = _drive(LoopPolicy(stop="argmax", patience=2, per="sample"), states, logits)
    assert argmax.row_loops.tolist() == [3, 5]
    # KL between identical predictions is 0; at the switch it is large: one loop after it.
    kl = _drive(LoopPolicy(stop="kl", threshold=1e-6, per="sample"), states, logits)
    assert kl.row_loops.tolist() == [2, 4]


class _RecordingController(LoopController):
    """A controller that keeps the state after every loop (for the freezing check)."""

    def after_loop(self, i, x, previous, probe):
        x = super().after_loop(i, x, previous, probe)
        self.states = getattr(self, "states", []) + [x.clone()]
        self.frozen_after = getattr(self, "frozen_after", []) + [self.frozen.clone()]
        return x


def test_per_position_freezing_keeps_converged_positions_bit_for_bit():
    model = train_tiny_model()
    ids = sample_sequences(4, torch.Generator().manual_seed(3))
    ids[:, 4:] = MASK
    outputs = _loop_outputs(model, ids, 8)
    change = torch.stack([(b - a).norm(dim=-1) / a.norm(dim=-1)
                          for a, b in zip(outputs[1:-1], outputs[2:])])  # fmt: skip
    # The median of each position's smallest change: about half the positions get below it
    # (and freeze), half never do. (The median over all loops froze every position where the
    # change shrinks at each loop, as it does on this machine: it split nothing.)
    threshold = float(change.amin(0).flatten().median())
    policy = LoopPolicy(threshold=threshold, per="position", max_loops=8)
    controller = _RecordingController(policy, MASK)
    model(ids, num_loops=8, loop_controller=controller)
    frozen = controller.frozen_after
    assert frozen[-1].any() and not frozen[-1].all(), "the threshold must split the positions"
    for i, mask in enumerate(frozen):
        for later in controller.states[i + 1 :]:
            assert torch.equal(later[mask], controller.states[i][mask])
    width, loops = ids.numel(), len(controller.states)
    assert controller.active_position_loops < width * loops


def _loop_outputs(model, ids, num_loops):
    """[S + 1] loop-block inputs/outputs of a fixed-S pass (prelude output first)."""
    hidden = model(ids, num_loops=num_loops, output_hidden_states=True).hidden_states
    start, end = model.config.loop_layers
    return [hidden[start]] + [hidden[start + (end - start) * (i + 1)] for i in range(num_loops)]


def test_per_sample_stopping_matches_each_sample_run_alone():
    model = train_tiny_model()
    ids = sample_sequences(6, torch.Generator().manual_seed(4))
    ids[:, 3:] = MASK
    outputs = _loop_outputs(model, ids, 8)
    change = torch.stack([
        ((b - a).pow(2).sum((1, 2)) / a.pow(2).sum((1, 2))).sqrt()
        for a, b in zip(outputs[:-1], outputs[1:])
    ])  # fmt: skip  # [8, rows], change of loop i + 1
    values = change[1:].flatten().sort().values
    threshold = float(values[len(values) // 2 - 1 : len(values) // 2 + 1].mean())
    # Reference: each row's first loop >= 2 whose change is below the threshold (else 8).
    below = change[1:] < threshold
    expected = [int(below[:, r].nonzero()[0]) + 2 if below[:, r].any() else 8 for r in range(6)]
    assert len(set(expected)) > 1, "the rows must stop at different loops"
    controller = LoopPolicy(threshold=threshold, per="sample", max_loops=8).controller(MASK)
    out = model(ids, num_loops=8, loop_controller=controller)
    assert controller.row_loops.tolist() == expected
    for r in range(6):
        alone = model(ids[r : r + 1], num_loops=expected[r]).logits
        torch.testing.assert_close(out.logits[r : r + 1], alone, rtol=1e-5, atol=1e-5)


def test_sampler_counts_per_sample_loops_and_keeps_the_budget():
    model = train_tiny_model()
    prompts = sample_sequences(6, torch.Generator().manual_seed(5), length=2)
    base = dict(gen_length=12, steps=6, block_length=6)
    fixed = generate(model, prompts, SamplerConfig(**base, loops=LoopPolicy(num_loops=6)))
    assert fixed.loops_per_row.tolist() == [36] * 6
    adaptive = generate(model, prompts, SamplerConfig(
        **base, loops=LoopPolicy(stop="argmax", patience=1, per="sample", max_loops=6)))
    assert adaptive.loop_evaluations_per_sample < fixed.loop_evaluations_per_sample
    assert adaptive.probe_evaluations > 0 and adaptive.model_flops != fixed.model_flops
    budget = generate(model, prompts, SamplerConfig(
        **base, loops=LoopPolicy(stop="argmax", patience=3, max_loops=6, budget=1.5)))
    assert (budget.loops_per_row <= 1.5 * 12).all()
    assert budget.loops_per_row.max() == 18, "the budget is spent, where predictions move"
    with pytest.raises(ValueError, match="loop-budget"):
        SamplerConfig(**base, loops=LoopPolicy(stop="argmax", budget=0.25))


def test_policy_errors_name_the_flag():
    with pytest.raises(ValueError, match="--loop-threshold"):
        LoopPolicy(stop="kl", per="sample", budget=2.0)
    with pytest.raises(ValueError, match="--loop-patience"):
        LoopPolicy(stop="argmax", patience=0)
    with pytest.raises(ValueError, match="granularity"):
        LoopPolicy(threshold=0.1, per="token")
