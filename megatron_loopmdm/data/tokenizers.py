"""Tokenizers for preprocessing and for megatron-core's datasets.

Each class subclasses megatron-core's `MegatronTokenizerBase` (what `GPTDatasetConfig` expects)
and adds what preprocessing needs: `encode_batch` (the tokenizer library's own batch encoder),
`eod`, optional `pad` and `mask`, and `unique_identifiers` (megatron-core hashes these into its
index-cache names, so they must be JSON-serialisable and stable across runs).

Type names follow Megatron-LM's `--tokenizer-type` where one exists. Optional libraries
(sentencepiece, tiktoken) are imported where used, with a clear error when missing.
"""

import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import megatron_loopmdm  # noqa: F401  (registers the triton stand-in before megatron imports)

from megatron.core.tokenizers import MegatronTokenizerBase

TOKENIZER_TYPES = (
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "GPTSentencePieceTokenizer",
    "SentencePieceTokenizer",
    "TikTokenizer",
)

# GPT-2's pre-tokenisation regex (also tiktoken's "gpt2" pattern).
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
TIKTOKEN_PATTERNS = {"gpt2": _GPT2_PATTERN, "cl100k": _CL100K_PATTERN}
EOD_TEXT = "<|endoftext|>"


def _require(module: str, feature: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(
            f"{feature} needs the optional package '{module}': pip install {module}"
        ) from e


def _require_file(path: Optional[str], what: str, flag: str) -> str:
    if not path:
        raise ValueError(f"{what} is required: pass {flag}.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path} (from {flag}).")
    return path


class _TokenizerBase(MegatronTokenizerBase):
    """Shared plumbing; subclasses set `_eod`, `_pad`, `_mask` and implement encode/decode."""

    library = "megatron_loopmdm"

    def __init__(self, path: str, **identity) -> None:
        super().__init__(path, {"class_name": type(self).__name__})
        self._identity = identity
        self._eod: Optional[int] = None
        self._pad: Optional[int] = None
        self._mask: Optional[int] = None
        self.num_threads = os.cpu_count() or 1
        """Threads the batch encoder may use; preprocessing sets 1 in its worker processes."""

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        """What identifies this tokenizer in megatron-core's index-cache hashes."""
        ids = OrderedDict(class_name=type(self).__name__, path=self.path)
        ids.update(sorted(self._identity.items()))
        ids["vocab_size"] = self.vocab_size
        return ids

    def tokenize(self, text: str) -> List[int]:
        """Token ids of one text, as the library encodes it by default."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:  # pragma: no cover
        raise NotImplementedError

    @property
    def eod(self) -> int:
        """End-of-document id, appended by `--append-eod` and used as the packing separator."""
        if self._eod is None:
            raise ValueError(f"{type(self).__name__} at {self.path} has no end-of-document token.")
        return self._eod

    @property
    def pad(self) -> int:
        """Padding id; raises AttributeError when the tokenizer defines none."""
        if self._pad is None:
            raise AttributeError(f"{type(self).__name__} at {self.path} has no pad token.")
        return self._pad

    @property
    def mask(self) -> int:
        """The `[MASK]` id masked diffusion corrupts tokens into."""
        if self._mask is None:
            raise ValueError(
                f"{type(self).__name__} at {self.path} has no mask token; train a tokenizer with "
                "tools/train_tokenizer.py (it adds one) or add a mask token to this one."
            )
        return self._mask

    @property
    def mask_token_id(self) -> int:
        """Alias of `mask`, the name the diffusion code uses."""
        return self.mask

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no chat template.")


def _special_token(config: Dict, name: str) -> Optional[str]:
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HuggingFaceTokenizer(_TokenizerBase):
    """A Hugging Face tokenizer directory, encoded as `AutoTokenizer(text).input_ids` would be.

    Directories whose `tokenizer_config.json` names the generic fast class load `tokenizer.json`
    straight into the `tokenizers` library (identical ids, and no `transformers` import); others go
    through `transformers.AutoTokenizer`, offline.

    Args:
        path: The tokenizer directory (`--tokenizer-model`).
    """

    _GENERIC_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend", None}

    def __init__(self, path: str) -> None:
        super().__init__(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"Hugging Face tokenizer directory not found: {path} (from --tokenizer-model)."
            )
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(path, name)):
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    config.update(json.load(f))
        tokenizer_json = os.path.join(path, "tokenizer.json")
        if (
            os.path.exists(tokenizer_json)
            and config.get("tokenizer_class") in self._GENERIC_CLASSES
        ):
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_file(tokenizer_json)
            ids = {n: _special_token(config, n) for n in ("eos_token", "pad_token", "mask_token")}
            self._eod, self._pad, self._mask = (
                None if ids[n] is None else self._backend.token_to_id(ids[n])
                for n in ("eos_token", "pad_token", "mask_token")
            )
            self._vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        else:
            self._load_with_transformers(path)

    def _load_with_transformers(self, path: str) -> None:
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises many types here
            raise ValueError(f"Cannot load a Hugging Face tokenizer from {path}: {e}") from e
        if not hf.is_fast:
            raise ValueError(f"{path} holds a slow (Python) tokenizer; convert it to a fast one.")
        self._backend = hf.backend_tokenizer
        self._eod, self._pad, self._mask = hf.eos_token_id, hf.pad_token_id, hf.mask_token_id
        self._vocab_size = len(hf)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=True)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab(self) -> Dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size


class GPT2BPETokenizer(_TokenizerBase):
    """GPT-2 byte-level BPE from a `vocab.json` and `merges.txt` (Megatron-LM's GPT2BPETokenizer).

    Encoded with the `tokenizers` library's byte-level BPE, which uses GPT-2's regex and byte map;
    `<|endoftext|>` in text is ordinary text, and the vocabulary size is the number of entries in
    `vocab.json`, as in Megatron-LM.
    """

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        _require_file(vocab_file, "The GPT-2 vocab file", "--vocab-file")
        _require_file(merge_file, "The GPT-2 merge file", "--merge-file")
        super().__init__(vocab_file, merge_file=merge_file)
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            with open(vocab_file, encoding="utf-8") as f:
                self._vocab = json.load(f)
            self._backend = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        except Exception as e:
            raise ValueError(f"Cannot read GPT-2 BPE files {vocab_file}, {merge_file}: {e}") from e
        self._backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._backend.decoder = decoders.ByteLevel()
        if EOD_TEXT not in self._vocab:
            raise ValueError(f"{vocab_file} has no '{EOD_TEXT}' entry to use as end of document.")
        self._eod = self._vocab[EOD_TEXT]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab(self) -> Dict[str, int]:
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)


class GPTSentencePieceTokenizer(_TokenizerBase):
    """A SentencePiece model encoded with `encode_as_ids` (as Megatron-LM's GPTSentencePiece).

    End of document is the model's EOS piece; pad is its pad piece when it has one; the mask is a
    piece named by `mask_piece` when the model has it.
    """

    def __init__(self, model_file: str, mask_piece: str = "<mask>") -> None:
        _require_file(model_file, "The SentencePiece model", "--tokenizer-model")
        super().__init__(model_file)
        spm = _require("sentencepiece", "SentencePiece tokenizers")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except Exception as e:
            raise ValueError(f"{model_file} is not a SentencePiece model: {e}") from e
        if self._sp.eos_id() < 0:
            raise ValueError(f"SentencePiece model {model_file} has no EOS piece for end of doc.")
        self._eod = self._sp.eos_id()
        self._pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        mask = self._sp.piece_to_id(mask_piece)
        self._mask = mask if mask != self._sp.unk_id() else None

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self.num_threads)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab(self) -> Dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()


class TikTokenizer(_TokenizerBase):
    """A tiktoken encoding: a named one (`cl100k_base`, from tiktoken's cache) or a rank file.

    A rank file is tiktoken's own format (one `base64-token rank` per line); `<|endoftext|>` and
    `<|mask|>` are added after the ranks. Text is encoded as ordinary text (special-token strings
    in documents are not special). Megatron-LM's TikTokenizer offsets ids by a block of reserved
    special tokens, so its ids differ from these.

    Args:
        model: An encoding name or a path to a rank file (`--tokenizer-model`).
        pattern: Pre-tokenisation regex or one of `TIKTOKEN_PATTERNS` for rank files.
    """

    def __init__(self, model: str, pattern: str = "cl100k") -> None:
        if not model:
            raise ValueError("TikTokenizer needs --tokenizer-model (an encoding name or file).")
        super().__init__(model, pattern=pattern)
        tiktoken = _require("tiktoken", "TikTokenizer")
        if os.path.exists(model):
            import tiktoken.load

            try:
                ranks = tiktoken.load.load_tiktoken_bpe(model)
            except Exception as e:
                raise ValueError(f"{model} is not a tiktoken rank file: {e}") from e
            special = {EOD_TEXT: len(ranks), "<|mask|>": len(ranks) + 1}
            self._enc = tiktoken.Encoding(
                name=os.path.basename(model),
                pat_str=TIKTOKEN_PATTERNS.get(pattern, pattern),
                mergeable_ranks=ranks,
                special_tokens=special,
            )
            self._mask = special["<|mask|>"]
        else:
            try:
                self._enc = tiktoken.get_encoding(model)
            except Exception as e:
                raise ValueError(
                    f"tiktoken encoding '{model}' is neither a file nor an encoding available "
                    f"offline ({e}). Pass a rank file, or set TIKTOKEN_CACHE_DIR to a cache."
                ) from e
        self._eod = self._enc.eot_token

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=self.num_threads)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    @property
    def vocab(self) -> Dict[str, int]:
        raise NotImplementedError("tiktoken encodings expose no string vocabulary.")

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    tiktoken_pattern: str = "cl100k",
) -> _TokenizerBase:
    """Builds a tokenizer from Megatron-LM-style arguments.

    Args:
        tokenizer_type: One of `TOKENIZER_TYPES`.
        tokenizer_model: HF directory, SentencePiece model, or tiktoken name/rank file.
        vocab_file: GPT-2 `vocab.json` (GPT2BPETokenizer).
        merge_file: GPT-2 `merges.txt` (GPT2BPETokenizer).
        tiktoken_pattern: Pre-tokenisation regex name or pattern for tiktoken rank files.

    Raises:
        ValueError: Unknown type, missing argument or unreadable model.
        FileNotFoundError: A named file or directory does not exist.
    """
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(
            _require_file(tokenizer_model, "The tokenizer directory", "--tokenizer-model")
        )
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type in ("GPTSentencePieceTokenizer", "SentencePieceTokenizer"):
        return GPTSentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "TikTokenizer":
        return TikTokenizer(tokenizer_model, tiktoken_pattern)
    raise ValueError(
        f"Unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}."
    )
