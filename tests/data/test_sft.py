"""SFT data: tools/preprocess_sft.py output read back, and the pad / pack training samples."""

import json
import shutil

import numpy
import pytest

from tests.training.sft_data import (
    addition_examples,
    make_tokenizer,
    preprocess,
    run_preprocess_sft,
    tool,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("sft_tok"))


@pytest.fixture(scope="module")
def tokenizer(tok):
    from megatron_loopmdm.data import build_tokenizer

    return build_tokenizer("HuggingFaceTokenizer", str(tok))


def read_back(prefix):
    from megatron_loopmdm.data.sft import SFTExamples

    examples = SFTExamples([str(prefix)], 300, "test")
    return [examples[i] for i in range(len(examples))]


def test_prompt_response_lines_become_tokens_and_a_response_mask(tmp_path, tok, tokenizer):
    records = addition_examples(20, 5)
    examples = read_back(preprocess(tmp_path, "sft", tok, records))
    assert len(examples) == 20
    for record, (tokens, mask) in zip(records, examples):
        prompt = tokenizer.tokenize(record["prompt"])
        response = tokenizer.tokenize(record["response"])
        assert tokens.tolist() == prompt + response + [tokenizer.eod]
        assert mask.tolist() == [0] * len(prompt) + [1] * (len(response) + 1)


def test_chat_messages_with_and_without_a_chat_template(tmp_path, tok, tokenizer):
    messages = [
        {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "3+4="},
        {"role": "assistant", "content": "7"},
    ]
    tokens, mask = read_back(preprocess(tmp_path, "plain", tok, [{"messages": messages}]))[0]
    # Without a template: "role: content" lines; both assistant contents (and EOD) are responses.
    assert tokenizer.detokenize(tokens[mask == 0].tolist()) == (
        "user: 1+2=\nassistant: user: 3+4=\nassistant: "
    )
    assert tokenizer.detokenize(tokens[mask == 1].tolist()) == "3\n7\n<|endoftext|>"
    templated = tmp_path / "tok_chat"
    shutil.copytree(tok, templated)
    config = json.loads((templated / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    (templated / "tokenizer_config.json").write_text(json.dumps(config))
    tokens, mask = read_back(preprocess(tmp_path, "chat", templated, [{"messages": messages}]))[0]
    assert tokenizer.detokenize(tokens[mask == 0].tolist()) == (
        "<user>1+2=<assistant><user>3+4=<assistant>"
    )
    assert tokenizer.detokenize(tokens[mask == 1].tolist()) == "37<|endoftext|>"


def test_bad_lines_name_the_line_or_are_skipped_and_counted(tmp_path, tok, capsys):
    jsonl = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "response": "2"}, {"x": 1}])
    common = ["--input", jsonl, "--output-prefix", tmp_path / "out", "--tokenizer-type",
              "HuggingFaceTokenizer", "--tokenizer-model", tok]  # fmt: skip
    result = tool("preprocess_sft.py", *common, check=False)  # a real process: its exit code
    assert result.returncode == 65
    assert "bad.jsonl:2: expected string fields `prompt` and `response`" in result.stderr
    assert not (tmp_path / "out_text_document.idx").exists()
    assert run_preprocess_sft(*common, "--on-error", "skip", "--max-length", 3) == 0
    out = capsys.readouterr().out
    assert "wrote 0 examples" in out and "skipped 1 longer" in out and "and 1 bad lines" in out


def _datasets(prefix, tokenizer, seq_length, **kwargs):
    from megatron_loopmdm.data.sft import SFTConfig, build_sft_datasets

    config = SFTConfig(seq_length, [str(prefix)], "80,20,0", **kwargs)
    return build_sft_datasets(config, tokenizer, [50, 10])


def test_pad_and_pack_samples_hold_whole_examples(tmp_path, tok, tokenizer):
    prefix = preprocess(tmp_path, "sft", tok, addition_examples(40, 6))
    examples = read_back(prefix)
    pad, valid = _datasets(prefix, tokenizer, 16)
    pack, _ = _datasets(prefix, tokenizer, 32, packing="pack")
    assert len(valid) >= 10 and "document_ids" not in pad[0]
    seen = set()
    for i in range(len(pad)):
        sample = pad[i]
        n = int(sample["loss_mask"].sum())
        head = sample["tokens"][:n].tolist()
        match = [k for k, (t, _) in enumerate(examples) if t.tolist() == head]
        assert match and match[0] < 32, "train samples come from the train split"
        seen.add(match[0])
        assert (sample["tokens"][n:] == tokenizer.eod).all()
        assert sample["response_mask"][:n].tolist() == examples[match[0]][1].tolist()
        assert sample["response_mask"][n:].sum() == 0
    assert seen == set(range(32)), "every train example is used each epoch"
    for i in range(len(pack)):
        sample = pack[i]
        ids = sample["document_ids"]
        for d in range(int(ids.max()) + 1):
            part = sample["tokens"][ids == d].tolist()
            assert any(t.tolist() == part for t, _ in examples), "an example was split"
            assert sample["position_ids"][ids == d].tolist() == list(range(len(part)))
        assert (sample["loss_mask"] == (ids >= 0).float()).all()


def test_eos_padding_in_the_loss_is_response_of_the_last_example(tmp_path, tok, tokenizer):
    prefix = preprocess(tmp_path, "sft", tok, addition_examples(10, 7))
    for packing in ("pad", "pack"):
        train, _ = _datasets(prefix, tokenizer, 32, packing=packing, eos_in_loss=True)
        sample = train[0]
        assert sample["loss_mask"].all()
        n = int(numpy.flatnonzero(sample["tokens"].numpy() != tokenizer.eod)[-1]) + 2
        assert sample["response_mask"][n:].all() and (sample["tokens"][n:] == tokenizer.eod).all()
        if packing == "pack":
            assert (sample["document_ids"][n:] == sample["document_ids"][n - 1]).all()


def test_too_long_examples_and_weights_are_refused(tmp_path, tok, tokenizer):
    from megatron_loopmdm.data.sft import SFTConfig

    prefix = preprocess(tmp_path, "sft", tok, addition_examples(10, 8))
    with pytest.raises(ValueError, match="longer than --seq-length 4 .*raise --seq-length"):
        _datasets(prefix, tokenizer, 4)
    with pytest.raises(ValueError, match="without weights"):
        SFTConfig(16, ["0.5", str(prefix), "0.5", str(prefix)])
    (tmp_path / "sft_loss_mask.idx").unlink()
    with pytest.raises(FileNotFoundError, match="sft_loss_mask"):
        _datasets(prefix, tokenizer, 16)
