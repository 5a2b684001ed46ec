"""HF export: fresh directory renamed into place, readable files, a tokenizer that loads with
AutoTokenizer and no remote code, and no model written for an empty --tokenizer directory."""

import json
import os
import stat

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.hf.checkpoint import ConversionError, convert_checkpoint_to_hf

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers


def _tokenizer_dir(path):
    path.mkdir()
    vocab = {f"w{i}": i for i in range(60)} | {"[UNK]": 60, "[MASK]": 61}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text("{}")  # no tokenizer_class, as tools write it
    return path


def test_export_replaces_an_earlier_one_whole_with_readable_files_and_a_plain_tokenizer(
    trained, tmp_path
):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    convert_checkpoint_to_hf(trained["tp2"], out, tokenizer=_tokenizer_dir(tmp_path / "tok"))
    (out / "vocab.txt").write_text("an old tokenizer file")  # left over from an earlier export
    convert_checkpoint_to_hf(trained["tp2"], out, tokenizer=tmp_path / "tok")
    assert not (out / "vocab.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]  # no staging left
    for path in [out, *out.iterdir()]:
        assert os.stat(path).st_mode & stat.S_IROTH, path  # safetensors alone writes 0600
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"]
    tokenizer = AutoTokenizer.from_pretrained(out)  # no trust_remote_code, no prompt
    assert tokenizer("w1 w2")["input_ids"] == [1, 2]


def test_an_empty_tokenizer_directory_fails_before_anything_is_written(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="holds no tokenizer files"):
        convert_checkpoint_to_hf(trained["tp2"], tmp_path / "hf", tokenizer=tmp_path / "empty")
    assert not (tmp_path / "hf").exists()


def test_a_directory_that_is_not_an_export_is_never_replaced(trained, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(ConversionError, match="is not a LoopMDM export"):
        convert_checkpoint_to_hf(trained["tp2"], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "user data"
