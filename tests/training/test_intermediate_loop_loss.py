"""The intermediate-loop loss (`--intermediate-loop-loss-weight`): the training step's loss
against a hand computation that runs the layers loop by loop, its gradient, and its refusals."""

import dataclasses

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.diffusion.config import DiffusionConfig
from megatron_loopmdm.diffusion.noise import mask_tokens, sample_times
from megatron_loopmdm.distributed.parallel import ParallelConfig
from megatron_loopmdm.models.builder import build_model, transformer_config
from megatron_loopmdm.models.config import LoopConfig, LoopMDMModelConfig
from megatron_loopmdm.models.sizes import get_model_size
from megatron_loopmdm.training import arguments
from megatron_loopmdm.training.step import make_forward_step

import pytest
import torch
import torch.nn.functional as F

VOCAB, MASK_ID, SEQ, SEED, W = 96, 95, 24, 11, 0.3
LOOP = LoopConfig(loop_layers=(1, 3), max_loops=3, intermediate_loss_weight=W)

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def make_model(loop_config: LoopConfig = LOOP):
    """4 layers: prelude 0, loop block 1-2, coda 3 (debug widths), in training mode."""
    config = transformer_config(get_model_size("debug"), ParallelConfig(), num_layers=4)
    model = build_model(config, loop_config, LoopMDMModelConfig(VOCAB, SEQ, MASK_ID), init_seed=5)
    return model.train()


def batch(size=3):
    tokens = torch.randint(0, MASK_ID, (size, SEQ), generator=torch.Generator().manual_seed(2))
    return {"tokens": tokens, "sample_index": torch.arange(40, 40 + size)}


def training_step_loss(model, data, num_loops):
    """The training step's loss function on one micro-batch: (loss sum, tokens, report)."""
    forward_step = make_forward_step(DiffusionConfig(MASK_ID), SEED, num_loops)
    output, loss_func = forward_step(iter([data]), model)
    return loss_func(output)


def hand_nelbos(model, data, num_loops):
    """Per-token NELBO of the head on the state after each loop 1..S, by hand: the layers run
    one by one, the head is the tied embedding, the [MASK] logit -inf, torch's cross entropy."""
    tokens, index = data["tokens"], data["sample_index"]
    t = sample_times(index, SEED)
    noisy, mask, p_mask = mask_tokens(tokens, index, SEED, MASK_ID, 1e-3, t)
    layers = model.decoder.layers
    kwargs = dict(attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(SEQ))
    position_ids = torch.arange(SEQ).expand_as(tokens)
    h = layers[0](model.embedding(noisy, position_ids), **kwargs)[0]  # [s, b, h]
    nelbos = []
    for _ in range(num_loops):
        h = layers[2](layers[1](h, **kwargs)[0], **kwargs)[0]
        out = model.decoder.final_layernorm(layers[3](h, **kwargs)[0])
        logits = F.linear(out, model.embedding.word_embeddings.weight).transpose(0, 1)
        logits[..., MASK_ID] = float("-inf")  # [b, s, v]
        ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")  # [b, s]
        nelbos.append(((ce * mask).sum(1) / p_mask).sum() / tokens.numel())
    return nelbos


def test_loss_is_final_nelbo_plus_w_times_mean_intermediate_nelbo():
    model, data = make_model(), batch()
    loss_sum, num_tokens, report = training_step_loss(model, data, num_loops=3)
    *intermediate, final = hand_nelbos(model, data, num_loops=3)
    expected = final + W * torch.stack(intermediate).mean()
    n = int(num_tokens)
    assert n == data["tokens"].numel()
    assert (loss_sum / n).item() == pytest.approx(expected.item(), rel=1e-6)
    # The reported NELBO stays the final loop's; the added term is reported beside it.
    assert (report["nelbo"][0] / n).item() == pytest.approx(final.item(), rel=1e-6)
    term = report["intermediate_loss"][0] / report["intermediate_loss"][1]
    assert term.item() == pytest.approx(W * torch.stack(intermediate).mean().item(), rel=1e-6)


def test_intermediate_term_trains_the_loop_layers_like_the_hand_computation():
    model, data = make_model(), batch()
    loss_sum, num_tokens, _ = training_step_loss(model, data, num_loops=3)
    *intermediate, final = hand_nelbos(model, data, num_loops=3)
    n = int(num_tokens)
    loop_weight = model.decoder.layers[1].mlp.linear_fc1.weight

    def grad(loss):
        return torch.autograd.grad(loss, loop_weight, retain_graph=True)[0]

    from_intermediate = grad(n * W * torch.stack(intermediate).mean())
    assert from_intermediate.abs().sum() > 0
    got = grad(loss_sum)
    scale = got.abs().max()
    assert (got - grad(n * final) - from_intermediate).abs().max() <= 1e-5 * scale


def test_one_loop_adds_nothing_and_eval_mode_never_adds_the_term():
    data = batch()
    weighted = make_model()
    plain = make_model(dataclasses.replace(LOOP, intermediate_loss_weight=0))
    loss_sum, _, report = training_step_loss(weighted, data, num_loops=1)
    plain_sum, _, plain_report = training_step_loss(plain, data, num_loops=1)
    assert torch.equal(loss_sum, plain_sum)
    assert report["intermediate_loss"][0] == 0 and "intermediate_loss" not in plain_report
    weighted.eval(), plain.eval()
    eval_sum, _, eval_report = training_step_loss(weighted, data, num_loops=3)
    assert torch.equal(eval_sum, training_step_loss(plain, data, num_loops=3)[0])
    assert "intermediate_loss" not in eval_report


def test_negative_weight_and_pipeline_parallelism_are_refused():
    with pytest.raises(ValueError, match="intermediate_loss_weight=-0.1: .* must be >= 0"):
        LoopConfig(intermediate_loss_weight=-0.1)
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size 1"):
        LOOP.validate_for(num_layers=4, pipeline_model_parallel_size=2)
    LOOP.validate_for(num_layers=4, pipeline_model_parallel_size=1)
    dataclasses.replace(LOOP, intermediate_loss_weight=0).validate_for(4, 2)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--intermediate-loop-loss-weight", "-1"], "must be >= 0 (0 turns it off)."),
        (
            ["--intermediate-loop-loss-weight", "0.5", "--pipeline-model-parallel-size", "2"],
            "or set --intermediate-loop-loss-weight 0.",
        ),
    ],
)
def test_command_line_refuses_bad_weights_in_one_line(flags, message):
    base = ["--model-size", "debug", "--micro-batch-size", "1", "--train-iters", "1"]
    args = arguments.build_parser().parse_args([*base, "--lr", "1e-3", "--mock-data", *flags])
    errors = [e for e in arguments.validate_args(args, world_size=2) if "intermediate" in e]
    assert len(errors) == 1 and errors[0].endswith(message) and "\n" not in errors[0]
