"""Megatron <-> Hugging Face conversion, end to end on checkpoints from the real trainer.

Reference logits come from the library's `LoopMDMModel` loaded at TP=1 from each checkpoint;
the conversions run through the real command-line tools (as subprocesses for one layout each
way, in-process through the same `main` otherwise, to keep the suite fast).
"""

import json
import runpy
import shutil
import subprocess
import sys

import megatron_loopmdm  # noqa: F401
import megatron_loopmdm.checkpointing.dist_checkpoint as ckpt
from megatron_loopmdm.distributed.parallel import ParallelConfig
from megatron_loopmdm.hf import LoopMDMForMaskedDiffusion, load_for_inference
from megatron_loopmdm.models.builder import build_model, transformer_config
from megatron_loopmdm.models.config import LoopConfig, LoopMDMModelConfig
from megatron_loopmdm.models.sizes import ModelSize

import pytest
import torch
from megatron.core import dist_checkpointing

from tests.hf.conftest import VARIANT_FLAGS, VOCAB, subprocess_env
from tests.utils import REPO, finish, run_without_megatron, start_torchrun

MASK_ID = VOCAB - 1  # the trainer's default [MASK] under --mock-data
SEQ = 24

pytestmark = pytest.mark.usefixtures("megatron_single_process")


def tool_main(name):
    return runpy.run_path(str(REPO / "tools" / name))["main"]


def start_tool(name, *args) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "tools" / name), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=REPO)  # fmt: skip


def finish_tool(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_tool(name, *args):
    return finish_tool(start_tool(name, *args))


def extra_of(root) -> dict:
    directory = ckpt.checkpoint_dir(root, ckpt.latest_iteration(root))
    return dist_checkpointing.load_common_state_dict(str(directory))["extra"]


def megatron_reference(root):
    """The library's TP=1/PP=1 LoopMDMModel with the checkpoint's weights."""
    extra = extra_of(root)
    size_fields = dict(extra["model_size"], loop_layers=tuple(extra["model_size"]["loop_layers"]))
    size = ModelSize(**size_fields)
    model = build_model(
        transformer_config(size, ParallelConfig()),
        LoopConfig(**extra["loop_config"]),
        LoopMDMModelConfig(**extra["model_config"]),
    )
    ckpt.load_checkpoint(root, [model])
    return model.eval()


def tensors(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def sample_ids(batch=2, seed=0):
    ids = torch.randint(0, MASK_ID, (batch, SEQ), generator=torch.Generator().manual_seed(seed))
    ids[:, ::3] = MASK_ID
    return ids


@torch.no_grad()
def megatron_logits(model, ids, num_loops, padding=None):
    mask = None if padding is None else padding[:, None, None, :]  # True = not attended
    position_ids = torch.arange(ids.size(1)).expand_as(ids)
    return model(ids, position_ids=position_ids, attention_mask=mask, num_loops=num_loops)


def assert_same_logits(got, want):
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert torch.isneginf(got[..., MASK_ID]).all() and torch.isneginf(want[..., MASK_ID]).all()
    assert (got - want)[finite].abs().max() <= 1e-4


@pytest.fixture(scope="module")
def hf_dirs(trained, tmp_path_factory):
    """{layout: HF directory}; TP=2 goes through the command line (alongside), the others
    in-process."""
    out = tmp_path_factory.mktemp("hf")
    tp2 = start_tool("convert_checkpoint_to_hf.py", "--load", trained["tp2"], "--save", out / "tp2")
    for name in ("pp2", "variants"):
        assert (
            tool_main("convert_checkpoint_to_hf.py")(
                ["--load", str(trained[name]), "--save", str(out / name)]
            )
            == 0
        )
    result = finish_tool(tp2)
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: out / name for name in trained}


@pytest.mark.parametrize("layout", ["tp2", "pp2", "variants"])
def test_hf_model_gives_the_megatron_logits(trained, hf_dirs, layout):
    reference = megatron_reference(trained[layout])
    hf = LoopMDMForMaskedDiffusion.from_pretrained(hf_dirs[layout]).eval()
    config = json.loads((hf_dirs[layout] / "config.json").read_text())
    max_loops = config["max_loops"]
    assert config["mask_token_id"] == MASK_ID and config["auto_map"]["AutoModel"]
    ids = sample_ids()
    with torch.no_grad():
        for num_loops in (1, max_loops, max_loops + 2):
            got = hf(ids, num_loops=num_loops).logits
            assert_same_logits(got, megatron_logits(reference, ids, num_loops))
        assert torch.equal(hf(ids).logits, hf(ids, num_loops=max_loops).logits)
        padding = torch.zeros_like(ids, dtype=torch.bool)
        padding[0, -5:] = True
        got = hf(ids, attention_mask=~padding, num_loops=max_loops).logits
        assert_same_logits(got, megatron_logits(reference, ids, max_loops, padding))
    if layout == "variants":
        assert not config["tie_word_embeddings"] and config["loop_input_injection"] == "concat"
        # Training moved the loop modules off their identity initialisation.
        assert hf.model.loop_embedding.weight.abs().sum() > 0


@pytest.fixture(scope="module")
def round_trips(hf_dirs, tmp_path_factory):
    """{layout: checkpoint root} converted back, the variants through the command line
    (alongside the in-process TP=2 one); under "continued", `pretrain_loopmdm.py` at PP=2
    started from the variants, finished by the test that checks it (the tests in between run
    alongside it)."""
    out = tmp_path_factory.mktemp("round_trip")
    variants = start_tool(
        "convert_hf_to_checkpoint.py", "--load", hf_dirs["variants"], "--save", out / "variants"
    )
    main = tool_main("convert_hf_to_checkpoint.py")
    assert main(["--load", str(hf_dirs["tp2"]), "--save", str(out / "tp2")]) == 0
    result = finish_tool(variants)
    assert result.returncode == 0, result.stderr[-3000:]
    args = [
        "--model-size", "debug", "--mock-data", "--vocab-size", VOCAB, "--micro-batch-size", 4,
        "--global-batch-size", 8, "--train-iters", 1, "--lr", 1e-3, "--log-interval", 1,
        "--pipeline-model-parallel-size", 2, *VARIANT_FLAGS,
        "--load", out / "variants", "--finetune",
    ]  # fmt: skip
    continued = start_torchrun(REPO / "pretrain_loopmdm.py", 2, args)
    yield {"tp2": out / "tp2", "variants": out / "variants", "continued": continued}
    if continued.returncode is None:
        finish(continued)


@pytest.mark.parametrize("layout", ["tp2", "variants"])
def test_round_trip_gives_bit_identical_weights(trained, round_trips, layout):
    original = tensors(megatron_reference(trained[layout]))
    back = tensors(megatron_reference(round_trips[layout]))
    assert original.keys() == back.keys()
    for name, weight in original.items():
        assert torch.equal(weight, back[name]), name
    extra = extra_of(round_trips[layout])
    saved = extra_of(trained[layout])
    for key in ("model_size", "loop_config", "model_config"):
        assert extra[key].keys() == saved[key].keys()
    assert extra["model_config"] == saved["model_config"]
    conversion = json.loads(extra["run_config"])
    assert conversion["conversion"]["converted_from"] and "args" not in extra
    assert conversion["training"]["params_dtype"] == "float32"
    assert ckpt.latest_iteration(round_trips[layout]) == 0


NO_MEGATRON = """
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids, num_loops=4).logits, sys.argv[3])
"""


def test_hf_directory_loads_where_megatron_is_not_importable(hf_dirs, tmp_path):
    ids = sample_ids()
    torch.save(ids, tmp_path / "ids.pt")
    result = run_without_megatron(
        NO_MEGATRON, [hf_dirs["variants"], tmp_path / "ids.pt", tmp_path / "logits.pt"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    hf = LoopMDMForMaskedDiffusion.from_pretrained(hf_dirs["variants"]).eval()
    with torch.no_grad():
        want = hf(ids, num_loops=4).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), want)


def test_load_for_inference_reads_both_kinds_of_directory(trained, hf_dirs):
    ids = sample_ids(seed=1)
    from_megatron = load_for_inference(trained["pp2"])
    from_hf = load_for_inference(hf_dirs["pp2"], dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(from_megatron(ids).logits, from_hf(ids).logits)
    assert not from_hf.training


def test_diffusion_generate_fills_every_mask_and_keeps_the_prompt(hf_dirs):
    model = LoopMDMForMaskedDiffusion.from_pretrained(hf_dirs["tp2"]).eval()
    prompt = sample_ids(batch=2, seed=2)[:, :5].clamp_max(MASK_ID - 1)
    greedy = model.diffusion_generate(prompt, gen_length=8, steps=4, block_length=4)
    assert greedy.shape == (2, 13) and torch.equal(greedy[:, :5], prompt)
    assert not (greedy == MASK_ID).any()
    assert torch.equal(greedy, model.diffusion_generate(prompt, 8, 4, 4))
    sampled = [
        model.diffusion_generate(
            prompt, 8, 8, 4, num_loops=5, temperature=1.0,
            generator=torch.Generator().manual_seed(0),
        )
        for _ in range(2)
    ]  # fmt: skip
    assert torch.equal(*sampled) and not (sampled[0] == MASK_ID).any()
    with pytest.raises(ValueError, match="must divide"):
        model.diffusion_generate(prompt, gen_length=8, steps=4, block_length=3)


def test_bf16_export_and_tokenizer_files(trained, tmp_path):
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0"}')
    (tokenizer / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "hf_bf16"
    main = tool_main("convert_checkpoint_to_hf.py")
    args = ["--load", str(trained["tp2"]), "--save", str(out), "--dtype", "bf16"]
    assert main([*args, "--tokenizer", str(tokenizer)]) == 0
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (out / "generation_config.json").is_file()
    model = LoopMDMForMaskedDiffusion.from_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def assert_clear_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_inputs_fail_with_a_clear_message(trained, hf_dirs, tmp_path, capsys):
    result = run_tool("convert_checkpoint_to_hf.py", "--load", tmp_path / "nowhere", "--save", "x")
    assert result.returncode == 1 and "no such directory" in result.stderr
    assert "Traceback" not in result.stderr
    to_hf = tool_main("convert_checkpoint_to_hf.py")
    to_megatron = tool_main("convert_hf_to_checkpoint.py")
    save = str(tmp_path / "out")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clear_error(capsys, to_hf(["--load", str(empty), "--save", save]), "is missing")

    partial = tmp_path / "partial"
    shutil.copytree(trained["tp2"], partial)
    (ckpt.checkpoint_dir(partial, 2) / "metadata.json").unlink()
    assert_clear_error(capsys, to_hf(["--load", str(partial), "--save", save]), "incomplete")
    code = to_hf(["--load", str(partial), "--iteration", "7", "--save", save])
    assert_clear_error(capsys, code, "does not exist")

    other = tmp_path / "other_model"
    ckpt.save_checkpoint(other, 1, [megatron_reference(trained["pp2"])], extra={"model": "gpt"})
    assert_clear_error(capsys, to_hf(["--load", str(other), "--save", save]), "not a LoopMDM")

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_clear_error(capsys, to_megatron(["--load", str(llama), "--save", save]), "'llama'")
    assert_clear_error(capsys, to_megatron(["--load", str(empty), "--save", save]), "config.json")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copyfile(hf_dirs["tp2"] / "config.json", no_weights / "config.json")
    assert_clear_error(capsys, to_megatron(["--load", str(no_weights), "--save", save]))


# Last in the file: the run started by `round_trips` goes on while the tests above run.
def test_pretrain_continues_from_a_round_trip_at_another_layout(round_trips):
    result = finish(round_trips["continued"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "loaded weights from" in output and "iteration        1/" in output
