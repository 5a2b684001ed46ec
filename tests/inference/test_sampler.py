"""The samplers on an untrained model (mechanics) and on a tiny model trained in-process."""

import subprocess
import sys

from megatron_loopmdm.hf import LoopMDMConfig, LoopMDMForMaskedDiffusion
from megatron_loopmdm.inference import (
    REMASKINGS,
    LoopPolicy,
    SamplerConfig,
    generate,
    tokens_per_step,
)

import pytest
import torch

from tests.inference.tiny_model import (
    is_valid,
    sample_sequences,
    train_tiny_model,
    write_hf_model_with_data,
)
from tests.utils import REPO

MASK = 31


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    config = LoopMDMConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, mask_token_id=MASK, max_loops=2)  # fmt: skip
    return LoopMDMForMaskedDiffusion(config).eval()


@pytest.mark.parametrize("remasking", REMASKINGS)
def test_every_mask_filled_prompt_kept_and_schedule_followed(untrained, remasking):
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]  # different lengths: left padding
    config = SamplerConfig(gen_length=12, steps=6, block_length=4, remasking=remasking)
    result = generate(untrained, prompts, config, generator=torch.Generator().manual_seed(0))
    assert (result.generated != MASK).all()
    for row, prompt in enumerate(prompts):
        assert result.tokens[row, 5 - len(prompt) : 5].tolist() == prompt
    assert result.committed_per_step.sum(-1).tolist() == [12, 12, 12]
    if remasking != "ancestral":  # ancestral commits a random number per step
        expected = tokens_per_step(torch.full((3,), 4), 2).repeat(1, 3)
        assert torch.equal(result.committed_per_step, expected)
    assert len(result.loops_per_step) == 6 and result.model_flops > 0


def test_same_seed_same_tokens(untrained):
    config = SamplerConfig(gen_length=8, steps=4, temperature=1.0, remasking="random")

    def run(seed):
        return generate(untrained, [[1, 2]], config, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3).tokens, run(3).tokens)
    assert not all(torch.equal(run(3).tokens, run(s).tokens) for s in range(4, 8))


def test_loop_schedule_and_more_loops_than_trained(untrained):
    config = SamplerConfig(gen_length=8, steps=4, loops=LoopPolicy.parse_schedule("1,2,4,2"))
    assert generate(untrained, [[1]], config).loops_per_step == [1, 2, 4, 2]
    config = SamplerConfig(gen_length=4, steps=2, loops=LoopPolicy(num_loops=5))  # S > S_max
    result = generate(untrained, [[1]], config)
    assert result.loops_per_step == [5, 5] and result.loop_evaluations == 10


def test_tiny_model_samples_its_language():
    model = train_tiny_model()
    sequences = sample_sequences(32, torch.Generator().manual_seed(1))
    prompts = [s[:2].tolist() for s in sequences]
    config = SamplerConfig(gen_length=14, steps=14, block_length=7)
    result = generate(model, prompts, config)
    accuracy = (result.generated == sequences[:, 2:]).float().mean().item()
    valid = sum(is_valid(row) for row in result.tokens.tolist()) / len(prompts)
    assert accuracy > 0.8 and valid > 0.7, (accuracy, valid)  # chance: 0.1 per token


def test_adaptive_loops_use_fewer_evaluations_than_the_maximum():
    model = train_tiny_model()
    prompts = [s[:2].tolist() for s in sample_sequences(8, torch.Generator().manual_seed(2))]
    fixed = generate(model, prompts, SamplerConfig(gen_length=14, steps=7,
                                                   loops=LoopPolicy(num_loops=8)))  # fmt: skip
    adaptive = generate(model, prompts, SamplerConfig(
        gen_length=14, steps=7, loops=LoopPolicy(threshold=0.3, min_loops=1, max_loops=8)
    ))  # fmt: skip
    assert fixed.loop_evaluations == 8 * 7
    assert adaptive.loop_evaluations < fixed.loop_evaluations
    assert all(1 <= n <= 8 for n in adaptive.loops_per_step)
    assert adaptive.model_flops < fixed.model_flops


def test_generate_cli(tmp_path):
    paths = write_hf_model_with_data(tmp_path)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-W", "ignore", str(REPO / "tools" / "generate.py"),
           "--load", paths["hf"], "--prompt", "the cat", "--prompt", "the dog 3 ran",
           "--gen-length", 16, "--steps", 16, "--block-length", 8, "--adaptive-loops",
           "--loop-threshold", 0.01, "--min-loops", 1, "--max-loops", 4, "--seed", 0,
           "--output", out]  # fmt: skip
    runs = [subprocess.run(list(map(str, cmd)), capture_output=True, text=True, cwd=REPO)
            for _ in range(2)]  # fmt: skip
    assert runs[0].returncode == 0, runs[0].stderr[-3000:]
    for key in ("loops per step:", "loop evaluations:", "model FLOPs:", "tokens/s:"):
        assert key in runs[0].stdout
    assert runs[0].stdout.split("loops:")[0] == runs[1].stdout.split("loops:")[0]
    assert len(out.read_text().splitlines()) == 2


def test_eos_suppression_never_emits_eos(untrained):
    # The first token the model emits, named EOS and suppressed, never appears.
    free = generate(untrained, [[1, 2]], SamplerConfig(gen_length=16, steps=16))
    eos = int(free.generated[0, 0])
    kept = generate(untrained, [[1, 2]], SamplerConfig(gen_length=16, steps=16, eos_token_id=eos,
                                                       suppress_eos=True))  # fmt: skip
    assert (free.generated == eos).any()
    assert not (kept.generated == eos).any()
    assert (kept.generated != MASK).all()


def test_temperature_sampling_with_low_confidence_remasking_is_seeded(untrained):
    config = SamplerConfig(gen_length=8, steps=4, block_length=4, temperature=0.8)

    def run(seed):
        return generate(untrained, [[1, 2]], config, generator=torch.Generator().manual_seed(seed))

    first = run(11)
    assert torch.equal(first.tokens, run(11).tokens)
    assert (first.generated != MASK).all()
    greedy = generate(untrained, [[1, 2]], SamplerConfig(gen_length=8, steps=4, block_length=4))
    assert any(not torch.equal(run(s).tokens, greedy.tokens) for s in range(11, 16))


def test_classifier_free_guidance_changes_the_distribution_and_fills_every_mask(untrained):
    plain = generate(untrained, [[1, 2, 3]], SamplerConfig(gen_length=8, steps=8))
    guided = generate(untrained, [[1, 2, 3]], SamplerConfig(gen_length=8, steps=8, cfg_scale=3.0))
    assert (guided.generated != MASK).all()
    assert guided.tokens[0, :3].tolist() == [1, 2, 3]
    assert not torch.equal(plain.tokens, guided.tokens)
    # Guidance costs a second (unconditional) forward per step.
    assert guided.model_flops > plain.model_flops
