"""Tiny SFT data made by the real tools: a tokenizer and tools/preprocess_sft.py datasets."""

import importlib.util
import json
import random
import subprocess
import sys

from tests.utils import REPO


def tool(name, *args, check=True):
    cmd = [sys.executable, str(REPO / "tools" / name), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def addition_examples(n, seed, junk_prompt=False):
    """`a+b=` -> the sum; with `junk_prompt`, random words before a constant response."""
    rng = random.Random(seed)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "rock"]
    examples = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        if junk_prompt:
            prompt = " ".join(rng.choice(words) for _ in range(rng.randrange(10, 15)))
            examples.append({"prompt": prompt + " ?", "response": " ok ok ok"})
        else:
            examples.append({"prompt": f"{a}+{b}=", "response": str(a + b)})
    return examples


def write_jsonl(path, records):
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def make_tokenizer(directory):
    corpus = directory / "corpus.jsonl"
    texts = [e["prompt"] + e["response"] for e in addition_examples(300, 0)]
    texts += [e["prompt"] + e["response"] for e in addition_examples(300, 1, junk_prompt=True)]
    write_jsonl(corpus, [{"text": t} for t in texts])
    tool("train_tokenizer.py", "--input", corpus, "--output-dir", directory / "tok",
         "--vocab-size", 300)  # fmt: skip
    return directory / "tok"


def run_preprocess_sft(*args) -> int:
    """tools/preprocess_sft.py's `main` in this process (no megatron import per call)."""
    path = REPO / "tools" / "preprocess_sft.py"
    spec = importlib.util.spec_from_file_location("preprocess_sft", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def preprocess(directory, name, tokenizer, records, *extra):
    jsonl = write_jsonl(directory / f"{name}.jsonl", records)
    code = run_preprocess_sft(
        "--input", jsonl, "--output-prefix", directory / name, "--tokenizer-type",
        "HuggingFaceTokenizer", "--tokenizer-model", tokenizer, *extra,
    )  # fmt: skip
    assert code == 0
    return directory / name
