"""The sampler settings whose tokens were recorded before the sampler was unified.

`data/sampler_tokens_before.json` holds, for every case below, the tokens that the sampler of
commit 4425e50 (`megatron_loopmdm/inference/sampler.py` and the exported model's
`diffusion_generate` of that commit) produced on `reference_model()`. The recording script is
`record_cases` (run once, with that commit's code); the tests compare today's shared sampler
against the file, so any change of tokens under an existing option is caught.
"""

import json
from pathlib import Path

import torch

RECORD = Path(__file__).parent / "data" / "sampler_tokens_before.json"
MASK = 31
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]  # ragged: left padding
EQUAL_PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8]]


def reference_model():
    """An untrained 3-layer LoopMDM (layer 1 looped, S_max 2) from a fixed seed."""
    from megatron_loopmdm.hf import LoopMDMConfig, LoopMDMForMaskedDiffusion

    torch.manual_seed(0)
    config = LoopMDMConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=4, mask_token_id=MASK,
                           loop_layers=(1, 2), max_loops=2, eos_token_id=30)  # fmt: skip
    return LoopMDMForMaskedDiffusion(config).eval()


def sampler_cases() -> dict:
    """{name: (SamplerConfig keyword arguments, loop policy keyword arguments, seed)}."""
    cases = {}
    for remasking in ("low_confidence", "random", "ancestral"):
        for temperature in (0.0, 0.8):
            for block in (12, 4):
                name = f"{remasking}_t{temperature}_b{block}"
                config = dict(gen_length=12, steps=6, block_length=block, remasking=remasking,
                              temperature=temperature)  # fmt: skip
                cases[name] = (config, {}, 3)
    base = dict(gen_length=12, steps=6, block_length=4)
    cases["cfg"] = ({**base, "cfg_scale": 2.0}, {}, 0)
    cases["suppress_eos"] = ({**base, "suppress_eos": True, "eos_token_id": 30}, {}, 0)
    cases["schedule"] = ({**base, "steps": 12}, {"schedule": (1, 2, 4, 2)}, 0)
    cases["fixed_s5"] = (base, {"num_loops": 5}, 0)
    cases["adaptive"] = (base, {"threshold": 0.3, "min_loops": 1, "max_loops": 6}, 0)
    return cases


def diffusion_generate_cases() -> dict:
    """{name: diffusion_generate keyword arguments} on EQUAL_PROMPTS."""
    return {
        "greedy": dict(gen_length=8, steps=4, block_length=4),
        "sampled_s3": dict(gen_length=8, steps=8, block_length=4, num_loops=3, temperature=1.0),
    }


def record_cases() -> None:  # pragma: no cover  (run once with the old code)
    from megatron_loopmdm.inference import LoopPolicy, SamplerConfig, generate

    model = reference_model()
    out = {"generate": {}, "diffusion_generate": {}}
    for name, (config, loops, seed) in sampler_cases().items():
        sampler = SamplerConfig(**config, loops=LoopPolicy(**loops))
        result = generate(model, PROMPTS, sampler, generator=torch.Generator().manual_seed(seed))
        out["generate"][name] = {"tokens": result.tokens.tolist(),
                                 "loops_per_step": result.loops_per_step}  # fmt: skip
    for name, kwargs in diffusion_generate_cases().items():
        tokens = model.diffusion_generate(torch.tensor(EQUAL_PROMPTS), **kwargs,
                                          generator=torch.Generator().manual_seed(0))  # fmt: skip
        out["diffusion_generate"][name] = tokens.tolist()
    RECORD.write_text(json.dumps(out))


if __name__ == "__main__":  # pragma: no cover
    record_cases()


EXPORT_PROMPTS = [[0, 1, 2, 3], [4, 5, 6, 7]]
EXPORT_MASK = [[0, 1, 1, 1], [1, 1, 1, 1]]  # row 0 left-padded by one token


def run_export_alone(model, script: str, tmp_path):
    """Exports `model`, runs `script` on it with megatron_loopmdm not importable (argv: the HF
    dir, a file of (prompts, attention mask), the output file); -> what the script saved."""
    from megatron_loopmdm.hf.checkpoint import write_hf_directory

    import torch

    from tests.utils import run_without_megatron

    write_hf_directory(model, tmp_path / "hf")
    torch.save((torch.tensor(EXPORT_PROMPTS), torch.tensor(EXPORT_MASK)), tmp_path / "in.pt")
    run = run_without_megatron(
        script, [tmp_path / "hf", tmp_path / "in.pt", tmp_path / "out.pt"], tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")
