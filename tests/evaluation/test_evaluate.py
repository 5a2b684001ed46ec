"""tools/evaluate.py end to end, and the evaluation functions on the tiny trained model."""

from types import SimpleNamespace

from megatron_loopmdm.evaluation import extract_answer, gsm8k_exact_match
from megatron_loopmdm.evaluation.lm_eval_adapter import LoopMDMEvalLM
from megatron_loopmdm.inference import LoopPolicy, SamplerConfig, generate

import pytest
import torch

from tests.inference.tiny_model import sample_sequences, train_tiny_model, write_hf_model_with_data
from tests.utils import REPO, run_script


def _evaluate(*args):
    return run_script(REPO / "tools" / "evaluate.py", args, timeout=120)


def test_nelbo_sweep_is_deterministic_and_writes_table_and_plot(tmp_path):
    paths = write_hf_model_with_data(tmp_path)
    common = ["--load", paths["hf"], "--data-path", paths["data"], "--tokenizer-model",
              paths["tokenizer"], "--split", "90,10,0", "--split-name", "valid",
              "--num-samples", 4, "--seq-length", 32]  # fmt: skip
    first = _evaluate("nelbo", *common, "--num-loops", 1, 2, 4, "--output-dir", tmp_path / "a")
    second = _evaluate("nelbo", *common, "--num-loops", 1, 2, 4, "--output-dir", tmp_path / "b")
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:]
    table_a = (tmp_path / "a" / "nelbo_vs_loops.csv").read_text()
    assert table_a == (tmp_path / "b" / "nelbo_vs_loops.csv").read_text()
    assert len(table_a.splitlines()) == 4 and (tmp_path / "a" / "nelbo_vs_loops.png").stat().st_size
    assert "| num_loops | nelbo |" in first.stdout
    attention = _evaluate("mask-attention", *common, "--num-loops", 1, 3, "--output-dir",
                          tmp_path / "c")  # fmt: skip
    assert attention.returncode == 0, attention.stderr[-3000:]
    rows = (tmp_path / "c" / "mask_attention.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 + 5  # S=1: 3 layer calls, S=3: 5
    assert (tmp_path / "c" / "mask_attention_loop_block.png").stat().st_size


def test_extract_answer():
    assert extract_answer("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert extract_answer("#### -5.50 dollars") == "-5.5"
    assert extract_answer("no marker 12") is None


def test_gsm8k_exact_match_on_the_tiny_language():
    model = train_tiny_model()
    sequences = sample_sequences(8, torch.Generator().manual_seed(3))
    examples = [{"question": f"{s[0]}{s[1]}", "answer": f"#### {s[2]}"} for s in sequences.tolist()]
    rows = gsm8k_exact_match(
        model, examples, encode=lambda text: [int(c) for c in text],
        decode=lambda ids: f"#### {ids[0]}",
        sampler=SamplerConfig(gen_length=14, steps=14, block_length=7),
        num_loops=[1, 2], template="{question}",
    )  # fmt: skip
    assert [r["num_loops"] for r in rows] == [1, 2]
    assert all(r["total"] == 8 and 0 <= r["exact_match"] <= 1 for r in rows)
    assert rows[1]["exact_match"] >= 0.5  # chance: 0.1


class DigitTokenizer:
    def tokenize(self, text):
        return [int(c) for c in text]

    def detokenize(self, ids):
        return "".join(str(i) if i < 10 else "|" for i in ids)


def test_lm_eval_adapter_methods_on_a_local_task():
    lm = LoopMDMEvalLM(model=train_tiny_model(), tokenizer=DigitTokenizer(), num_loops=2,
                       mc_samples=8, gen_length=6, block_length=6)  # fmt: skip
    request = lambda *args: SimpleNamespace(args=args)  # noqa: E731
    scores = lm.loglikelihood([request("0123", "4567"), request("0123", "9999")])
    assert len(scores) == 2 and all(isinstance(g, bool) for _, g in scores)
    assert scores[0][0] <= 0 and scores[1][0] <= 0
    assert scores[0][0] > scores[1][0] and scores[0][1]  # the language's continuation wins
    rolling = lm.loglikelihood_rolling([request("02468024"), request("05173")])
    assert len(rolling) == 2 and all(r <= 0 for r in rolling)
    texts = lm.generate_until([request("36", {"until": ["|"], "max_gen_toks": 6})])
    assert len(texts) == 1 and len(texts[0]) <= 6 and "|" not in texts[0]
    assert lm.loglikelihood([request("0123", "4567")]) == scores[:1]  # seeded: reproducible


def test_lm_eval_adapter_takes_the_loop_warm_start_as_a_model_arg():
    model, prompt = train_tiny_model(), [3, 6]
    lm = LoopMDMEvalLM(model=model, tokenizer=DigitTokenizer(), gen_length=6, block_length=6,
                       loop_threshold="0.05", max_loops="4", loop_warm_start="True")  # fmt: skip
    [text] = lm.generate_until([SimpleNamespace(args=("36", {"max_gen_toks": 6}))])
    config = SamplerConfig(gen_length=6, steps=6, block_length=6, loop_warm_start=True,
                           loops=LoopPolicy(threshold=0.05, max_loops=4))  # fmt: skip
    want = generate(model, [prompt], config, generator=torch.Generator().manual_seed(0))
    assert text == DigitTokenizer().detokenize(want.generated[0].tolist())
    with pytest.raises(ValueError, match="give true or false"):
        LoopMDMEvalLM(model=model, tokenizer=DigitTokenizer(), loop_warm_start="maybe")
