"""Importing Hugging Face AR models (Llama, Qwen2, Qwen3, Mistral) into a LoopMDM.

The proof of an import: the LoopMDM from the written dist checkpoint, with the causal mask
and S = 1, gives the HF model's own logits (fp32, relative 1e-5) on random input.
"""

import runpy

import megatron_loopmdm  # noqa: F401
import megatron_loopmdm.checkpointing.dist_checkpoint as ckpt
from megatron_loopmdm.hf.checkpoint import build_megatron_model, read_checkpoint_extra
from megatron_loopmdm.hf.from_ar import FLAGS_FILE, import_ar_model, kept_layers
from megatron_loopmdm.models.attention_masks import causal_attention_mask

import pytest
import torch

from tests.hf.ar_models import ROWS, VOCAB, ar_config, save_ar_model, save_tokenizer
from tests.utils import REPO, run_torchrun

pytestmark = pytest.mark.usefixtures("megatron_single_process")
SEQ = 20


def imported(root):
    """The TP=1 LoopMDMModel of an imported checkpoint, and its extra state."""
    _, extra = read_checkpoint_extra(root)
    model = build_megatron_model(extra)
    ckpt.load_checkpoint(root, [model])
    return model.eval(), extra


def random_ids(seed=0, batch=2):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def loopmdm_logits(model, ids, num_loops=1, causal=True):
    mask = causal_attention_mask(ids.size(1)) if causal else None
    position_ids = torch.arange(ids.size(1)).expand_as(ids)
    return model(ids, position_ids=position_ids, attention_mask=mask, num_loops=num_loops)


def assert_close(got, want, mask_id=VOCAB):
    """Relative 1e-5 over the HF model's vocabulary, but for [MASK] (-inf by design)."""
    keep = torch.arange(want.size(-1)) != mask_id
    got, want = got[..., : want.size(-1)][..., keep], want[..., keep]
    scale = want.abs().max()
    assert ((got - want).abs().max() / scale).item() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_imported_model_gives_the_hf_logits_in_causal_mode(arch, tmp_path):
    hf = save_ar_model(tmp_path / "hf", arch)
    import_ar_model(tmp_path / "hf", tmp_path / "ckpt", loop_layers=(1, 3), max_loops=3)
    model, extra = imported(tmp_path / "ckpt")
    size = extra["model_size"]
    assert size["qk_layernorm"] == (arch == "qwen3") and size["add_qkv_bias"] == (arch == "qwen2")
    ids = random_ids()
    want = hf(ids).logits
    got = loopmdm_logits(model, ids)
    # The tokenizer has no mask token: a new one after its tokens; rows padded to 128.
    mask_id = extra["model_config"]["mask_token_id"]
    # (Qwen2's tokenizer class adds a pad token of its own first.)
    assert mask_id == VOCAB + (arch == "qwen2") and extra["model_config"]["vocab_size"] == 128
    assert_close(got, want, mask_id)
    assert torch.isinf(got[..., mask_id]).all()
    # The loop span matters: S = 2 runs layers 1, 2 twice and changes the logits.
    assert not torch.allclose(loopmdm_logits(model, ids, num_loops=2)[..., :ROWS], want)


def test_shifted_prediction_and_new_mask_row(tmp_path):
    hf = save_ar_model(tmp_path / "hf", "qwen2")
    import_ar_model(tmp_path / "hf", tmp_path / "ckpt", (2, 3), max_loops=2, shift_logits=True)
    model, extra = imported(tmp_path / "ckpt")
    ids = random_ids(1)
    want = hf(ids).logits
    got = loopmdm_logits(model, ids)
    mask_id = extra["model_config"]["mask_token_id"]
    # position i predicts token i from position i - 1's output
    assert_close(got[:, 1:], want[:, :-1], mask_id)
    assert_close(got[:, :1], want[:, :1], mask_id)
    embedding = model.embedding.word_embeddings.weight
    assert torch.allclose(embedding[mask_id], hf.model.embed_tokens.weight.mean(0), atol=1e-6)
    # The tokenizer is written with the new mask token, and the flags to fine-tune with.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt" / "tokenizer")
    assert tokenizer.mask_token_id == mask_id == len(tokenizer) - 1
    flags = (tmp_path / "ckpt" / FLAGS_FILE).read_text().split()
    assert "--shift-logits" in flags and "--add-qkv-bias" in flags


def test_retrofit_keeps_effective_depth(tmp_path):
    save_ar_model(tmp_path / "hf", "llama")
    assert kept_layers(6, (1, 2), 3, retrofit=True) == [0, 1, 4, 5]
    import_ar_model(tmp_path / "hf", tmp_path / "ckpt", (1, 2), max_loops=3, retrofit=True)
    model, extra = imported(tmp_path / "ckpt")
    assert extra["model_size"]["num_layers"] == 4  # 1 + 3 x 1 + 2 = 6 layers deep at S = 3
    from safetensors.torch import load_file

    hf_state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    got = model.state_dict()["decoder.layers.2.mlp.linear_fc2.weight"]
    assert torch.equal(got, hf_state["model.layers.4.mlp.down_proj.weight"])


def test_tokenizer_mask_token_is_used(tmp_path):
    save_ar_model(tmp_path / "hf", "mistral", tokenizer=False)
    save_tokenizer(tmp_path / "hf", with_mask=True)
    import_ar_model(tmp_path / "hf", tmp_path / "ckpt", (1, 2), max_loops=2)
    _, extra = read_checkpoint_extra(tmp_path / "ckpt")
    assert extra["model_config"]["mask_token_id"] == VOCAB - 3


def test_bad_inputs_fail_with_a_clear_message(tmp_path, capsys):
    main = runpy.run_path(str(REPO / "tools" / "convert_hf_to_checkpoint.py"))["main"]
    hf = tmp_path / "hf"
    save_ar_model(hf, "llama")
    save = str(tmp_path / "ckpt")
    cases = {
        "no such directory": ["--from-ar", str(tmp_path / "none")],
        "out of range": ["--from-ar", str(hf), "--loop-layers", "4", "9"],
        "only 4 follow": ["--from-ar", str(hf), "--loop-layers", "1", "2", "--retrofit",
                          "--max-loops", "6"],
        "not in the tokenizer": ["--from-ar", str(hf), "--mask-token", "<nope>"],
    }  # fmt: skip
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    cases["supported: llama"] = ["--from-ar", str(gpt2)]
    small = tmp_path / "small"
    save_ar_model(small, "qwen2", config=ar_config("qwen2").__class__(
        **{**ar_config("qwen2").to_dict(), "vocab_size": 64}), tokenizer=True)  # fmt: skip
    cases["has no room"] = ["--from-ar", str(small)]
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((hf / "config.json").read_text())
    cases["missing or broken files"] = ["--from-ar", str(weightless)]
    capsys.readouterr()
    for expected, args in cases.items():
        assert main([*args, "--save", save]) == 1, expected
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exc:
        main(["--from-ar", str(hf), "--save", save, "--max-loops", "0"])
    assert exc.value.code == 2


def test_qwen3_import_loads_at_tp2_with_the_hf_logits(tmp_path):
    hf = save_ar_model(tmp_path / "hf", "qwen3")
    import_ar_model(tmp_path / "hf", tmp_path / "ckpt", loop_layers=(2, 4), max_loops=2)
    _, extra = read_checkpoint_extra(tmp_path / "ckpt")
    ids = random_ids(2)
    torch.save(ids, tmp_path / "ids.pt")
    args = ["--load", tmp_path / "ckpt", "--ids", tmp_path / "ids.pt", "--out", tmp_path / "o.pt"]
    result = run_torchrun(REPO / "tests" / "hf" / "from_ar_worker.py", 2, args)
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(tmp_path / "o.pt")
    assert_close(got, hf(ids).logits.detach(), extra["model_config"]["mask_token_id"])
