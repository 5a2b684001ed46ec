"""The LoopMDM model in one process: looping, unrolling, bidirectionality, options."""

import dataclasses

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.distributed.parallel import ParallelConfig
from megatron_loopmdm.models.builder import build_model, loop_config_for, transformer_config
from megatron_loopmdm.models.config import LoopConfig, LoopMDMModelConfig
from megatron_loopmdm.models.sizes import get_model_size

import pytest
import torch

VOCAB, MASK_ID, SEQ = 96, 95, 24

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def make_model(loop_config: LoopConfig, num_layers: int = 4, seed: int = 3, **config_overrides):
    size = get_model_size("debug")
    config = transformer_config(size, ParallelConfig(), num_layers=num_layers, **config_overrides)
    model_config = LoopMDMModelConfig(VOCAB, SEQ, MASK_ID)
    return build_model(config, loop_config, model_config, init_seed=seed)


def unrolled_twin(model, num_loops: int):
    """A non-looped model whose layers are prelude, num_loops copies of the loop, coda."""
    loop = model.loop_config
    num_layers = model.config.num_layers
    indices = loop.unrolled_layer_indices(num_layers, num_loops)
    twin = make_model(LoopConfig(loop_layers=(0, 1), max_loops=1), num_layers=len(indices), seed=99)
    source = model.state_dict()
    target = {}
    for key in twin.state_dict():
        if key.startswith("decoder.layers."):
            j, rest = key[len("decoder.layers.") :].split(".", 1)
            key_in_source = f"decoder.layers.{indices[int(j)]}.{rest}"
        else:
            key_in_source = key
        value = source[key_in_source]
        target[key] = value.clone() if isinstance(value, torch.Tensor) else value
    twin.load_state_dict(target)
    return twin, indices


def tokens(batch=2, seed=0):
    return torch.randint(0, MASK_ID, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_loops", [1, 3, 5])
def test_looped_equals_unrolled_logits_and_grads(num_loops):
    model = make_model(LoopConfig(loop_layers=(1, 3), max_loops=3))
    twin, indices = unrolled_twin(model, num_loops)
    ids = tokens()
    ids[:, ::3] = MASK_ID

    looped = model(ids, num_loops=num_loops, labels=ids)
    unrolled = twin(ids, num_loops=1, labels=ids)
    logits_looped = model(ids, num_loops=num_loops)
    logits_unrolled = twin(ids, num_loops=1)
    finite = torch.isfinite(logits_looped)
    scale = logits_unrolled[finite].abs().max()
    assert ((logits_looped - logits_unrolled)[finite].abs().max() / scale) <= 1e-5
    assert torch.equal(finite, torch.isfinite(logits_unrolled))

    looped.sum().backward()
    unrolled.sum().backward()
    looped_grads = dict(model.named_parameters())
    summed = {}
    for name, param in twin.named_parameters():
        if name.startswith("decoder.layers."):
            j, rest = name[len("decoder.layers.") :].split(".", 1)
            name = f"decoder.layers.{indices[int(j)]}.{rest}"
        summed[name] = summed.get(name, 0) + param.grad
    for name, param in looped_grads.items():
        reference = summed[name]
        err = (param.grad - reference).abs().max() / reference.abs().max().clamp_min(1e-12)
        assert err <= 1e-5, f"{name}: relative gradient difference {err}"


def test_parameter_count_independent_of_loops_and_any_loop_count_runs():
    small = make_model(LoopConfig(loop_layers=(1, 2), max_loops=2))
    large = make_model(LoopConfig(loop_layers=(1, 2), max_loops=8))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) == count(large)
    ids = tokens()
    outputs = {s: small(ids, num_loops=s) for s in (1, 2, 5)}  # 5 > max_loops
    assert outputs[5].shape == (2, SEQ, VOCAB)
    assert not torch.allclose(outputs[2], outputs[5])
    assert count(small) == count(small)  # running more loops built nothing new
    with pytest.raises(ValueError, match="at least once"):
        small(ids, num_loops=0)


def test_mask_token_is_never_predicted():
    model = make_model(LoopConfig(loop_layers=(1, 2), max_loops=2))
    logits = model(tokens(), num_loops=2)
    assert torch.isneginf(logits[..., MASK_ID]).all()
    assert torch.isfinite(logits[..., :MASK_ID]).all()


def test_attention_is_bidirectional():
    model = make_model(LoopConfig(loop_layers=(1, 2), max_loops=2))
    ids = tokens(batch=1)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % MASK_ID
    first = model(ids)[0, 0, :MASK_ID]
    second = model(changed)[0, 0, :MASK_ID]
    assert (first - second).abs().max() > 1e-4, "position 0 must depend on the last token"


def test_padding_mask_hides_padded_keys():
    model = make_model(LoopConfig(loop_layers=(1, 2), max_loops=2))
    ids = tokens(batch=1)
    pad = torch.zeros(1, 1, 1, SEQ, dtype=torch.bool)
    pad[..., -4:] = True  # True = not attended
    changed = ids.clone()
    changed[0, -4:] = 0
    a = model(ids, attention_mask=pad)[0, : SEQ - 4]
    b = model(changed, attention_mask=pad)[0, : SEQ - 4]
    assert torch.allclose(a, b, atol=1e-6)


def test_sdpa_core_attention_matches_megatron_unfused_attention():
    from megatron_loopmdm.models import specs
    from megatron_loopmdm.models.loopmdm_model import LoopMDMModel

    from megatron.core.transformer.dot_product_attention import DotProductAttention

    model = make_model(LoopConfig(loop_layers=(1, 2), max_loops=2))
    spec = specs.loopmdm_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = DotProductAttention
    reference = LoopMDMModel(model.config, model.loop_config, model.model_config, spec, init_seed=3)
    reference.load_state_dict(model.state_dict(), strict=False)
    ids = tokens()
    a, b = model(ids, num_loops=2), reference(ids, num_loops=2)
    finite = torch.isfinite(a)
    assert (a - b)[finite].abs().max() <= 1e-5 * b[finite].abs().max()


@pytest.mark.parametrize("injection", ["add", "concat"])
def test_input_injection_and_loop_embedding_change_loops_2_onwards(injection):
    base = LoopConfig(loop_layers=(1, 2), max_loops=3)
    plain = make_model(base)
    varied = make_model(dataclasses.replace(base, input_injection=injection, loop_embedding=True))
    ids = tokens()
    # concat starts as the identity carry and the loop embedding starts at zero.
    same_at_init = injection == "concat"
    assert torch.allclose(plain(ids, num_loops=1), varied(ids, num_loops=1), atol=1e-6)
    assert torch.allclose(plain(ids, num_loops=3), varied(ids, num_loops=3), atol=1e-6) == (
        same_at_init
    )
    loss = varied(ids, num_loops=3, labels=ids).mean()
    loss.backward()
    assert varied.decoder.loop_embedding.weight.grad[:3].abs().sum() > 0
    if injection == "concat":
        assert varied.decoder.input_injection.adapter.weight.grad.abs().sum() > 0


def test_truncated_backprop_only_last_loops_get_gradient():
    config = LoopConfig(loop_layers=(1, 2), max_loops=4, backprop_depth=1)
    model = make_model(config)
    full = make_model(dataclasses.replace(config, backprop_depth=None))
    twin, indices = unrolled_twin(full, 3)
    ids = tokens()
    model(ids, num_loops=3, labels=ids).sum().backward()
    twin(ids, num_loops=1, labels=ids).sum().backward()
    # Only the last copy of the loop layer (unrolled layer 3) contributes.
    last_copy = dict(twin.named_parameters())["decoder.layers.3.mlp.linear_fc2.weight"].grad
    looped = dict(model.named_parameters())["decoder.layers.1.mlp.linear_fc2.weight"].grad
    assert torch.allclose(looped, last_copy, rtol=1e-5, atol=1e-8)
    # Without input injection the prelude sits behind the cut.
    prelude = dict(model.named_parameters())["decoder.layers.0.mlp.linear_fc2.weight"]
    assert prelude.grad is None or prelude.grad.abs().sum() == 0


def test_full_recompute_gives_identical_gradients():
    base = make_model(LoopConfig(loop_layers=(1, 3), max_loops=3))
    recomputed = make_model(
        LoopConfig(loop_layers=(1, 3), max_loops=3),
        recompute_granularity="full",
        recompute_method="uniform",
        recompute_num_layers=1,
    )
    ids = tokens()
    base(ids, num_loops=3, labels=ids).sum().backward()
    recomputed(ids, num_loops=3, labels=ids).sum().backward()
    for (name, a), (_, b) in zip(base.named_parameters(), recomputed.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-9), name


@pytest.mark.parametrize(
    "normalization,swiglu,position",
    [
        ("LayerNorm", False, "learned_absolute"),
        ("RMSNorm", True, "rope"),
    ],
)
def test_architecture_variants_run(normalization, swiglu, position):
    size = dataclasses.replace(get_model_size("debug"), normalization=normalization, swiglu=swiglu)
    config = transformer_config(size, ParallelConfig())
    model = build_model(
        config,
        loop_config_for(size),
        LoopMDMModelConfig(
            VOCAB,
            SEQ,
            MASK_ID,
            position_embedding_type=position,
            share_embeddings_and_output_weights=False,
        ),
        init_seed=0,
    )
    ids = tokens()
    position_ids = torch.arange(SEQ).expand_as(ids)
    loss = model(ids, position_ids=position_ids, labels=ids)
    assert loss.shape == ids.shape and torch.isfinite(loss).all()
    assert model.output_layer.weight is not None  # untied output layer
    norm = model.decoder.final_layernorm
    assert isinstance(
        norm, torch.nn.LayerNorm if normalization == "LayerNorm" else torch.nn.RMSNorm
    )


def test_bad_loop_span_is_rejected():
    with pytest.raises(ValueError, match="reaches past the last layer"):
        make_model(LoopConfig(loop_layers=(2, 6), max_loops=2))
    with pytest.raises(ValueError, match="0 <= start < end"):
        LoopConfig(loop_layers=(3, 3))
    with pytest.raises(ValueError, match="loop_sampling"):
        LoopConfig(loop_sampling="gaussian")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        LoopMDMModelConfig(vocab_size=10, max_sequence_length=8, mask_token_id=10)


def test_state_noise_is_added_to_the_loop_input_in_training_only():
    sigma = 0.5
    base = LoopConfig(loop_layers=(1, 3), max_loops=3)
    plain = make_model(base)
    noisy = make_model(dataclasses.replace(base, state_noise=sigma))
    ids = tokens()
    # Eval mode: no noise, the same logits as the model without the option.
    plain.eval(), noisy.eval()
    assert torch.equal(plain(ids, num_loops=3), noisy(ids, num_loops=3))
    # Training mode: the reference adds the same draw by hand before the first loop layer,
    # once (a pre-hook fires on every loop, so the reference removes itself after one call).
    plain.train(), noisy.train()

    def add_noise_once(module, args):
        handle.remove()
        return (args[0] + sigma * torch.randn_like(args[0]),) + args[1:]

    handle = plain.decoder.layers[1].register_forward_pre_hook(add_noise_once)
    torch.manual_seed(7)
    expected = plain(ids, num_loops=3)
    torch.manual_seed(7)
    got = noisy(ids, num_loops=3)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, plain(ids, num_loops=3), atol=1e-3)


def test_bad_state_noise_is_rejected():
    with pytest.raises(ValueError, match="state_noise"):
        LoopConfig(state_noise=-0.1)
