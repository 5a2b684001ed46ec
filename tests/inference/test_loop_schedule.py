"""The calibrated loop schedule: measured, saved next to the model, used by default, exported."""

import json
import os
import subprocess
import sys

from megatron_loopmdm.evaluation.exact_match import exact_match_per_loops, exact_match_per_policy
from megatron_loopmdm.hf import LoopMDMConfig, LoopMDMForMaskedDiffusion, load_for_inference
from megatron_loopmdm.hf.checkpoint import write_hf_directory
from megatron_loopmdm.inference import SCHEDULE_FILE, LoopPolicy, SamplerConfig, generate
from megatron_loopmdm.inference.calibration import calibrate_loop_schedule

import pytest
import torch

from tests.inference.tiny_model import (
    EOS,
    sample_sequences,
    train_tiny_model,
    write_hf_model_with_data,
)
from tests.utils import REPO, run_script


def _identity_loop_model():
    torch.manual_seed(0)
    config = LoopMDMConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, mask_token_id=31, max_loops=4)  # fmt: skip
    model = LoopMDMForMaskedDiffusion(config).eval()
    with torch.no_grad():  # the loop block becomes the identity: any S predicts as S = 1
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    return model


def test_calibration_keeps_the_fewest_loops_that_agree_with_s_max():
    sampler = SamplerConfig(gen_length=8, steps=8, block_length=4)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    identity = calibrate_loop_schedule(_identity_loop_model(), prompts, sampler, num_parts=4)
    assert identity["schedule"] == [1, 1, 1, 1]
    assert all(share == 1.0 for row in identity["agreement"] for share in row)
    model = train_tiny_model()
    prompts = sample_sequences(8, torch.Generator().manual_seed(7), length=2).tolist()
    record = calibrate_loop_schedule(model, prompts, SamplerConfig(gen_length=8, steps=8),
                                     num_parts=2, target=1.0, max_loops=4)  # fmt: skip
    for s, row, n in zip(record["schedule"], record["agreement"], record["positions"]):
        assert n > 0 and row[-1] == 1.0 and row[s - 1] >= 1.0
        assert s == 1 or row[s - 2] < 1.0, "the fewest loops that keep S_max's predictions"
    with pytest.raises(ValueError, match="target"):
        calibrate_loop_schedule(model, prompts, SamplerConfig(gen_length=8, steps=8), target=0)


NO_MEGATRON = """
import json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("megatron", "megatron_loopmdm"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor([[1, 2, 3]])
default = model.diffusion_generate(ids, gen_length=8, steps=8, return_dict_in_generate=True)
adaptive = model.diffusion_generate(ids, gen_length=8, steps=8, return_dict_in_generate=True,
                                    loop_stop="argmax", loop_per="sample", max_loops=4)
print(json.dumps({"schedule": model.loop_schedule["schedule"], "policy": default.loop_policy,
                  "loops": default.loops_per_step, "adaptive": adaptive.loop_policy}))
"""


def test_calibrated_schedule_round_trips_through_the_export(tmp_path):
    model = _identity_loop_model()
    model.loop_schedule = {"schedule": [1, 2, 3, 4], "target": 0.99}
    write_hf_directory(model, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / SCHEDULE_FILE).read_text())["schedule"] == [1, 2, 3, 4]
    loaded = load_for_inference(tmp_path / "hf")
    assert loaded.loop_schedule == model.loop_schedule
    write_hf_directory(loaded, tmp_path / "again")  # a re-export keeps it
    assert load_for_inference(tmp_path / "again").loop_schedule == model.loop_schedule
    config = SamplerConfig(gen_length=8, steps=8)
    used = generate(loaded, [[1, 2, 3]], config)
    assert used.loops_per_step == [1, 1, 2, 2, 3, 3, 4, 4]
    assert used.loop_policy.startswith("calibrated")
    off = generate(loaded, [[1, 2, 3]], SamplerConfig(gen_length=8, steps=8,
                                                      loops=LoopPolicy(calibrated=False)))
    assert off.loops_per_step == [4] * 8
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH="", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-c", NO_MEGATRON, str(tmp_path / "hf")],
                            capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["schedule"] == [1, 2, 3, 4] and seen["loops"] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert seen["policy"].startswith("calibrated") and "argmax" in seen["adaptive"]


def test_exact_match_per_policy_uses_the_same_prompts_and_seeds():
    model = train_tiny_model()
    rows = sample_sequences(12, torch.Generator().manual_seed(8), length=8).tolist()
    examples = [{"prompt": "".join(map(str, r[:2])), "answer": "".join(map(str, r[2:]))}
                for r in rows]  # fmt: skip

    def encode(text):
        return [int(c) for c in text]

    def decode(ids):
        return "".join(map(str, ids))

    fixed, _ = exact_match_per_loops(model, examples, encode, decode, [2], [EOS], batch_size=5)
    policies = {"fixed": LoopPolicy(num_loops=2),
                "argmax": LoopPolicy(stop="argmax", per="sample", max_loops=2)}  # fmt: skip
    table = exact_match_per_policy(model, examples, encode, decode, policies, [EOS], batch_size=5)
    overall = [r for r in fixed if r["task"] == "all" and r["difficulty"] == "all"][0]
    assert table[0]["correct"] == overall["correct"]
    assert table[0]["loop_evaluations"] == 2 * 7, "7 steps of 2 loops per sample"
    assert table[1]["loop_evaluations"] <= table[0]["loop_evaluations"]
    assert table[1]["probe_evaluations"] > 0


def test_generate_cli_calibrates_then_uses_the_schedule(tmp_path):
    paths = write_hf_model_with_data(tmp_path)
    valid = tmp_path / "validation.jsonl"
    valid.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("the cat", "the dog 3")))
    tool = ["--load", str(paths["hf"]), "--gen-length", "8", "--steps", "8",
            "--block-length", "4"]  # fmt: skip

    def run(*extra):
        return run_script(REPO / "tools" / "generate.py", tool + list(extra))

    calibrated = run("--calibrate-loops", str(valid), "--calibration-parts", "2")
    assert calibrated.returncode == 0, calibrated.stderr[-3000:]
    record = json.loads((paths["hf"] / SCHEDULE_FILE).read_text())
    assert len(record["schedule"]) == 2 and record["calibration_prompts"] == 2
    again = run("--calibrate-loops", str(valid))
    assert again.returncode == 1 and "--overwrite-loop-schedule" in again.stderr
    sampled = run("--prompt", "the cat", "--adaptive-loops", "--loop-stop", "argmax",
                  "--loop-per", "sample", "--max-loops", "3")  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert "per sample" in sampled.stdout and "loop evaluations per sample:" in sampled.stdout
    default = run("--prompt", "the cat")
    schedule = ",".join(map(str, record["schedule"]))
    assert f"loops: calibrated schedule {schedule}" in default.stdout, default.stdout[-2000:]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the cat", "answer": "sat"}) + "\n"
                            for _ in range(3)))  # fmt: skip
    scored = run_script(REPO / "tools" / "evaluate.py", [
        "exact-match", "--load", str(paths["hf"]), "--data", str(data), "--num-loops", "1",
        "--adaptive-loops", "--loop-stop", "argmax", "--loop-per", "sample", "--max-loops", "3",
        "--output-dir", str(tmp_path / "eval")])  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    (policy,) = json.loads((tmp_path / "eval" / "exact_match.json").read_text())["policy"]
    assert "argmax" in policy["policy"] and policy["total"] == 3
    assert 2 <= policy["loop_evaluations"] and policy["probe_evaluations"] > 0
