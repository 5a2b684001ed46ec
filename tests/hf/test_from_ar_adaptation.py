"""AR-to-diffusion adaptation: the annealed attention mask, fine-tuning an imported model with
pretrain_loopmdm.py (TP=2, real gloo processes), and exporting the adapted model."""

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.hf import load_for_inference
from megatron_loopmdm.hf.checkpoint import convert_checkpoint_to_hf
from megatron_loopmdm.hf.from_ar import FLAGS_FILE, import_ar_model
from megatron_loopmdm.models.attention_masks import (
    anneal_progress,
    annealed_attention_mask,
    causal_attention_mask,
)
from megatron_loopmdm.training.step import DiffusionConfig, make_forward_step

import pytest
import torch

from tests.hf.ar_models import VOCAB, save_ar_model
from tests.hf.test_from_ar import imported, loopmdm_logits
from tests.utils import REPO, run_torchrun

pytestmark = pytest.mark.usefixtures("megatron_single_process")
SEQ = 16


def test_annealed_mask_goes_from_causal_to_bidirectional():
    index = torch.arange(3)
    assert anneal_progress(0, 10) == 0.0 and anneal_progress(5, 10) == 0.5
    assert anneal_progress(10, 10) == anneal_progress(20, 10) == anneal_progress(3, 0) == 1.0
    causal = causal_attention_mask(SEQ)
    assert torch.equal(annealed_attention_mask(index, SEQ, 7, 0.0), causal.expand(3, 1, -1, -1))
    assert annealed_attention_mask(index, SEQ, 7, 1.0) is None
    half = annealed_attention_mask(index, SEQ, 7, 0.5)
    assert not (half & ~causal).any()  # only future entries are ever masked
    opened = 1 - half.sum().item() / (3 * causal.sum().item())
    assert 0.35 < opened < 0.65
    # keyed by (seed, sample index): the same on every rank, different per sample
    assert torch.equal(half, annealed_attention_mask(index, SEQ, 7, 0.5))
    assert not torch.equal(half[0], half[1])
    with pytest.raises(ValueError, match="progress"):
        annealed_attention_mask(index, SEQ, 7, 1.5)


def test_forward_step_passes_the_annealed_mask_to_the_model(tmp_path):
    save_ar_model(tmp_path / "hf", "llama")
    import_ar_model(tmp_path / "hf", tmp_path / "ckpt", (1, 2), max_loops=2)
    model, extra = imported(tmp_path / "ckpt")
    seen = []

    def recording(*args, **kwargs):  # the real model, recording the mask it is given
        seen.append(kwargs["attention_mask"])
        return model(*args, **kwargs)

    batch = {"tokens": torch.randint(0, VOCAB, (2, SEQ)), "sample_index": torch.arange(2)}
    diffusion = DiffusionConfig(mask_token_id=extra["model_config"]["mask_token_id"])
    for progress in (0.0, 1.0):
        step = make_forward_step(diffusion, seed=1, num_loops=1, anneal_progress=progress)
        output, loss_func = step(iter([batch]), recording)
        assert torch.isfinite(loss_func(output)[0])
    assert torch.equal(seen[0], causal_attention_mask(SEQ).expand(2, 1, -1, -1))
    assert seen[1] is None  # bidirectional: the default, unmasked path


def test_finetune_imported_model_at_tp2_then_export_and_sample(tmp_path):
    save_ar_model(tmp_path / "hf", "qwen2")
    import_ar_model(tmp_path / "hf", tmp_path / "ckpt", (1, 3), max_loops=2, shift_logits=True)
    flags = (tmp_path / "ckpt" / FLAGS_FILE).read_text().split()
    args = [
        *flags, "--mock-data", "--vocab-size", VOCAB, "--micro-batch-size", 2,
        "--global-batch-size", 4, "--train-iters", 3, "--lr", 1e-3, "--lr-decay-style",
        "constant", "--load", tmp_path / "ckpt", "--finetune", "--save", tmp_path / "tuned",
        "--attention-mask-anneal-iters", 2, "--tensor-model-parallel-size", 2,
        "--log-interval", 1,
    ]  # fmt: skip
    result = run_torchrun(REPO / "pretrain_loopmdm.py", 2, args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "loaded weights from" in result.stdout + result.stderr
    convert_checkpoint_to_hf(tmp_path / "tuned", tmp_path / "export")
    hf = load_for_inference(tmp_path / "export")
    assert hf.config.shift_logits and hf.config.attention_bias
    assert (tmp_path / "export" / "tokenizer.json").is_file()
    reference, extra = imported(tmp_path / "tuned")
    mask_id = extra["model_config"]["mask_token_id"]
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    ids[:, ::2] = mask_id
    want = loopmdm_logits(reference, ids, num_loops=2, causal=False)
    got = hf(ids, num_loops=2).logits
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert torch.allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    out = hf.diffusion_generate(ids[:, :4].clamp_max(VOCAB - 1), gen_length=8, steps=4)
    assert out.shape == (2, 12) and not (out == mask_id).any()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--attention-mask-anneal-iters", "-1"], "--attention-mask-anneal-iters must be >= 0"),
        (["--padded-vocab-size", "129", "--tensor-model-parallel-size", "2"], "multiple of"),
        (["--rope-scaling", "[1]"], "--rope-scaling takes a JSON object"),
    ],
)
def test_bad_adaptation_flags_say_what_to_change(flags, message, capsys):
    from megatron_loopmdm.training.arguments import parse_args

    base = ["--mock-data", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3"]
    with pytest.raises(SystemExit) as exc:
        parse_args([*base, *flags], world_size=2)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_qwen3_export_gives_the_megatron_logits_and_rope_scaling_is_refused(tmp_path):
    save_ar_model(tmp_path / "hf", "qwen3")
    import_ar_model(tmp_path / "hf", tmp_path / "ckpt", (1, 3), max_loops=2, shift_logits=True)
    convert_checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "export")
    hf = load_for_inference(tmp_path / "export")
    assert hf.config.qk_layernorm and hf.config.head_dim == 16
    reference, _ = imported(tmp_path / "ckpt")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(4))
    want = loopmdm_logits(reference, ids, num_loops=3, causal=False)
    got = hf(ids, num_loops=3).logits
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    save_ar_model(tmp_path / "llama", "llama")  # llama3 RoPE scaling
    import_ar_model(tmp_path / "llama", tmp_path / "llama_ckpt", (1, 2), max_loops=2)
    with pytest.raises(ValueError, match="no RoPE scaling yet"):
        convert_checkpoint_to_hf(tmp_path / "llama_ckpt", tmp_path / "llama_export")
