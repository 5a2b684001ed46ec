"""Every flag of `pretrain_loopmdm.py --help` does something, or is documented as accepted only
for Megatron-LM compatibility; `--transformer-impl` picks the layer spec."""

import inspect
import re
import subprocess
import sys

from megatron_loopmdm.training import arguments, inputs

import pytest

from tests.utils import REPO

# Flags that Megatron-LM command lines carry and that change nothing here, with the reason
# (each also says so in its --help).
ACCEPTED_FOR_COMPATIBILITY = {
    "no_load_rng": "checkpoints hold no RNG state: t, masks and loop counts are keyed by the seed",
}


def _readers() -> str:
    """The code that reads parsed arguments: the library and the entry point, not the parser."""
    files = [p for p in (REPO / "megatron_loopmdm").rglob("*.py") if p.name != "arguments.py"]
    return "\n".join(p.read_text() for p in [*files, REPO / "pretrain_loopmdm.py"])


def _is_read(dest: str, code: str, by_name: str) -> bool:
    return bool(
        re.search(rf"\bargs\.{dest}\b", code)
        or re.search(rf"getattr\(args, \"{dest}\"", code)
        or f'"{dest}"' in by_name
    )


def test_every_flag_is_read_or_listed_as_accepted_for_compatibility():
    # The config builders of the argument module count; its validation does not.
    code = _readers() + inspect.getsource(arguments.parallel_config)
    by_name = inspect.getsource(inputs.model_size_from_args) + inspect.getsource(
        inputs._ar_architecture_changes
    )  # these read tuples of names by getattr
    dests = {a.dest for a in arguments.build_parser()._actions if a.dest != "help"}
    unread = sorted(d for d in dests if not _is_read(d, code, by_name))
    assert unread == sorted(ACCEPTED_FOR_COMPATIBILITY)
    help_text = subprocess.run(
        [sys.executable, str(REPO / "pretrain_loopmdm.py"), "--help"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    ).stdout  # fmt: skip
    assert "accepted for Megatron-LM command lines, no effect" in help_text


def test_transformer_impl_sets_the_layer_spec():
    assert arguments.use_transformer_engine(None) is None
    assert arguments.use_transformer_engine("local") is False  # forces local even with TE
    assert arguments.use_transformer_engine("transformer_engine") is True


def test_transformer_impl_reaches_the_layer_spec(megatron_single_process):
    """`local` builds the local spec; `transformer_engine` asks for TE, refused without it."""
    import importlib.util

    from megatron_loopmdm.distributed.parallel import ParallelConfig
    from megatron_loopmdm.models.builder import loop_config_for, transformer_config
    from megatron_loopmdm.models.config import LoopMDMModelConfig
    from megatron_loopmdm.models.sizes import get_model_size
    from megatron_loopmdm.training.setup import build_model_chunks

    size = get_model_size("debug")
    parts = (transformer_config(size, ParallelConfig()), loop_config_for(size))
    model_config = LoopMDMModelConfig(vocab_size=64, max_sequence_length=64, mask_token_id=63)
    (chunk,) = build_model_chunks(*parts, model_config, use_te=False)
    modules = {type(m).__module__ for m in chunk.modules()}
    assert not any("transformer_engine" in name for name in modules)
    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(RuntimeError, match="transformer_engine is not installed"):
            build_model_chunks(*parts, model_config, use_te=True)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformer_engine") is not None,
    reason="Transformer Engine is installed here",
)
def test_transformer_engine_without_it_is_refused_at_parse_time():
    flags = ["--mock-data", "--micro-batch-size", 1, "--train-iters", 1, "--lr", 1e-3,
             "--transformer-impl", "transformer_engine"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(REPO / "pretrain_loopmdm.py"), *map(str, flags)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert "needs Transformer Engine, which is not installed" in result.stderr
    assert "--transformer-impl local" in result.stderr and "Traceback" not in result.stderr
