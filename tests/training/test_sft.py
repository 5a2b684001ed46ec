"""Supervised fine-tuning: the objective, and `pretrain_loopmdm.py --sft` end to end."""

import json
import runpy

import pytest
import torch

from tests.training.sft_data import addition_examples, make_tokenizer, preprocess
from tests.training.test_pretrain import SCRIPT, assert_same_curve, metrics
from tests.utils import REPO, finish, start_torchrun

MASK, VOCAB = 11, 12


class PerTokenCE(torch.nn.Module):
    """A real (Hugging Face) LoopMDM called as the training step calls megatron's model; it
    records the noisy input it was given."""

    def __init__(self):
        super().__init__()
        from megatron_loopmdm.hf import LoopMDMConfig, LoopMDMForMaskedDiffusion

        torch.manual_seed(0)
        config = LoopMDMConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, mask_token_id=MASK, loop_layers=(0, 1), max_loops=2,
            max_position_embeddings=32,
        )  # fmt: skip
        self.model = LoopMDMForMaskedDiffusion(config)

    def forward(self, input_ids, position_ids, attention_mask, num_loops, labels):
        self.seen = input_ids.clone()
        self.logits = self.model(input_ids, num_loops=num_loops).logits.float()
        self.logits.retain_grad()
        logits = self.logits.transpose(1, 2)
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def test_forward_step_masks_and_scores_only_response_tokens():
    from megatron_loopmdm.diffusion.noise import mask_tokens, sample_times
    from megatron_loopmdm.training.step import DiffusionConfig, make_forward_step

    b, s, seed = 8, 12, 5
    tokens = torch.randint(0, 10, (b, s), generator=torch.Generator().manual_seed(1))
    prompt_lengths = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    response = (torch.arange(s)[None] >= prompt_lengths[:, None]).float()
    batch = {"tokens": tokens, "loss_mask": torch.ones(b, s), "response_mask": response}
    batch["sample_index"] = torch.arange(100, 100 + b)
    model = PerTokenCE()
    output, loss_func = make_forward_step(DiffusionConfig(MASK), seed, 1)(iter([batch]), model)
    loss_sum, num_tokens, _ = loss_func(output)
    prompt = response == 0
    assert torch.equal(model.seen[prompt], tokens[prompt]), "a prompt token was masked"
    assert int(num_tokens) == int(response.sum())
    # The reference: LLaDA's masking restricted to response tokens.
    t = sample_times(batch["sample_index"], seed)
    _, mask, p = mask_tokens(tokens, batch["sample_index"], seed, MASK, 1e-3, t, response.bool())
    assert mask.any() and not (mask & prompt).any()
    assert torch.equal(model.seen, torch.where(mask, MASK, tokens))
    ce = output.detach()
    assert loss_sum.item() == pytest.approx(((ce * mask).sum(1) / p).sum().item(), rel=1e-6)
    loss_sum.backward()
    assert (model.logits.grad[prompt] == 0).all(), "a prompt position contributed to the loss"
    assert model.logits.grad[mask].abs().sum() > 0


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sft")
    tok = make_tokenizer(directory)
    # 10-14 random words (of 8) as prompts, a constant response: scored only on the response
    # the loss falls towards 0; with the prompt in the loss, its ~70% share of iid words would
    # keep the loss above 0.7 ln(8) = 1.46 whatever the model.
    prefix = preprocess(directory, "junk", tok, addition_examples(300, 3, junk_prompt=True))
    return tok, prefix


def sft_args(sft_data, *extra):
    tok, prefix = sft_data
    return [str(a) for a in (
        "--model-size", "debug", "--seq-length", 32, "--micro-batch-size", 4,
        "--global-batch-size", 8, "--lr", 1e-2, "--lr-decay-style", "constant",
        "--log-interval", 1, "--sft", "--sft-packing", "pack", "--data-path", prefix,
        "--split", "100,0,0", "--tokenizer-model", tok, *extra,
    )]  # fmt: skip


# DP=2 is in the resumes below (megatron's distributed optimizer, DeepSpeed ZeRO-2): each
# resumed curve is checked against the reference from its first iteration.
LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", 2],
    # 4 processes: TP=2 x PP=2, two virtual stages of one layer per rank (loop block = layer 1).
    "tp2pp2vpp2": ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2,
                   "--num-layers-per-virtual-pipeline-stage", 1],
}  # fmt: skip
NPROC = {"tp2pp2vpp2": 4}
RESUME = {  # at DP=2: the megatron distributed optimizer, and DeepSpeed ZeRO-2
    "resume": ["--use-distributed-optimizer"],
    "ds_resume": ["--deepspeed", "--deepspeed-config"],
}


def export_random_hf_model(directory, tokenizer_dir):
    """A fresh (untrained) Hugging Face LoopMDM of the debug size, converted to a megatron
    checkpoint by tools/convert_hf_to_checkpoint.py; returns the checkpoint."""
    from megatron_loopmdm.data import build_tokenizer
    from megatron_loopmdm.hf import LoopMDMConfig, LoopMDMForMaskedDiffusion
    from megatron_loopmdm.models.sizes import get_model_size

    size = get_model_size("debug")
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(tokenizer_dir))
    config = LoopMDMConfig(
        vocab_size=384, hidden_size=size.hidden_size, intermediate_size=size.ffn_hidden_size,
        num_hidden_layers=size.num_layers, num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_query_groups,
        mask_token_id=tokenizer.mask, loop_layers=size.loop_layers, max_loops=size.max_loops,
        max_position_embeddings=size.seq_length, eos_token_id=tokenizer.eod,
    )  # fmt: skip
    torch.manual_seed(7)
    LoopMDMForMaskedDiffusion(config).save_pretrained(directory / "hf")
    convert = runpy.run_path(str(REPO / "tools" / "convert_hf_to_checkpoint.py"))["main"]
    assert convert(["--load", str(directory / "hf"), "--save", str(directory / "ckpt")]) == 0
    return directory / "ckpt"


@pytest.fixture(scope="module")
def runs(sft_data, tmp_path_factory, megatron_single_process):
    """{name: (finished run, its metrics)} for every `pretrain_loopmdm.py --sft` run of this
    file, started together so that they share the two cores: the 20-iteration single-process
    reference, the 4-iteration layouts, the DP=2 resumes with megatron's distributed optimizer
    and with DeepSpeed (each second half started when its first ends) and the fine-tuning of a
    converted Hugging Face model."""
    root = tmp_path_factory.mktemp("runs")
    (root / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    layouts = {name: [*flags, root / "ds.json"] if flags[-1] == "--deepspeed-config" else flags
               for name, flags in {**LAYOUTS, **RESUME}.items()}  # fmt: skip
    jobs = {
        "reference": (1, ["--train-iters", 20]),
        **{name: (NPROC.get(name, 2), ["--train-iters", 4, *layouts[name]]) for name in LAYOUTS},
        **{f"{name}_a": (2, [*layouts[name], "--save", root / name, "--train-iters", 2])
           for name in RESUME},
        "finetune": (1, ["--train-iters", 2, "--finetune", "--load",
                         export_random_hf_model(root, sft_data[0])]),
    }  # fmt: skip

    def start(name, nproc, args):
        extra = [*args, "--metrics-file", root / f"{name}.jsonl"]
        return start_torchrun(SCRIPT, nproc, sft_args(sft_data, *extra))

    started = {name: start(name, *job) for name, job in jobs.items()}
    done = {}
    for name in RESUME:  # the second half of a resume starts when its first half ends
        done[f"{name}_a"] = finish(started.pop(f"{name}_a"))
        if done[f"{name}_a"].returncode == 0:
            args = [*layouts[name], "--save", root / name, "--load", root / name]
            started[f"{name}_b"] = start(f"{name}_b", 2, [*args, "--train-iters", 4])
    done.update((name, finish(process)) for name, process in started.items())
    curves = {name: root / f"{name}.jsonl" for name in done}
    return {name: (result, metrics(curves[name]) if curves[name].exists() else [])
            for name, result in done.items()}  # fmt: skip


def succeeded(runs, name):
    """The run's output and metrics, once its exit status is checked."""
    result, curve = runs[name]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout, curve


@pytest.fixture(scope="module")
def reference(runs):
    return succeeded(runs, "reference")[1]


def test_cli_sft_learns_the_response_and_scores_no_prompt_token(reference):
    losses = [m["loss"] for m in reference]
    assert sum(losses[-5:]) / 5 < 0.7, losses


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sft_layouts_reproduce_the_single_process_curve(runs, reference, layout):
    assert_same_curve(succeeded(runs, layout)[1], reference[:4])


@pytest.mark.parametrize("backend", list(RESUME))
def test_sft_at_dp2_resumes_exactly(runs, reference, backend):
    first = succeeded(runs, f"{backend}_a")[1]
    stdout, resumed = succeeded(runs, f"{backend}_b")
    assert "resumed from" in stdout
    assert [m["iteration"] for m in resumed] == [3, 4]
    assert_same_curve(first + resumed, reference[:4])


def test_sft_finetunes_a_hugging_face_export(runs, reference):
    stdout, tuned = succeeded(runs, "finetune")
    assert "for fine-tuning; starting at iteration 0" in stdout
    assert [m["iteration"] for m in tuned] == [1, 2]
    # Same data, noise and loops, other weights: another loss.
    assert tuned[0]["loss"] != pytest.approx(reference[0]["loss"], rel=1e-3)


@pytest.mark.parametrize("flags,message", [
    (["--mock-data"], "--sft trains on SFT data; drop --mock-data"),
    (["--per-document-attention"], "drop --per-document-attention"),
    (["--random-length-prob", 0.1], "would cut SFT responses"),
])  # fmt: skip
def test_sft_flag_conflicts_say_what_to_change(flags, message):
    from megatron_loopmdm.training.arguments import build_parser, validate_args

    args = build_parser().parse_args(sft_args(("tok", "data"), *flags, "--train-iters", 1))
    if "--mock-data" in flags:
        args.data_path = None
    assert any(message in error for error in validate_args(args, 1))
    args = build_parser().parse_args(["--micro-batch-size", "1", "--train-iters", "1", "--lr",
                                      "1", "--mock-data", "--sft-packing", "pack"])  # fmt: skip
    assert "--sft-packing/--sft-eos-in-loss are read only with --sft." in validate_args(args, 1)
