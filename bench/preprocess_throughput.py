"""Throughput of tools/preprocess_data.py against its ceiling, the tokenizer's own batch encoding.

Generates a synthetic corpus (default 50 MB), trains a byte-level BPE on a slice of it, measures
the tokenizer's `encode_batch` over the in-memory texts on all cores (the ceiling), then runs
tools/preprocess_data.py with 1 and 2 workers and reports MB/s, tokens/s and the ratio to the
ceiling. The preprocessing time is the tool's own (reading, parsing, tokenizing, writing), without
interpreter start-up; the wall time with start-up is printed too. The last line is
`preprocess_vs_tokenizer_ratio=<ratio at 2 workers>`.

    python bench/preprocess_throughput.py [--size-mb 50] [--workdir /tmp/bench]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    t0 = time.time()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return out.stdout, time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=50.0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="preprocess_bench_")
    os.makedirs(work, exist_ok=True)
    py = sys.executable
    corpus = os.path.join(work, "corpus.jsonl")
    run([py, "tools/make_synthetic_corpus.py", "--output", corpus, "--size-mb", str(args.size_mb)])
    head = os.path.join(work, "head.jsonl")
    with open(corpus) as src, open(head, "w") as dst:
        for _, line in zip(range(20000), src):
            dst.write(line)
    tok = os.path.join(work, "tok")
    run(
        [
            py,
            "tools/train_tokenizer.py",
            "--input",
            head,
            "--output-dir",
            tok,
            "--vocab-size",
            str(args.vocab_size),
        ]
    )

    sys.path.insert(0, REPO)
    from megatron_loopmdm.data.tokenizers import build_tokenizer

    with open(corpus, "rb") as f:
        raw = f.read()
    texts = [json.loads(line)["text"] for line in raw.splitlines()]
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tok)
    t0 = time.time()
    num_tokens = 0
    for i in range(0, len(texts), 1024):
        num_tokens += sum(map(len, tokenizer.encode_batch(texts[i : i + 1024])))
    ceiling_s = time.time() - t0
    ceiling_mbs, ceiling_tps = text_mb / ceiling_s, num_tokens / ceiling_s
    print(
        f"corpus: {len(raw) / 1e6:.1f} MB of JSON lines, {len(texts)} documents, "
        f"{text_mb:.1f} MB of text, {num_tokens} tokens, {os.cpu_count()} cores"
    )
    print(f"ceiling (encode_batch, all cores): {ceiling_mbs:.2f} MB/s, {ceiling_tps:.0f} tokens/s")

    ratio = None
    for workers in (1, 2):
        out, wall = run(
            [
                py,
                "tools/preprocess_data.py",
                "--input",
                corpus,
                "--output-prefix",
                os.path.join(work, f"out{workers}"),
                "--tokenizer-type",
                "HuggingFaceTokenizer",
                "--tokenizer-model",
                tok,
                "--append-eod",
                "--workers",
                str(workers),
                "--log-interval",
                "0",
            ]
        )
        seconds = float(re.search(r"time: ([\d.]+) s", out).group(1))
        tokens = int(re.search(r"tokens: (\d+)", out).group(1))
        mbs = text_mb / seconds
        ratio = mbs / ceiling_mbs
        print(
            f"preprocess_data --workers {workers}: {mbs:.2f} MB/s, "
            f"{(tokens - len(texts)) / seconds:.0f} tokens/s (excluding EOD), "
            f"{seconds:.1f} s ({wall:.1f} s with start-up), ratio to ceiling {ratio:.2f}"
        )
    print(f"preprocess_vs_tokenizer_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
