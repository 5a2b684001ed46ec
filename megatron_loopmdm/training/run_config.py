"""The run configuration a checkpoint stores: versioned JSON, readable without this package.

Each checkpoint's extra state holds `run_config`, a JSON string of the run's typed configs
(model size, model, loop, parallel layout, diffusion objective) and the training choices that
tools read back (parameter dtype, tokenizer). `read_run_config` also reads checkpoints written
before it existed, whose extra state held only the saved flags (`args`, a dict of the parsed
command line) or the converters' subset of them.
"""

import dataclasses
import json
from typing import Optional

RUN_CONFIG_VERSION = 1
"""Raised when the stored layout changes; readers refuse versions newer than theirs."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def run_config_json(
    configs: dict, params_dtype: str, tokenizer_type: Optional[str], tokenizer_model: Optional[str]
) -> str:
    """The JSON stored as `run_config`.

    Args:
        configs: name -> config dataclass (e.g. "model_size": ModelSize, "parallel": ...).
        params_dtype: one of `DTYPE_NAMES`.
        tokenizer_type, tokenizer_model: the run's tokenizer flags as given (the model is None
            when no --tokenizer-model was passed, e.g. with mock data).
    """
    assert params_dtype in DTYPE_NAMES, params_dtype
    tree = {name: dataclasses.asdict(config) for name, config in configs.items()}
    tree["version"] = RUN_CONFIG_VERSION
    tree["training"] = {"params_dtype": params_dtype}
    tree["data"] = {"tokenizer_type": tokenizer_type, "tokenizer_model": tokenizer_model}
    return json.dumps(tree, sort_keys=True)


def read_run_config(extra: dict) -> dict:
    """A checkpoint's run configuration as a plain dict (at least `training` and `data`).

    Raises:
        ValueError: a `run_config` of a newer version than this reader.
    """
    if "run_config" in extra:
        tree = json.loads(extra["run_config"])
        if tree.get("version", 0) > RUN_CONFIG_VERSION:
            raise ValueError(
                f"The checkpoint's run configuration is version {tree['version']}, newer than "
                f"this package reads ({RUN_CONFIG_VERSION}); upgrade megatron-loopmdm."
            )
        return tree
    flags = extra.get("args") or {}  # older checkpoints: the saved command line
    dtype = "bfloat16" if flags.get("bf16") else "float16" if flags.get("fp16") else "float32"
    return {
        "version": 0,
        "training": {"params_dtype": dtype},
        "data": {
            "tokenizer_type": flags.get("tokenizer_type"),
            "tokenizer_model": flags.get("tokenizer_model"),
        },
    }
