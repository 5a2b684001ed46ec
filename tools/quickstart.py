"""The embedded default, end to end, through the real entry points (`make quickstart`).

1. generate a synthetic corpus          tools/make_synthetic_corpus.py
2. train a tokenizer                    tools/train_tokenizer.py
3. preprocess into an indexed dataset   tools/preprocess_data.py (2 workers)
4. pre-train a small LoopMDM on CPU     pretrain_loopmdm.py under torchrun (2 processes, DP=2)
5. validation NELBO for S = 1..2 S_max  tools/evaluate.py nelbo
6. convert to Hugging Face              tools/convert_checkpoint_to_hf.py
7. sample with fixed and adaptive loops tools/generate.py (the adaptive sample stops a position's
   loops once its argmax stops changing, up to S_max)

It ends with what looping did in the run: the validation NELBO against S, and the adaptive
sample's loop evaluations and FLOPs against the fixed one's.

Every stage is a subprocess of the same command a user would type; nothing is special-cased.

    python tools/quickstart.py [--workdir runs/quickstart] [--small]
"""

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    # corpus docs, vocab, iterations, eval samples
    "default": dict(docs=30000, vocab=2048, iters=1000, eval_samples=32, log=50),
    "small": dict(docs=1500, vocab=512, iters=20, eval_samples=4, log=5),
}
MAX_LOOPS = 3
MODEL = [
    "--num-layers", "4", "--hidden-size", "128", "--ffn-hidden-size", "384",
    "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "128",
    "--loop-layers", "1", "2", "--max-loops", str(MAX_LOOPS),
]  # fmt: skip
PROMPTS = ["Once upon a time", "Question: Tom has 3 apples and buys 4 more. How many"]


def stage(number: int, title: str, cmd: list, log: Path, env=None) -> float:
    """Runs one stage, streaming its output to the terminal and to `log`."""
    print(f"\n=== [{number}/7] {title}\n$ {' '.join(map(str, cmd))}", flush=True)
    start = time.time()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=ROOT, env={**os.environ, **(env or {})},
        )  # fmt: skip
        for line in process.stdout:
            out.write(line)
            if not line.startswith("W1") and "warn" not in line.lower():
                print("    " + line, end="", flush=True)
        process.wait()
    elapsed = time.time() - start
    if process.returncode != 0:
        sys.exit(
            f"quickstart: stage {number} ({title}) failed with exit code "
            f"{process.returncode}; its full log is {log}"
        )
    print(f"=== [{number}/7] done in {elapsed:.0f} s", flush=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--small", action="store_true", help="a faster, smaller run (tests)")
    args = parser.parse_args()
    size = SIZES["small" if args.small else "default"]
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True)
    py = sys.executable
    corpus, tok = work / "corpus.jsonl", work / "tokenizer"
    prefix, ckpt, hf = work / "data" / "corpus", work / "checkpoints", work / "hf_model"
    dataset = f"{prefix}_text_document"
    begin = time.time()

    stage(
        1,
        "synthetic corpus",
        [
            py,
            "tools/make_synthetic_corpus.py",
            "--output",
            corpus,
            "--num-docs",
            size["docs"],
            "--seed",
            1234,
        ],
        logs / "1.log",
    )
    stage(
        2,
        "tokenizer",
        [
            py,
            "tools/train_tokenizer.py",
            "--input",
            corpus,
            "--output-dir",
            tok,
            "--vocab-size",
            size["vocab"],
        ],
        logs / "2.log",
    )
    stage(3, "indexed dataset", [
        py, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix,
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok, "--append-eod",
        "--workers", 2,
    ], logs / "3.log")  # fmt: skip
    stage(4, "pre-training on CPU (2 processes, data parallel)", [
        py, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port",
        os.environ.get("MASTER_PORT", "29517"), "pretrain_loopmdm.py", "--device", "cpu",
        *MODEL, "--data-path", dataset, "--split", "95,5,0", "--tokenizer-type",
        "HuggingFaceTokenizer", "--tokenizer-model", tok, "--data-cache-path", work / "cache",
        "--micro-batch-size", 8, "--global-batch-size", 16, "--train-iters", size["iters"],
        "--lr", 3e-3, "--min-lr", 3e-4, "--lr-warmup-iters", max(size["iters"] // 10, 1),
        "--lr-decay-style", "cosine", "--time-sampling", "antithetic",
        "--log-interval", size["log"], "--eval-interval", size["iters"], "--eval-iters", 2,
        "--save", ckpt, "--save-interval", size["iters"], "--tensorboard-dir",
        work / "tensorboard", "--metrics-file", work / "metrics.jsonl",
    ], logs / "4.log", env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    stage(5, f"validation NELBO for S = 1..{2 * MAX_LOOPS}", [
        py, "tools/evaluate.py", "nelbo", "--load", ckpt, "--data-path", dataset,
        "--tokenizer-model", tok, "--split", "95,5,0", "--split-name", "valid",
        "--num-loops", *range(1, 2 * MAX_LOOPS + 1), "--num-samples", size["eval_samples"],
        "--seq-length", 128, "--output-dir", work / "eval",
    ], logs / "5.log")  # fmt: skip
    stage(
        6,
        "convert to Hugging Face",
        [py, "tools/convert_checkpoint_to_hf.py", "--load", ckpt, "--save", hf, "--tokenizer", tok],
        logs / "6.log",
    )
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    sampling = ["--gen-length", 32, "--steps", 32, "--block-length", 8, "--seed", 0]
    stage(7, "sampling, fixed and adaptive loops", [
        py, "tools/generate.py", "--load", hf, *prompts, *sampling, "--num-loops", MAX_LOOPS,
        "--output", work / "samples_fixed.jsonl",
    ], logs / "7a.log")  # fmt: skip
    stage(7, "sampling, adaptive loops", [
        py, "tools/generate.py", "--load", hf, *prompts, *sampling, "--adaptive-loops",
        "--loop-stop", "argmax", "--loop-per", "position", "--loop-patience", 1,
        "--min-loops", 1, "--max-loops", MAX_LOOPS,
        "--output", work / "samples_adaptive.jsonl",
    ], logs / "7b.log")  # fmt: skip

    print("\n" + loops_summary(work / "eval" / "nelbo_vs_loops.csv", logs / "7a.log",
                               logs / "7b.log"))  # fmt: skip
    print(f"\nquickstart finished in {time.time() - begin:.0f} s. Written:")
    for path, what in [
        (corpus, "synthetic corpus (JSON lines)"),
        (tok, "tokenizer (Hugging Face directory)"),
        (Path(dataset + ".bin").parent, "indexed dataset (.bin/.idx)"),
        (ckpt, "checkpoints (megatron dist checkpoint)"),
        (work / "tensorboard", "TensorBoard logs: tensorboard --logdir " + str(work)),
        (work / "eval", "NELBO per loop count (table and PNG)"),
        (hf, "Hugging Face model (AutoModel, trust_remote_code=True)"),
        (work / "samples_fixed.jsonl", "samples, fixed loops"),
        (work / "samples_adaptive.jsonl", "samples, adaptive loops"),
        (logs, "the log of every stage"),
    ]:
        print(f"  {what:<58} {path}")


def _sampling_cost(log: Path) -> tuple:
    """(loop evaluations, model FLOPs) from a tools/generate.py log."""
    lines = log.read_text().splitlines()
    evaluations = next(x for x in lines if x.startswith("loop evaluations: "))
    flops = next(x for x in lines if x.startswith("model FLOPs: "))
    return int(evaluations.split()[2]), float(flops.split()[2])


def loops_summary(nelbo_csv: Path, fixed_log: Path, adaptive_log: Path) -> str:
    """What looping did on this run, from stage 5's table and stage 7's logs: the validation
    NELBO against S (does looping past the trained S_max hurt?) and the adaptive sample's loop
    evaluations and FLOPs against the fixed one's (do its probes cost more than they save?)."""
    with open(nelbo_csv) as f:
        rows = list(csv.DictReader(f))
    nelbo = {int(r["num_loops"]): float(r["nelbo"]) for r in rows}
    at_max = nelbo[MAX_LOOPS]
    beyond = max(nelbo[s] for s in nelbo if s > MAX_LOOPS)
    best = min(nelbo, key=nelbo.get)
    verdict = (f"past S_max it rises, by up to {beyond - at_max:+.3f}: this model does not "
               "extrapolate beyond its trained loops" if beyond > at_max else
               "past S_max it does not worsen")  # fmt: skip
    fixed, adaptive = _sampling_cost(fixed_log), _sampling_cost(adaptive_log)
    cost = (f"{adaptive[0] / fixed[0]:.2f}x the loop evaluations and "
            f"{adaptive[1] / fixed[1]:.2f}x the FLOPs of fixed S = {MAX_LOOPS}")
    if adaptive[1] > fixed[1]:
        cost += ("; the rule reads each loop's prediction through the coda and the output "
                 "layer, which costs more than the loops it skips here")
    return "\n".join([
        "what looping did in this run:",
        "  validation NELBO by loop count S: "
        + "  ".join(f"{s}: {v:.3f}" for s, v in sorted(nelbo.items())),
        f"  best at S = {best}; trained S_max = {MAX_LOOPS}; {verdict}",
        f"  sampling: fixed {fixed[0]} loop evaluations, {fixed[1]:.3g} FLOPs; adaptive "
        f"{adaptive[0]} loop evaluations, {adaptive[1]:.3g} FLOPs ({cost})",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
