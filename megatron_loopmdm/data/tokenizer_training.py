"""Training a byte-level BPE tokenizer with special tokens for masked diffusion.

The result is a Hugging Face tokenizer directory (`tokenizer.json` + `tokenizer_config.json`)
with an end-of-document, a pad and a mask token. It can also be exported as GPT-2 `vocab.json` +
`merges.txt` and as a tiktoken rank file, so one trained vocabulary serves every tokenizer type.
"""

import base64
import json
import os
from typing import Dict, Iterable, Iterator, List

DEFAULT_EOD_TOKEN = "<|endoftext|>"
DEFAULT_PAD_TOKEN = "<|pad|>"
DEFAULT_MASK_TOKEN = "<|mask|>"


def iter_corpus_texts(paths: List[str], json_key: str = "text") -> Iterator[str]:
    """Yields documents from JSON-lines files (field `json_key`) or plain-text files."""
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)[json_key]
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            raise ValueError(f"{path}:{n}: no '{json_key}' text ({e})") from e
        else:
            with open(path, encoding="utf-8") as f:
                yield f.read()


def train_bpe_tokenizer(
    texts: Iterable[str],
    output_dir: str,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    eod_token: str = DEFAULT_EOD_TOKEN,
    pad_token: str = DEFAULT_PAD_TOKEN,
    mask_token: str = DEFAULT_MASK_TOKEN,
) -> str:
    """Trains a byte-level BPE and saves it as a Hugging Face tokenizer directory.

    The special tokens get ids 0 (EOD, also the EOS), 1 (pad) and 2 (mask); no BOS is added on
    encode, so a document's ids are exactly its text's.

    Args:
        texts: The training documents.
        output_dir: Directory to write (created if needed).
        vocab_size: Target vocabulary size, special tokens and the 256 bytes included.
        min_frequency: Minimum pair count for a merge.
        eod_token, pad_token, mask_token: The special tokens' strings.

    Returns:
        `output_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [eod_token, pad_token, mask_token]
    if len(set(specials)) != 3:
        raise ValueError(f"The EOD, pad and mask tokens must differ; got {specials}.")
    if vocab_size < 256 + len(specials):
        raise ValueError(f"--vocab-size must be at least {256 + len(specials)} (bytes + specials).")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save(os.path.join(output_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eod_token,
        "pad_token": pad_token,
        "mask_token": mask_token,
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return output_dir


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _load_bpe(hf_dir: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))


def export_gpt2_files(hf_dir: str, output_dir: str) -> List[str]:
    """Writes `vocab.json` and `merges.txt` for `--tokenizer-type GPT2BPETokenizer`."""
    os.makedirs(output_dir, exist_ok=True)
    return _load_bpe(hf_dir).model.save(output_dir)


def export_tiktoken_ranks(hf_dir: str, path: str) -> str:
    """Writes a tiktoken rank file (`base64-bytes rank` lines) of the non-special tokens.

    Ranks follow the BPE's id order, which is its merge order, so tiktoken's rank-based merging
    reproduces the vocabulary; `TikTokenizer` adds `<|endoftext|>` and `<|mask|>` after them.
    """
    tokenizer = _load_bpe(hf_dir)
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    vocab = sorted(tokenizer.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as f:
        rank = 0
        for token, _ in vocab:
            if token in specials:
                continue
            raw = bytes(byte_of[c] for c in token)
            f.write(f"{base64.b64encode(raw).decode('ascii')} {rank}\n")
            rank += 1
    os.replace(tmp, path)
    return path
