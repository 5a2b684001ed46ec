"""Wall time of tools/preprocess_data.py against Megatron-LM's tool and the tokenizer's ceiling.

Generates a synthetic corpus (default 32 MB of JSON lines), trains a byte-level BPE and a
BERT-like WordPiece tokenizer (truncation and padding in its tokenizer.json, [SEP] as end of
document) on a slice of it, then for each tokenizer measures:

* the ceiling: the tokenizer library's own `encode_batch` over the in-memory texts on all cores;
* our tool, `--workers W --append-eod`, wall time with start-up, and its start-up alone (the
  same command on a one-document input);
* with `--megatron-lm DIR` (a Megatron-LM checkout, e.g. tag core_v0.19.0), Megatron-LM's
  tools/preprocess_data.py with the same arguments (`--workers W`), wall time with start-up and
  start-up alone, run unchanged through a small shim (triton stand-in, `typing.override`), and
  whether its files equal ours byte for byte.

Prints per tokenizer `ours_vs_megatron_lm=<our wall / theirs>` (target <= 0.67) and
`ceiling_vs_ours=<ceiling time / our wall>` (target >= 0.95 where the ceiling is the limit).

    python bench/preprocess_throughput.py [--size-mb 32] [--workers 2] [--megatron-lm DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))

# Megatron-LM's tool imports megatron-core's pipeline schedules, which import triton (absent on
# CPU machines), and uses Python 3.12's `typing.override`: this runs it unchanged, with the
# package's triton stand-in and typing_extensions' `override`.
MEGATRON_LM_SHIM = """
import runpy, sys, typing
from megatron_loopmdm._compat import prepare_megatron_import
prepare_megatron_import()
if not hasattr(typing, "override"):
    import typing_extensions
    typing.override = typing_extensions.override
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(cmd, env=None):
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return out.stdout, time.time() - t0


def build_tokenizers(work: str, head: str, vocab_size: int) -> dict:
    py = sys.executable
    bpe = os.path.join(work, "bpe")
    run([py, "tools/train_tokenizer.py", "--input", head, "--output-dir", bpe,
         "--vocab-size", str(vocab_size)])  # fmt: skip
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    wordpiece = os.path.join(work, "wordpiece")
    os.makedirs(wordpiece, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    with open(head, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                             special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tok.enable_truncation(max_length=128)
    tok.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    tok.save(os.path.join(wordpiece, "tokenizer.json"))
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 128}
    config.update({f"{n}_token": f"[{n.upper()}]" for n in ("unk", "sep", "pad", "cls", "mask")})
    with open(os.path.join(wordpiece, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return {"bytelevel-bpe": bpe, "wordpiece": wordpiece}


def ceiling_seconds(tok_dir: str, texts: list) -> float:
    sys.path.insert(0, REPO)
    from megatron_loopmdm.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("HuggingFaceTokenizer", tok_dir)
    t0 = time.time()
    for i in range(0, len(texts), 1024):
        tokenizer.encode_batch(texts[i : i + 1024])
    return time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=32.0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--megatron-lm", help="A Megatron-LM checkout, to time its tool too.")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="preprocess_bench_")
    os.makedirs(work, exist_ok=True)
    py = sys.executable
    corpus = os.path.join(work, "corpus.jsonl")
    run([py, "tools/make_synthetic_corpus.py", "--output", corpus, "--size-mb", str(args.size_mb)])
    head, one = os.path.join(work, "head.jsonl"), os.path.join(work, "one.jsonl")
    with open(corpus) as src, open(head, "w") as dst, open(one, "w") as single:
        for i, line in zip(range(20000), src):
            dst.write(line)
            if i == 0:
                single.write(line)
    with open(corpus, "rb") as f:
        texts = [json.loads(line)["text"] for line in f]
    print(f"corpus: {os.path.getsize(corpus) / 1e6:.1f} MB, {len(texts)} documents, "
          f"{os.cpu_count()} cores, --workers {args.workers}")  # fmt: skip
    for name, tok_dir in build_tokenizers(work, head, args.vocab_size).items():
        common = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir,
                  "--append-eod", "--workers", str(args.workers)]  # fmt: skip
        ceiling = ceiling_seconds(tok_dir, texts)
        ours_cmd = [py, "tools/preprocess_data.py", *common, "--log-interval", "0"]
        _, startup = run([*ours_cmd, "--input", one, "--output-prefix", f"{work}/{name}_one"])
        _, ours = run([*ours_cmd, "--input", corpus, "--output-prefix", f"{work}/{name}_ours"])
        line = (f"{name}: ceiling {ceiling:.1f} s; ours {ours:.1f} s wall (start-up "
                f"{startup:.1f} s); ceiling_vs_ours={ceiling / ours:.3f}")  # fmt: skip
        if args.megatron_lm:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, args.megatron_lm])}
            tool = os.path.join(args.megatron_lm, "tools", "preprocess_data.py")
            prefix = f"{work}/{name}_megatron"
            theirs_cmd = [py, "-c", MEGATRON_LM_SHIM, tool, *common]
            _, their_startup = run([*theirs_cmd, "--input", one, "--output-prefix", prefix], env)
            _, theirs = run([*theirs_cmd, "--input", corpus, "--output-prefix", prefix], env)
            line += (f"; Megatron-LM {theirs:.1f} s wall (start-up {their_startup:.1f} s); "
                     f"ours_vs_megatron_lm={ours / theirs:.3f}")  # fmt: skip
            same = all(
                open(f"{prefix}_text_document{s}", "rb").read()
                == open(f"{work}/{name}_ours_text_document{s}", "rb").read()
                for s in (".bin", ".idx")
            )
            line += f"; identical files: {same}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
