"""pretrain_loopmdm.py end to end: real torchrun processes on CPU with gloo."""

import json
import math
import re
import runpy
import subprocess
import sys

import pytest

from tests.utils import REPO, run_script, run_torchrun

SCRIPT = REPO / "pretrain_loopmdm.py"
VOCAB = 64
BASE = [
    "--model-size", "debug", "--mock-data", "--vocab-size", VOCAB, "--micro-batch-size", 4,
    "--global-batch-size", 8, "--lr", 1e-2, "--lr-decay-style", "constant", "--log-interval", 1,
]  # fmt: skip
LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.* loss: (\S+) \|.* loops: ([\d,]+) \|")


def pretrain(nproc, *args, timeout=300):
    result = run_torchrun(SCRIPT, nproc, [str(a) for a in (*BASE, *args)], timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def metrics(path):
    return [json.loads(line) for line in open(path)]


def assert_same_curve(curve, reference, rel=1e-4):
    """Same loop counts, and losses and grad norms within fp32 tolerance, at every step."""
    assert len(curve) == len(reference)
    assert [m["num_loops"] for m in curve] == [m["num_loops"] for m in reference]
    for got, want in zip(curve, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=rel)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=rel)


def test_debug_run_learns_and_logs_to_stdout_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = pretrain(
        2, "--train-iters", 50, "--global-batch-size", 16, "--micro-batch-size", 8,
        "--time-sampling", "antithetic", "--lr-warmup-iters", 5, "--log-interval", 5,
        "--eval-interval", 25, "--eval-iters", 2, "--tensorboard-dir", tmp_path / "tb",
        "--metrics-file", tmp_path / "m.jsonl",
    )  # fmt: skip
    lines = LINE.findall(result.stdout)
    assert [int(i) for i, _, _ in lines] == list(range(5, 51, 5))
    for field in ("learning rate:", "grad norm:", "tokens/s:", "TFLOP/s/device:", "ETA:"):
        assert field in result.stdout
    losses = [m["loss"] for m in metrics(tmp_path / "m.jsonl")]
    assert len(losses) == 50
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.3, f"loss did not fall: {first:.3f} -> {last:.3f}"
    validation = [
        float(v) for v in re.findall(r"validation at iteration \d+ .* nelbo: (\S+)", result.stdout)
    ]
    assert len(validation) == 2
    assert validation[-1] < math.log(VOCAB - 1), "the model must beat the unigram entropy"
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "lm-loss",
        "learning-rate",
        "grad-norm",
        "num-loops",
        "tokens-per-sec",
        "tflops-per-device",
        "validation-loss",
    ):
        assert tag in tags, tag
    assert any(tag.startswith("lm-loss-by-t/") for tag in tags)
    assert [e.step for e in events.Scalars("lm-loss")] == list(range(5, 51, 5))


# Warmup and cosine decay, so that a resume must also restore the learning-rate schedule.
SCHEDULE = ["--lr-warmup-iters", 2, "--lr-decay-style", "cosine"]


@pytest.fixture(scope="module")
def single_process_curve(tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "m.jsonl"
    pretrain(1, "--train-iters", 6, *SCHEDULE, "--metrics-file", path)
    return metrics(path)


def test_pipeline_parallel_reproduces_the_single_process_curve(tmp_path, single_process_curve):
    pretrain(2, "--train-iters", 6, *SCHEDULE, "--pipeline-model-parallel-size", 2,
             "--metrics-file", tmp_path / "m.jsonl")  # fmt: skip
    assert_same_curve(metrics(tmp_path / "m.jsonl"), single_process_curve)


def test_checkpoint_saved_at_tp2_resumes_at_pp2(tmp_path, single_process_curve):
    """TP=2 follows the one-process curve, saves at iteration 3; PP=2 loads it (resharded) and
    continues on the same curve. (Every layout against one process, the distributed optimizer
    and megatron's DP resume to the bit: test_parallel_equivalence.py and the DP=2 stop chain of
    test_checkpoint_robust.py.)"""
    ckpt = tmp_path / "ckpt"
    pretrain(2, "--tensor-model-parallel-size", 2, "--train-iters", 3, *SCHEDULE,
             "--lr-decay-iters", 6, "--save", ckpt,
             "--metrics-file", tmp_path / "tp2.jsonl")  # fmt: skip
    assert_same_curve(metrics(tmp_path / "tp2.jsonl"), single_process_curve[:3])
    result = pretrain(2, "--pipeline-model-parallel-size", 2, "--train-iters", 6, *SCHEDULE,
                      "--load", ckpt, "--metrics-file", tmp_path / "pp2.jsonl")  # fmt: skip
    assert f"resumed from {ckpt} at iteration 3" in result.stdout
    resumed = metrics(tmp_path / "pp2.jsonl")
    assert [m["iteration"] for m in resumed] == [4, 5, 6]
    assert_same_curve(resumed, single_process_curve[3:])
    assert [m["learning_rate"] for m in resumed] == [
        m["learning_rate"] for m in single_process_curve[3:]
    ]


def test_bf16_without_the_distributed_optimizer_saves_and_resumes_exactly(tmp_path):
    """megatron's fp16/bf16 optimizer checkpoints only low-precision parameters: every parameter
    (the local spec's norms too) must be bf16, as under Megatron-LM's Float16Module."""
    common = ["--bf16", "--train-iters", 3, "--save", tmp_path / "ckpt", "--save-interval", 2]
    pretrain(1, *common, "--metrics-file", tmp_path / "full.jsonl")
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("iter_*")) == [
        "iter_0000002", "iter_0000003"
    ]  # fmt: skip
    pretrain(1, *common, "--load", tmp_path / "ckpt", "--iteration", 2,
             "--metrics-file", tmp_path / "resumed.jsonl")  # fmt: skip
    full, resumed = metrics(tmp_path / "full.jsonl"), metrics(tmp_path / "resumed.jsonl")
    assert [m["iteration"] for m in resumed] == [3]
    assert resumed == full[2:]


BAD_FLAGS = [
    (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--bf16", "--fp16"], "Choose one of --bf16 and --fp16"),
    (["--global-batch-size", 6], "must be a multiple of --micro-batch-size 4"),
    (["--deepspeed"], "--deepspeed needs --deepspeed-config"),
    (
        ["--deepspeed", "--deepspeed-config", "x.json", "--use-distributed-optimizer"],
        "two ZeRO backends",
    ),
    (["--save-interval", 5], "--save-interval needs --save DIR"),
    (["--finetune"], "--finetune needs --load DIR"),
    (["--load", "/nonexistent/ckpt"], "no such directory"),
    (["--lr-decay-style", "WSD"], "needs --lr-wsd-decay-iters"),
    (["--data-path", "corpus"], "--mock-data replaces --data-path"),
    (["--tensor-model-parallel-size", 3], "cannot be split"),
    (["--intermediate-loop-loss-weight", -1], "intermediate_loss_weight=-1.0: the weight"),
    (
        ["--intermediate-loop-loss-weight", 1, "--pipeline-model-parallel-size", 2],
        "use --pipeline-model-parallel-size 1, or set --intermediate-loop-loss-weight 0.",
    ),
]


def test_a_rejected_flag_combination_ends_the_real_process_with_status_2():
    flags, message = BAD_FLAGS[0]
    cmd = [sys.executable, str(SCRIPT), *map(str, (*BASE, "--train-iters", 1, *flags))]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_rejected_flag_combinations_say_what_to_change(flags, message, capsys):
    # The script's own main() in this process: the process boundary is the test above; a new
    # interpreter per case would spend ~5 s of imports to reach a parse-time error.
    main = runpy.run_path(str(SCRIPT))["main"]
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in (*BASE, "--train-iters", 1, *flags)])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr
    assert "Traceback" not in stderr


def test_layout_that_cuts_the_loop_block_is_refused_with_a_proposal(tmp_path):
    result = run_torchrun(
        SCRIPT,
        2,
        [
            str(a)
            for a in (
                *BASE,
                "--train-iters",
                1,
                "--pipeline-model-parallel-size",
                2,
                "--loop-layers",
                1,
                3,
            )
        ],
    )
    assert result.returncode != 0
    assert "must lie inside one pipeline stage" in result.stderr
    assert "--pipeline-model-parallel-layout" in result.stderr
    # torchrun prints its own traceback for a failed child; ours must print none.
    assert (
        "[rank0]: Traceback" not in result.stderr
        and 'File "/' not in result.stderr.split("pretrain_loopmdm.py: error:")[0]
    )


def test_auto_layout_keeps_the_loop_block_whole(tmp_path):
    result = pretrain(
        2,
        "--train-iters",
        2,
        "--pipeline-model-parallel-size",
        2,
        "--loop-layers",
        1,
        3,
        "--pipeline-model-parallel-layout",
        "auto",
    )
    assert len(LINE.findall(result.stdout)) == 2


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    result = run_torchrun(
        SCRIPT,
        1,
        [
            str(a)
            for a in (
                *BASE,
                "--train-iters",
                30,
                "--lr",
                1e12,
                "--max-skipped-iterations",
                3,
                "--metrics-file",
                tmp_path / "m.jsonl",
            )
        ],
    )
    assert result.returncode == 1
    assert "consecutive iterations had a non-finite loss or gradients" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr  # (torchrun prints its own for the exit)
    skipped = [m["skipped"] for m in metrics(tmp_path / "m.jsonl")]
    assert skipped[-3:] == [True, True, True] and not skipped[0]
    assert "number of skipped iterations:   1" in result.stdout


def test_deepspeed_zero3_follows_the_single_process_curve_and_resumes_exactly(
    tmp_path, single_process_curve
):
    """ZeRO-3 at DP=2 through the command line: the one-process curve; then a resume from the
    earlier of its two saves (`--iteration`) repeats the rest to the bit. (Stages 1-3, recompute,
    bf16 and TP with DeepSpeed against the megatron backend: test_deepspeed_backend.py.)"""
    config, ckpt = tmp_path / "zero3.json", tmp_path / "ckpt"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    ds = ["--deepspeed", "--deepspeed-config", config, "--train-iters", 6, *SCHEDULE]
    pretrain(2, *ds, "--save", ckpt, "--save-interval", 3,
             "--metrics-file", tmp_path / "full.jsonl")  # fmt: skip
    full = metrics(tmp_path / "full.jsonl")
    assert_same_curve(full, single_process_curve)
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"
    # The plain-JSON run configuration next to DeepSpeed's files, as next to megatron's.
    run_config = json.loads((ckpt / "iter_0000003" / "run_config.json").read_text())
    assert run_config["model_size"]["hidden_size"] == 64 and run_config["version"] >= 1
    result = pretrain(2, *ds, "--load", ckpt, "--iteration", 3,
                      "--metrics-file", tmp_path / "resumed.jsonl")  # fmt: skip
    assert f"resumed from {ckpt} at iteration 3" in result.stdout
    assert metrics(tmp_path / "resumed.jsonl") == full[3:]


def test_deepspeed_iteration_of_a_missing_save_lists_the_saved_ones(tmp_path):
    from megatron_loopmdm.checkpointing.dist_checkpoint import CheckpointError
    from megatron_loopmdm.training.backend import DeepSpeedBackend

    for iteration in (3, 6):
        (tmp_path / f"iter_{iteration:07d}").mkdir()
    (tmp_path / "latest").write_text("iter_0000006")
    backend = DeepSpeedBackend.__new__(DeepSpeedBackend)  # finding needs no engine
    assert backend.find_checkpoint(tmp_path, None) == 6
    assert backend.find_checkpoint(tmp_path, 3) == 3
    with pytest.raises(CheckpointError, match=r"--iteration 4: .* \(saved iterations: 3, 6\)"):
        backend.find_checkpoint(tmp_path, 4)


def test_real_data_pipeline_and_finetune(tmp_path):
    """Corpus -> tokenizer -> indexed dataset -> pre-training -> fine-tuning from its weights."""

    def tool(name, *args):
        result = run_script(REPO / "tools" / name, args)
        assert result.returncode == 0, result.stderr[-3000:]

    corpus, tok, prefix = tmp_path / "corpus.jsonl", tmp_path / "tok", tmp_path / "data" / "c"
    tool("make_synthetic_corpus.py", "--output", corpus, "--num-docs", 400, "--seed", 3)
    tool("train_tokenizer.py", "--input", corpus, "--output-dir", tok, "--vocab-size", 500)
    tool(
        "preprocess_data.py",
        "--input",
        corpus,
        "--output-prefix",
        prefix,
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        tok,
        "--append-eod",
        "--workers",
        2,
    )
    data = [
        "--model-size",
        "debug",
        "--micro-batch-size",
        4,
        "--global-batch-size",
        8,
        "--lr",
        3e-3,
        "--log-interval",
        1,
        "--data-path",
        f"{prefix}_text_document",
        "--split",
        "90,10,0",
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        tok,
        "--data-cache-path",
        tmp_path / "cache",
    ]
    result = run_torchrun(
        SCRIPT,
        2,
        [
            str(a)
            for a in (
                *data,
                "--train-iters",
                3,
                "--eval-interval",
                3,
                "--eval-iters",
                1,
                "--save",
                tmp_path / "ckpt",
                "--metrics-file",
                tmp_path / "m.jsonl",
            )
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(metrics(tmp_path / "m.jsonl")) == 3
    assert "validation at iteration 3" in result.stdout
    result = run_torchrun(
        SCRIPT,
        2,
        [
            str(a)
            for a in (
                *data,
                "--train-iters",
                2,
                "--load",
                tmp_path / "ckpt",
                "--finetune",
                "--metrics-file",
                tmp_path / "ft.jsonl",
            )
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "for fine-tuning; starting at iteration 0" in result.stdout
    tuned = metrics(tmp_path / "ft.jsonl")
    assert [m["iteration"] for m in tuned] == [1, 2]
    # Same data and noise as the fresh run's first step, but trained weights: a lower loss.
    assert tuned[0]["loss"] < metrics(tmp_path / "m.jsonl")[0]["loss"]


def test_loading_a_checkpoint_of_another_architecture_names_the_differences(tmp_path):
    pretrain(1, "--train-iters", 1, "--save", tmp_path / "ckpt")
    result = run_torchrun(SCRIPT, 1, [str(a) for a in (
        *BASE, "--train-iters", 2, "--load", tmp_path / "ckpt", "--finetune",
        "--hidden-size", 32, "--loop-embedding")])  # fmt: skip
    assert result.returncode == 1
    assert "holds a different model" in result.stderr
    assert "hidden_size: checkpoint 64, this run 32" in result.stderr
    assert "loop_embedding: checkpoint False, this run True" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr


def test_eod_token_flag_for_a_tokenizer_without_eos_or_sep(tmp_path):
    """A WordPiece tokenizer with neither EOS nor SEP: preprocessing and training both take
    --eod-token; training without it stops at start-up with one line naming the flag."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    corpus, tok_dir, prefix = tmp_path / "corpus.jsonl", tmp_path / "tok", tmp_path / "data" / "c"
    tool = [sys.executable, str(REPO / "tools" / "make_synthetic_corpus.py")]
    made = subprocess.run([*tool, "--output", str(corpus), "--num-docs", "200", "--seed", "5"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    texts = [json.loads(line)["text"] for line in open(corpus)]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[MASK]", "[EOD]"]
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
    )
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]",
              "pad_token": "[PAD]", "mask_token": "[MASK]"}  # fmt: skip
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok_flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok_dir)]

    preprocess = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input",
                  str(corpus), "--output-prefix", str(prefix), *tok_flags, "--append-eod",
                  "--eod-token", "[EOD]", "--workers", "1"]  # fmt: skip
    done = subprocess.run(preprocess, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    eod_id = tok.token_to_id("[EOD]")
    meta = json.loads(open(f"{prefix}_text_document.meta.json").read())
    assert meta["eod_id"] == eod_id

    train = ["--model-size", "debug", "--micro-batch-size", 4, "--global-batch-size", 4,
             "--lr", 3e-3, "--log-interval", 1, "--train-iters", 2, "--data-path",
             f"{prefix}_text_document", "--split", "100,0,0", *tok_flags, "--data-cache-path",
             tmp_path / "cache", "--metrics-file", tmp_path / "m.jsonl"]  # fmt: skip
    refused = run_torchrun(SCRIPT, 1, [str(a) for a in train])
    assert refused.returncode != 0
    assert "--eod-token" in refused.stderr and "[rank0]: Traceback" not in refused.stderr
    result = run_torchrun(SCRIPT, 1, [str(a) for a in (*train, "--eod-token", "[EOD]")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["iteration"] for m in metrics(tmp_path / "m.jsonl")] == [1, 2]
