"""`loop_state_changes`: the loop block's relative change per loop, against a hand-run loop."""

from megatron_loopmdm.evaluation.loop_convergence import loop_state_changes
from megatron_loopmdm.hf import LoopMDMConfig, LoopMDMForMaskedDiffusion

import pytest
import torch

VOCAB, MASK = 16, 15
EXAMPLES = [{"prompt": "3141", "answer": "59"}, {"prompt": "27", "answer": "1828"}]


def _encode(text):
    return [int(c) for c in text]


def _model(scale_loop_branches=1.0):
    torch.manual_seed(0)
    config = LoopMDMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=4, mask_token_id=MASK,
                           loop_layers=(1, 2), max_loops=3, max_position_embeddings=32,
                           position_embedding_type="learned_absolute")  # fmt: skip
    model = LoopMDMForMaskedDiffusion(config).eval()
    with torch.no_grad():
        layer = model.model.layers[1]
        layer.self_attn.o_proj.weight.mul_(scale_loop_branches)
        layer.mlp.down_proj.weight.mul_(scale_loop_branches)
    return model


def _by_hand(model, example, num_loops, eos):
    """The prelude layer once, then the loop layer S times, called directly."""
    prompt = _encode(example["prompt"])
    ids = torch.tensor([prompt + [MASK] * (len(example["answer"]) + eos)])
    inner = model.model
    x = inner.embed_tokens(ids) + inner.embed_positions(torch.arange(ids.size(1)))
    x = inner.layers[0](x, None, None, None)
    states = [x]
    for _ in range(num_loops):
        states.append(inner.layers[1](states[-1], None, None, None))
    answer = [s[0, len(prompt) :].double() for s in states]
    return [float((answer[i] - answer[i - 1]).norm() / answer[i - 1].norm())
            for i in range(1, num_loops + 1)]  # fmt: skip


@torch.no_grad()
def test_changes_equal_a_hand_run_loop_and_do_not_depend_on_s():
    model = _model()
    changes = loop_state_changes(model, EXAMPLES, _encode, 5, eos_id=0)
    hand = [sum(v) / 2 for v in zip(*(_by_hand(model, e, 5, 1) for e in EXAMPLES))]
    assert changes == pytest.approx(hand, rel=1e-6)
    assert len(changes) == 5 and all(c > 0 for c in changes)
    # The state after loop i does not depend on how many loops follow.
    assert loop_state_changes(model, EXAMPLES, _encode, 3, eos_id=0) == pytest.approx(changes[:3])


@torch.no_grad()
def test_an_identity_loop_block_is_converged_and_a_weaker_block_moves_less():
    assert loop_state_changes(_model(0.0), EXAMPLES, _encode, 4) == [0.0] * 4
    strong = loop_state_changes(_model(1.0), EXAMPLES, _encode, 4)
    weak = loop_state_changes(_model(0.1), EXAMPLES, _encode, 4)
    assert all(w < s for w, s in zip(weak, strong))


def test_zero_loops_are_refused():
    with pytest.raises(ValueError, match="at least once"):
        loop_state_changes(_model(), EXAMPLES, _encode, 0)
