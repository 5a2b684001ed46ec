"""tools/train_tokenizer.py: a Hugging Face directory with EOD/pad/mask tokens, and exports."""

import json

from megatron_loopmdm.data.tokenizers import build_tokenizer

from .helpers import read_jsonl, run_tool


def test_directory_loads_in_transformers_with_special_tokens(tokenizer_dir, corpus):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    assert len(hf) == ours.vocab_size == 600
    assert (hf.eos_token_id, hf.pad_token_id, hf.mask_token_id) == (ours.eod, ours.pad, ours.mask)
    assert len({ours.eod, ours.pad, ours.mask}) == 3
    texts = read_jsonl(corpus)[:40] + ["Unicode: é ü 漢字, tabs\tand  spaces\n"]
    # Our fast path gives exactly what AutoTokenizer gives (what Megatron-LM's tool calls).
    assert [hf(t).input_ids for t in texts] == ours.encode_batch(texts)
    assert all(ours.detokenize(ours.tokenize(t)) == t for t in texts)


def test_exports_give_the_same_vocabulary(tokenizer_dir, corpus):
    texts = read_jsonl(corpus)[:40]
    hf = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    gpt2 = build_tokenizer(
        "GPT2BPETokenizer",
        vocab_file=f"{tokenizer_dir}/vocab.json",
        merge_file=f"{tokenizer_dir}/merges.txt",
    )
    tik = build_tokenizer(
        "TikTokenizer", f"{tokenizer_dir}/tokenizer.tiktoken", tiktoken_pattern="gpt2"
    )
    assert gpt2.encode_batch(texts) == hf.encode_batch(texts)
    assert gpt2.eod == hf.eod
    for t, ids in zip(texts, tik.encode_batch(texts)):
        assert tik.detokenize(ids) == t
    with open(f"{tokenizer_dir}/tokenizer_config.json") as f:
        assert json.load(f)["mask_token"] == "<|mask|>"


def test_bad_input_is_reported(tmp_path):
    result = run_tool(
        "train_tokenizer.py", "--input", tmp_path / "nope.jsonl", "--output-dir", tmp_path / "t"
    )
    assert result.returncode == 2 and "input file not found" in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    result = run_tool("train_tokenizer.py", "--input", bad, "--output-dir", tmp_path / "t")
    assert result.returncode == 2 and "bad.jsonl:2" in result.stderr
