"""Byte compatibility with Megatron-LM's tools/preprocess_data.py, tokenizer by tokenizer.

The reference files are what Megatron-LM's tool writes: for each document, the ids the tokenizer
library itself returns (transformers `AutoTokenizer(...)(text)["input_ids"]`, sentencepiece
`encode_as_ids`, megatron-core's own TikTokenTokenizer), then the EOD id with --append-eod, one
`add_document` each through megatron-core's `IndexedDatasetBuilder`, dtype
`DType.optimal_dtype(vocab size)`. The tokenizers are built here, offline; the WordPiece one
carries truncation and padding in its tokenizer.json, as BERT repositories ship it.
"""

import base64
import json
import os
import shutil

import pytest

from .helpers import read_documents, read_jsonl

MAX_LENGTH = 16  # the WordPiece tokenizer.json's truncation / padding length


def _documents(corpus):
    texts = read_jsonl(corpus)[:40]
    # Much longer than any model_max_length here, a one-word one, and a special-token string.
    texts += [" ".join(texts[:12]), "Hi", "before <|endoftext|> after", "x </s> y"]
    return texts


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory, corpus):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    out = tmp_path_factory.mktemp("bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        read_jsonl(corpus), trainers.WordPieceTrainer(vocab_size=500, special_tokens=specials)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.enable_truncation(max_length=MAX_LENGTH)
    tok.enable_padding(length=MAX_LENGTH, pad_id=0, pad_token="[PAD]")
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": MAX_LENGTH,
        **{f"{n}_token": f"[{n.upper()}]" for n in ("unk", "sep", "pad", "cls", "mask")},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return str(out)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, tokenizer_dir):
    """The byte-level BPE from train_tokenizer.py, with truncation and padding switched on."""
    out = tmp_path_factory.mktemp("bpe")
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), out / name)
    data = json.loads((out / "tokenizer.json").read_text())
    data["truncation"] = {
        "direction": "Right", "max_length": MAX_LENGTH, "strategy": "LongestFirst", "stride": 0
    }
    data["padding"] = {
        "strategy": {"Fixed": MAX_LENGTH}, "direction": "Right", "pad_to_multiple_of": None,
        "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>",
    }
    (out / "tokenizer.json").write_text(json.dumps(data))
    return str(out)


@pytest.fixture(scope="module")
def tiktoken_json(tmp_path_factory, tokenizer_dir):
    """The tiktoken ranks in Megatron-LM's JSON vocabulary layout."""
    merged = []
    with open(os.path.join(tokenizer_dir, "tokenizer.tiktoken"), "rb") as f:
        for line in f:
            token, rank = line.split()
            merged.append((int(rank), base64.b64decode(token)))
    # Megatron-LM's layout: the 256 single bytes first, in byte order, then the merges.
    tokens = [bytes([i]) for i in range(256)] + [t for _, t in sorted(merged) if len(t) > 1]
    entries = [
        {
            "rank": i,
            "token_bytes": base64.b64encode(t).decode(),
            "token_str": t.decode("utf-8", "replace"),
        }
        for i, t in enumerate(tokens)
    ]
    path = tmp_path_factory.mktemp("tiktoken") / "vocab.json"
    path.write_text(json.dumps(sorted(entries, key=lambda e: e["rank"])))
    return str(path), len(entries) + 1000


def _reference(kind, paths):
    """(encode(text) -> ids, eod id, vocab size) from the tokenizer libraries themselves."""
    if kind in ("wordpiece", "bpe"):
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(paths[kind])
        eod = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
        return (lambda t: hf(t)["input_ids"]), eod, len(hf)
    if kind == "gpt2":
        from transformers import GPT2Tokenizer

        # What Megatron-LM's GPT2BPETokenizer loads: transformers' GPT-2 from the two files.
        hf = GPT2Tokenizer.from_pretrained(os.path.dirname(paths["vocab"]))
        return (lambda t: hf(t)["input_ids"]), hf.eos_token_id, len(hf)
    if kind == "sp":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=paths["sp"])
        return sp.encode_as_ids, sp.eos_id(), sp.get_piece_size()
    from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import TikTokenTokenizer

    path, vocab_size = paths["tiktoken"]
    lib = TikTokenTokenizer(path, vocab_size=vocab_size)
    return lib.text_to_ids, lib.eod, lib.vocab_size


def _config_kwargs(kind, paths):
    if kind in ("wordpiece", "bpe"):
        return dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=paths[kind])
    if kind == "gpt2":
        return dict(
            tokenizer_type="GPT2BPETokenizer", vocab_file=paths["vocab"], merge_file=paths["merges"]
        )
    if kind == "sp":
        return dict(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=paths["sp"])
    path, vocab_size = paths["tiktoken"]
    return dict(tokenizer_type="TikTokenizer", tokenizer_model=path, vocab_size=vocab_size)


def test_files_are_byte_identical_to_megatron_lm_for_every_tokenizer(
    tmp_path, corpus, tokenizer_dir, sentencepiece_model, wordpiece_dir, bpe_dir, tiktoken_json
):
    pytest.importorskip("tiktoken")
    import megatron_loopmdm  # noqa: F401
    from megatron_loopmdm.data.preprocess import PreprocessConfig, preprocess

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    texts = _documents(corpus)
    gpt2_dir = tmp_path / "gpt2"
    gpt2_dir.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tokenizer_dir, name), gpt2_dir / name)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    paths = dict(
        wordpiece=wordpiece_dir,
        bpe=bpe_dir,
        vocab=str(gpt2_dir / "vocab.json"),
        merges=str(gpt2_dir / "merges.txt"),
        sp=sentencepiece_model,
        tiktoken=tiktoken_json,
    )
    for kind in ("wordpiece", "bpe", "gpt2", "sp", "tiktoken"):
        encode, eod, vocab_size = _reference(kind, paths)
        ids = [encode(t) for t in texts]
        assert max(map(len, ids)) > 4 * MAX_LENGTH, "documents longer than the max length"
        if kind in ("wordpiece", "bpe"):
            assert min(map(len, ids)) < MAX_LENGTH, "and shorter ones (which padding would fill)"
        for append_eod in (False, True):
            name = f"{kind}{int(append_eod)}"
            ref = str(tmp_path / f"ref_{name}")
            builder = IndexedDatasetBuilder(ref + ".bin", dtype=DType.optimal_dtype(vocab_size))
            for doc in ids:
                doc = doc + [eod] if append_eod else doc
                builder.add_document(doc, [len(doc)])
            builder.finalize(ref + ".idx")
            config = PreprocessConfig(
                output_prefix=str(tmp_path / name),
                input=[str(jsonl)],
                append_eod=append_eod,
                workers=2,
                batch_size=7,
                log_interval=0,
                **_config_kwargs(kind, paths),
            )
            summary = preprocess(config)
            out = str(tmp_path / f"{name}_text_document")
            for suffix in (".bin", ".idx"):
                with open(out + suffix, "rb") as a, open(ref + suffix, "rb") as b:
                    assert a.read() == b.read(), f"{kind} append_eod={append_eod}: {suffix}"
            docs = read_documents(out)
            assert docs == [d + [eod] if append_eod else d for d in ids], kind
            meta = json.loads(open(out + ".meta.json").read())
            assert meta["vocab_size"] == vocab_size
            assert meta["max_token_id"] == max(max(d) for d in docs)
            if kind == "wordpiece":
                assert "sep_token '[SEP]'" in summary.eod, summary.eod
